"""PNG plots of a study (matplotlib, headless Agg backend; `pip install -e ".[dev]"` brings it)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

ROLE_NAMES = {0: "prefill", 1: "decode", 2: "mixed"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("PNG plots need matplotlib: pip install matplotlib (or --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def study_plots(
    out: Path, runs: list[dict], rows: dict[str, list[dict]], timelines: dict[str, list[dict]]
) -> list[str]:
    """Writes every plot of a study; returns their paths relative to `out`, for the report."""
    images = [latency_cdf(out / "latency_cdf.png", runs, rows)]
    images.append(versus_rate(out / "throughput_vs_rate.png", runs, "throughput"))
    images.append(versus_rate(out / "goodput_vs_rate.png", runs, "goodput"))
    for run in runs:
        images.append(
            timeline_plot(out / run["run"] / "timeline.png", rows.get(run["run"], []), timelines.get(run["run"], []))
        )
    return [str(Path(p).relative_to(out)) for p in images]


def latency_cdf(path: Path, runs: list[dict], rows: dict[str, list[dict]]) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    slo = runs[0].get("slo") if runs else None
    for ax, key, title, slo_key in zip(
        axes,
        ("ttft_ms", "tpot_ms", "e2el_ms"),
        ("TTFT", "TPOT", "E2EL"),
        ("ttft_ms", "tpot_ms", "e2el_ms"),
        strict=True,
    ):
        for run in runs:
            values = sorted(float(r[key]) for r in rows.get(run["run"], []) if r.get(key) not in (None, ""))
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=_run_label(run))
        if slo and slo.get(slo_key):
            ax.axvline(slo[slo_key], color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("share of requests ≤ x")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def versus_rate(path: Path, runs: list[dict], kind: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = sorted((_x(r), r) for r in runs)
    xs = [x for x, _ in points]
    if kind == "throughput":
        ax.plot(xs, [r["request_throughput"] for _, r in points], "o-", label="request throughput (req/s)")
        ax.plot(xs, xs, ":", color="gray", label="offered rate")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["output_throughput"] for _, r in points], "s--", color="tab:orange", label="output tok/s")
        ax2.set_ylabel("output tokens/s")
        ax2.legend(loc="lower right", fontsize="small")
        ax.set_ylabel("requests/s")
        ax.set_title("Throughput vs offered rate")
    else:
        ax.plot(
            xs, [r.get("request_goodput") or 0 for _, r in points], "o-", color="tab:green", label="goodput (req/s)"
        )
        ax.plot(xs, [r["request_throughput"] for _, r in points], ":", color="gray", label="throughput (req/s)")
        ax.set_ylabel("requests/s")
        ax2 = ax.twinx()
        ax2.plot(
            xs, [100 * (r.get("slo_attainment") or 0) for _, r in points], "s--", color="tab:red", label="attainment %"
        )
        target = (runs[0].get("slo") or {}).get("attainment") if runs else None
        if target:
            ax2.axhline(100 * target, color="tab:red", linewidth=0.8, alpha=0.5)
        ax2.set_ylim(0, 105)
        ax2.set_ylabel("SLO attainment (%)")
        ax2.legend(loc="lower right", fontsize="small")
        ax.set_title("Goodput vs offered rate")
    ax.set_xlabel(
        "offered rate (req/s)" if not any(r.get("max_concurrency") for _, r in points) else "offered rate / concurrency"
    )
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def timeline_plot(path: Path, rows: Sequence[dict], timeline: Sequence[dict]) -> Path:
    """Client load (in flight, finished/s) and the server's queues, KV usage, transfer rate, roles."""
    plt = _pyplot()
    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    _client_load(axes[0], rows)
    targets = sorted({t["target"] for t in timeline})
    for target in targets:
        points = [t for t in timeline if t["target"] == target]
        xs = [float(t["t_s"]) for t in points]
        for ax, key, style in ((axes[1], "waiting", "--"), (axes[1], "running", "-"), (axes[1], "inflight", "-.")):
            ys = _series(points, key)
            if any(y is not None for y in ys):
                ax.plot(xs, [y if y is not None else math.nan for y in ys], style, label=f"{target} {key}")
        for ax, key, scale in (
            (axes[2], "kv_usage", 100.0),
            (axes[3], "kv_send_gbps", 1.0),
            (axes[3], "kv_recv_gbps", 1.0),
        ):
            ys = _series(points, key)
            if any(y is not None for y in ys):
                ax.plot(xs, [y * scale if y is not None else math.nan for y in ys], label=f"{target} {key}")
        codes = _series(points, "role_code")
        if any(c is not None for c in codes):
            axes[4].step(xs, [c if c is not None else math.nan for c in codes], where="post", label=target)
    axes[1].set_ylabel("requests")
    axes[1].set_title("server queues")
    axes[2].set_ylabel("KV usage (%)")
    axes[3].set_ylabel("KV transfer GB/s")
    axes[4].set_ylabel("role")
    axes[4].set_yticks(list(ROLE_NAMES), list(ROLE_NAMES.values()))
    axes[4].set_xlabel("seconds since the run started")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _client_load(ax, rows: Sequence[dict]) -> None:
    events = []
    for r in rows:
        if r.get("sent_ms") in (None, "") or r.get("e2el_ms") in (None, ""):
            continue
        sent = float(r["sent_ms"]) / 1000
        events += [(sent, 1), (sent + float(r["e2el_ms"]) / 1000, -1)]
    level, xs, ys = 0, [0.0], [0]
    for t, step in sorted(events):
        level += step
        xs.append(t)
        ys.append(level)
    ax.step(xs, ys, where="post", label="client: requests in flight")
    ax.set_ylabel("requests")
    ax.set_title("client load")


def _series(points: Sequence[dict], key: str) -> list[float | None]:
    return [float(p[key]) if p.get(key) not in (None, "") else None for p in points]


def _x(run: dict) -> float:
    rate = run.get("request_rate")
    if rate is None or (isinstance(rate, float) and math.isinf(rate)):
        return float(run.get("max_concurrency") or run.get("request_throughput") or 0)
    return float(rate)


def _run_label(run: dict) -> str:
    rate = run.get("request_rate")
    if rate is None:
        return run["run"]
    if math.isinf(float(rate)):
        return f"concurrency {run.get('max_concurrency')}" if run.get("max_concurrency") else "all at once"
    return f"{float(rate):g} req/s"
