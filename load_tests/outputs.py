"""Writes a study (one run, a sweep or a search) to a folder, and renders its report from it.

    OUT/summary.json            mode, SLO, search answer, one summary per run (no arrays)
    OUT/summary.csv             one row per run: rate, throughput, goodput, attainment, latencies
    OUT/report.md               the Markdown report (tables + the plots below)
    OUT/latency_cdf.png         TTFT / TPOT / ITL / E2EL CDFs, one line per run
    OUT/throughput_vs_rate.png  request and output-token throughput against offered rate
    OUT/goodput_vs_rate.png     goodput and SLO attainment against offered rate
    OUT/RUN/result.json         `vllm bench serve`'s result shape: summary + input_lens,
                                output_lens, ttfts, itls, errors
    OUT/RUN/requests.json|csv   one row per request (times in ms from the run's start)
    OUT/RUN/timeline.csv        the server's /metrics over the run (see load_tests.scrape)
    OUT/RUN/timeline.png        load, queues, KV usage, transfer GB/s and roles over time

`render_report(OUT)` reads only these files, so `pdserve bench report OUT` rebuilds the report
and plots of any earlier study.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

from load_tests.modes import RunResult

ARRAY_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "errors")
CSV_COLUMNS = (
    "run",
    "request_rate",
    "arrival",
    "max_concurrency",
    "num_sent",
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_goodput",
    "slo_attainment",
    "slo_met",
    *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p90", "p99", "max")),
    "max_concurrent_requests",
    "p99_client_send_lag_ms",
    "errors_by_status",
)


def run_dir_name(index: int, summary: dict) -> str:
    rate = summary.get("request_rate")
    tag = "trace" if rate is None else ("inf" if math.isinf(rate) else f"{rate:g}")
    concurrency = summary.get("max_concurrency")
    return f"run-{index:02d}-rate-{tag}" + (f"-conc-{concurrency}" if concurrency else "")


def write_run(result: RunResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(_dumps(result.summary, compact=True))
    (folder / "requests.json").write_text(_dumps(result.rows, compact=True))
    _write_csv(folder / "requests.csv", result.rows)
    _write_csv(folder / "timeline.csv", result.timeline)


def write_study(
    out: Path, mode: str, results: Sequence[RunResult], extra: dict | None = None, plots: bool = True
) -> Path:
    """Writes every file of the study and renders the report; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, result in enumerate(results, 1):
        name = run_dir_name(i, result.summary)
        write_run(result, out / name)
        runs.append({"run": name, **{k: v for k, v in result.summary.items() if k not in ARRAY_KEYS}})
    slo = results[0].summary.get("slo") if results else None
    (out / "summary.json").write_text(_dumps({"mode": mode, "slo": slo, **(extra or {}), "runs": runs}))
    return render_report(out, plots=plots)


def load_study(out: Path) -> tuple[dict, dict[str, list[dict]], dict[str, list[dict]]]:
    """summary.json, and each run's per-request rows and timeline rows."""
    try:
        study = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{out} holds no readable summary.json: {exc}") from None
    rows = {r["run"]: json.loads((out / r["run"] / "requests.json").read_text()) for r in study["runs"]}
    timelines = {r["run"]: _read_csv(out / r["run"] / "timeline.csv") for r in study["runs"]}
    return study, rows, timelines


def render_report(out: Path, plots: bool = True) -> Path:
    """summary.csv, the PNG plots and report.md, from the files of `out`."""
    study, rows, timelines = load_study(out)
    runs = study["runs"]
    _write_csv(out / "summary.csv", [{k: _csv_value(r.get(k)) for k in CSV_COLUMNS} for r in runs])
    images: list[str] = []
    if plots:
        from load_tests import plots as plotting

        images = plotting.study_plots(out, runs, rows, timelines)
    report = out / "report.md"
    report.write_text(markdown_report(study, timelines, images))
    return report


def markdown_report(study: dict, timelines: dict[str, list[dict]], images: Sequence[str]) -> str:
    runs = study["runs"]
    first = runs[0] if runs else {}
    lines = [f"# pdserve load test: {study['mode']}", ""]
    lines += [
        f"- target: `{first.get('endpoint')}` ({first.get('backend')}), "
        f"model `{first.get('model_id')}`, {first.get('date')}",
        f"- workload: {first.get('dataset_name')}, input {first.get('input_len_dist') or 'from the dataset'} "
        f"(mean {_f(first.get('mean_input_len'), 1)}), output {first.get('output_len_dist') or 'from the dataset'} "
        f"(mean {_f(first.get('mean_output_len'), 1)}), seed {first.get('seed')}",
        f"- arrivals: {first.get('arrival')}, burstiness {first.get('burstiness')}, "
        f"max concurrency {first.get('max_concurrency') or 'none'}, {first.get('client_procs')} client process(es)",
        f"- SLO: {_slo_text(study.get('slo'))}",
        "",
    ]
    if "search" in study:
        s = study["search"]
        per_gpu = f" ({_f(s.get('goodput_rate_per_gpu'), 3)} req/s per GPU)" if s.get("goodput_rate_per_gpu") else ""
        lines += [
            "## Goodput (DistServe): highest rate meeting the SLO",
            "",
            f"**{_f(s.get('goodput_rate'), 3)} req/s**{per_gpu}; lowest failing rate measured: "
            f"{_f(s.get('lowest_failing_rate'), 3)} req/s; {s.get('num_runs')} runs.",
            "",
        ]
    lines += ["## Runs", ""]
    lines += [
        "| run | rate (req/s) | sent | ok | failed | req/s | out tok/s | goodput (req/s) | attainment | SLO met |"
        " p90 TTFT (ms) | p90 TPOT (ms) | p99 E2EL (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['run']} | {_f(r.get('request_rate'), 3)} | {r['num_sent']} | {r['completed']} | {r['failed']} "
            f"| {_f(r['request_throughput'], 3)} | {_f(r['output_throughput'], 1)} | {_f(r.get('request_goodput'), 3)} "
            f"| {_pct(r.get('slo_attainment'))} | {_yes(r.get('slo_met'))} | {_f(r.get('p90_ttft_ms'), 1)} "
            f"| {_f(r.get('p90_tpot_ms'), 2)} | {_f(r.get('p99_e2el_ms'), 1)} |"
        )
    lines.append("")
    for r in runs:
        lines += _run_section(r, timelines.get(r["run"], []))
    if images:
        lines += ["## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    lines += [
        "Definitions: TTFT first token − send; TPOT (last − first token) / (tokens − 1); ITL gaps between "
        "token messages; E2EL end of stream − send; goodput = requests that completed and met every SLO ÷ "
        "duration; attainment = the same ÷ requests sent. Field names follow `vllm bench serve`.",
        "",
    ]
    return "\n".join(lines)


def _run_section(r: dict, timeline: list[dict]) -> list[str]:
    lines = [f"### {r['run']}", ""]
    lines += ["| metric (ms) | mean | median | p90 | p99 | max |", "|---|---|---|---|---|---|"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        values = [_f(r.get(f"{s}_{name}_ms"), 2) for s in ("mean", "median", "p90", "p99", "max")]
        lines.append(f"| {name.upper()} | " + " | ".join(values) + " |")
    lines.append("")
    errors = r.get("errors_by_status") or {}
    lines.append(
        f"Duration {_f(r['duration'], 2)} s; {r['total_input_tokens']} "
        f"input and {r['total_output_tokens']} output tokens; "
        f"peak {r.get('max_concurrent_requests')} requests in flight, "
        f"{_f(r.get('max_output_tokens_per_s'), 0)} output tok/s "
        f"in one second; client send lag p99 {_f(r.get('p99_client_send_lag_ms'), 1)} ms. Errors by status: "
        + (", ".join(f"{k} {v}" for k, v in errors.items()) or "none")
        + "."
    )
    lines.append("")
    lines += _timeline_summary(timeline)
    return lines


def _timeline_summary(timeline: list[dict]) -> list[str]:
    """Per scraped process: peaks of queues and KV usage, mean transfer rate, role changes."""
    if not timeline:
        return ["No server metrics were sampled.", ""]
    lines = [
        "| process | roles seen | role changes | peak waiting | peak "
        "running | peak KV usage | mean KV send GB/s | peak in flight |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in sorted({row["target"] for row in timeline}):
        rows = [row for row in timeline if row["target"] == target]
        roles = [row["role"] for row in rows if row.get("role")]
        changes = sum(1 for a, b in itertools.pairwise(roles) if a != b)
        sends = [float(row["kv_send_gbps"]) for row in rows if row.get("kv_send_gbps") not in (None, "")]
        lines.append(
            f"| {target} | {', '.join(dict.fromkeys(roles)) or '-'} | {changes} | {_peak(rows, 'waiting')} "
            f"| {_peak(rows, 'running')} | {_peak(rows, 'kv_usage', pct=True)} "
            f"| {_f(sum(sends) / len(sends), 4) if sends else '-'} | {_peak(rows, 'inflight')} |"
        )
    lines.append("")
    return lines


def _peak(rows: list[dict], key: str, pct: bool = False) -> str:
    values = [float(row[key]) for row in rows if row.get(key) not in (None, "")]
    if not values:
        return "-"
    return _pct(max(values)) if pct else _f(max(values), 0)


def _slo_text(slo: dict | None) -> str:
    if not slo or not any(slo.get(k) for k in ("ttft_ms", "tpot_ms", "e2el_ms")):
        return "none"
    parts = [
        f"{n} ≤ {slo[k]:g} ms" for n, k in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("E2EL", "e2el_ms")) if slo.get(k)
    ]
    return ", ".join(parts) + f" for ≥ {slo['attainment']:.0%} of requests"


def _f(value, digits: int) -> str:
    if value is None or value == "":
        return "-"
    value = float(value)
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{float(value):.1%}"


def _yes(value) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _csv_value(value):
    if isinstance(value, dict):
        return ";".join(f"{k}:{v}" for k, v in value.items())
    return value


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["empty"])
        writer.writeheader()
        writer.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _dumps(value, compact: bool = False) -> str:
    if compact:  # the per-request files: one line, as vLLM writes its results
        return json.dumps(value, separators=(",", ":"), default=_json_default)
    return json.dumps(value, indent=1, default=_json_default)


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
