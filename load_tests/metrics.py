"""Latency metrics, throughput, SLO attainment and goodput from client-side records.

Definitions (per request; the ones `vllm bench serve` uses, names in brackets are GuideLLM's
and AIPerf's for the same quantity):

    TTFT   first message carrying a token − send time           [time_to_first_token]
    TPOT   (last token message − first token message) / (output tokens − 1); a one-token
           output has no TPOT and meets any TPOT SLO            [time_per_output_token;
                                                                  AIPerf's inter_token_latency]
    ITL    gaps between consecutive token-carrying messages (one per message, as vLLM does;
           the gRPC router sends one token per message)         [inter_token_latency]
    E2EL   end of stream − send time                            [request_latency]

Run-wide:

    duration             first scheduled send → last stream end (s)
    request_throughput   completed / duration
    output_throughput    output tokens of completed requests / duration
    request_goodput      requests that completed AND met every SLO / duration (vLLM's goodput)
    slo_attainment       the same count / requests sent (failed and cut-off requests miss)

DistServe's goodput — the highest request rate at which at least `attainment` of requests meet
both TTFT and TPOT SLOs — is what `pdserve bench search` finds; per GPU it is divided by GPUs.
Statistics: mean, median, std, min, max and the requested percentiles (numpy's linear
interpolation, as vLLM), reported in milliseconds as `{stat}_{metric}_ms`.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from load_tests.backends import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class Slo:
    """Per-request targets (None: no target on that metric) and the share that must meet them."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    attainment: float = 0.9

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"SLO {name} must be > 0, got {value}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"SLO attainment must be in (0, 1], got {self.attainment}")

    @classmethod
    def parse(cls, text: str, attainment: float = 0.9) -> Slo:
        """`ttft:1000 tpot:50` or `ttft:1000,tpot:50,e2el:5000` (milliseconds), like vLLM's --goodput."""
        values: dict[str, float] = {}
        for item in text.replace(",", " ").split():
            name, _, number = item.partition(":")
            if name not in ("ttft", "tpot", "e2el") or not number:
                raise ValueError(f"SLO item {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
            values[f"{name}_ms"] = float(number)
        return cls(**values, attainment=attainment)

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def describe(self) -> str:
        parts = [
            f"{n} ≤ {v:g} ms" for n, v in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("E2EL", self.e2el_ms)) if v
        ]
        return (", ".join(parts) or "none") + f" for ≥ {self.attainment:.0%} of requests"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RequestMetrics:
    """Derived per-request numbers in seconds (None where undefined)."""

    ttft: float | None
    tpot: float | None
    itl: list[float]
    e2el: float | None
    output_len: int
    meets_slo: bool


def request_metrics(record: RequestRecord, slo: Slo | None = None) -> RequestMetrics:
    if not record.success or not record.chunk_times:
        return RequestMetrics(None, None, [], record.ended_at - record.sent_at if record.success else None, 0, False)
    times = record.chunk_times
    ttft = times[0] - record.sent_at
    output_len = record.output_len
    tpot = (times[-1] - times[0]) / (output_len - 1) if output_len > 1 else None
    itl = [b - a for a, b in itertools.pairwise(times)]
    e2el = record.ended_at - record.sent_at
    return RequestMetrics(ttft, tpot, itl, e2el, output_len, meets_slo(ttft, tpot, e2el, slo))


def meets_slo(ttft: float, tpot: float | None, e2el: float, slo: Slo | None) -> bool:
    if slo is None:
        return True
    if slo.ttft_ms is not None and ttft * 1000 > slo.ttft_ms:
        return False
    if slo.tpot_ms is not None and tpot is not None and tpot * 1000 > slo.tpot_ms:
        return False
    return not (slo.e2el_ms is not None and e2el * 1000 > slo.e2el_ms)


def stats_ms(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """`mean_{name}_ms`, `median_…`, `std_…`, `min_…`, `max_…`, `p{P}_…` (None when empty)."""
    keys = ["mean", "median", "std", "min", "max", *(_pname(p) for p in percentiles)]
    if not len(values_s):
        return {f"{k}_{name}_ms": None for k in keys}
    ms = np.asarray(values_s, dtype=float) * 1000.0
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
        f"min_{name}_ms": float(ms.min()),
        f"max_{name}_ms": float(ms.max()),
    }
    for p in percentiles:
        out[f"{_pname(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def _pname(p: float) -> str:
    return f"p{p:g}".replace(".", "_")


def summarize(
    records: Sequence[RequestRecord],
    slo: Slo | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    start: float | None = None,
) -> dict:
    """The run summary (vLLM's result field names where vLLM has one), plus per-request arrays."""
    sent = [r for r in records if r.status != "NOT_SENT"]
    per = [request_metrics(r, slo) for r in sent]
    done = [(r, m) for r, m in zip(sent, per, strict=True) if r.success]
    t0 = start if start is not None else min((r.scheduled_at for r in sent), default=0.0)
    t1 = max((r.ended_at for r in sent), default=t0)
    duration = max(t1 - t0, 1e-9)
    total_in = sum(r.prompt_len for r, _ in done)
    total_out = sum(m.output_len for _, m in done)
    num_good = sum(m.meets_slo for _, m in done)
    statuses = Counter(r.status for r in sent if not r.success)
    lags = [max(0.0, r.sent_at - r.scheduled_at) for r in sent if r.sent_at]
    summary: dict = {
        "duration": duration,
        "num_prompts": len(records),
        "num_sent": len(sent),
        "completed": len(done),
        "failed": len(sent) - len(done),
        "errors_by_status": dict(sorted(statuses.items())),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "input_throughput": total_in / duration,
        "request_goodput": num_good / duration if slo and slo.is_set else None,
        "num_good": num_good if slo and slo.is_set else None,
        "slo_attainment": num_good / len(sent) if slo and slo.is_set and sent else None,
        "slo": slo.to_dict() if slo else None,
        "slo_met": (num_good / len(sent) >= slo.attainment) if slo and slo.is_set and sent else None,
        **_peaks(sent, t0),
        "mean_client_send_lag_ms": float(np.mean(lags) * 1000) if lags else None,
        "p99_client_send_lag_ms": float(np.percentile(lags, 99) * 1000) if lags else None,
    }
    series = {
        "ttft": [m.ttft for _, m in done if m.ttft is not None],
        "tpot": [m.tpot for _, m in done if m.tpot is not None],
        "itl": [x for _, m in done for x in m.itl],
        "e2el": [m.e2el for _, m in done if m.e2el is not None],
    }
    for name in LATENCY_METRICS:
        summary.update(stats_ms(name, series[name], percentiles))
    summary.update(
        {
            "input_lens": [r.prompt_len for r in sent],
            "output_lens": [m.output_len for m in per],
            "ttfts": [None if m.ttft is None else round(m.ttft, 6) for m in per],
            "itls": [[round(x, 6) for x in m.itl] for m in per],
            "errors": [r.error for r in sent],
        }
    )
    return summary


def _peaks(records: Sequence[RequestRecord], t0: float) -> dict:
    """Peak output tokens per 1-second bucket and peak requests in flight."""
    events = sorted([(r.sent_at, 1) for r in records if r.sent_at] + [(r.ended_at, -1) for r in records if r.sent_at])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    buckets: Counter[int] = Counter()
    for r in records:
        for when, count in zip(r.chunk_times, r.chunk_tokens, strict=True):
            buckets[math.floor(when - t0)] += count
    return {"max_output_tokens_per_s": float(max(buckets.values(), default=0)), "max_concurrent_requests": peak}


def per_request_rows(records: Sequence[RequestRecord], slo: Slo | None, start: float) -> list[dict]:
    """One flat row per request (the CSV and `requests.json`); times in ms, relative to the start."""
    rows = []
    for r in records:
        m = request_metrics(r, slo) if r.status != "NOT_SENT" else None

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000.0, 3)

        rows.append(
            {
                "index": r.index,
                "request_id": r.request_id,
                "status": r.status,
                "prompt_len": r.prompt_len,
                "max_tokens": r.max_tokens,
                "output_len": m.output_len if m else 0,
                "scheduled_ms": ms(r.scheduled_at - start),
                "sent_ms": ms(r.sent_at - start) if r.sent_at else None,
                "ttft_ms": ms(m.ttft) if m else None,
                "tpot_ms": ms(m.tpot) if m else None,
                "e2el_ms": ms(m.e2el) if m else None,
                "mean_itl_ms": ms(float(np.mean(m.itl))) if m and m.itl else None,
                "max_itl_ms": ms(max(m.itl)) if m and m.itl else None,
                "meets_slo": m.meets_slo if m else False,
                "error": r.error,
            }
        )
    return rows
