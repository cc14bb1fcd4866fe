"""When each request is sent: offsets in seconds from the start of a run, all seeded.

    poisson     exponential gaps with mean 1/rate (gamma with burstiness 1)
    gamma       gamma gaps with shape = burstiness, scale = 1 / (rate * burstiness): the same mean
                rate; burstiness < 1 is burstier than Poisson, > 1 more regular (vLLM's meaning)
    constant    exactly 1/rate apart
    trace       replayed timestamps from a file (JSON lines or CSV with a `timestamp` column, in
                seconds or milliseconds), optionally with `input_length` / `output_length`,
                sped up by a factor

A rate of `inf` sends everything at once; with a concurrency cap that is a closed loop at fixed
concurrency (each finished request lets the next one in).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARRIVAL_KINDS = ("poisson", "gamma", "constant", "trace")


@dataclass(frozen=True)
class ArrivalConfig:
    kind: str = "poisson"
    rate: float = math.inf  # requests per second
    burstiness: float = 1.0  # gamma shape
    seed: int = 0
    trace_path: str | None = None
    trace_time_unit: str = "s"  # s | ms
    trace_speedup: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(f"arrival process must be one of {', '.join(ARRIVAL_KINDS)}, got {self.kind!r}")
        if not self.rate > 0:
            raise ValueError(f"request rate must be > 0 (or inf), got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.kind == "trace" and not self.trace_path:
            raise ValueError("trace arrivals need a trace file (--trace FILE)")
        if self.trace_time_unit not in ("s", "ms") or not self.trace_speedup > 0:
            raise ValueError("trace time unit must be s or ms, and the speed-up > 0")

    def describe(self) -> str:
        if self.kind == "trace":
            return f"trace {Path(self.trace_path or '').name} x{self.trace_speedup:g}"
        if math.isinf(self.rate):
            return "all at once"
        extra = f", burstiness {self.burstiness:g}" if self.kind == "gamma" else ""
        return f"{self.kind} {self.rate:g} req/s{extra}"


@dataclass(frozen=True)
class TraceRow:
    offset_s: float
    input_length: int | None = None
    output_length: int | None = None


def arrival_offsets(config: ArrivalConfig, n: int) -> np.ndarray:
    """Send times of `n` requests, seconds from the start, non-decreasing; the first is 0
    (except in a trace, which keeps its own first offset relative to its first row)."""
    if config.kind == "trace":
        rows = read_trace(config)
        return np.array([rows[i % len(rows)].offset_s + _cycle_shift(rows, i) for i in range(n)])
    if math.isinf(config.rate):
        return np.zeros(n)
    rng = np.random.default_rng(config.seed)
    if config.kind == "constant":
        gaps = np.full(n, 1.0 / config.rate)
    else:
        shape = 1.0 if config.kind == "poisson" else config.burstiness
        gaps = rng.gamma(shape, 1.0 / (config.rate * shape), n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def _cycle_shift(rows: list[TraceRow], i: int) -> float:
    """A trace shorter than the run repeats, each pass after the previous one ends."""
    span = rows[-1].offset_s + (rows[-1].offset_s / max(1, len(rows) - 1))
    return (i // len(rows)) * span


def read_trace(config: ArrivalConfig) -> list[TraceRow]:
    """Rows of a trace file, offsets rebased to the first row and divided by the speed-up."""
    path = Path(config.trace_path or "")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read trace {str(path)!r}: {exc}") from None
    if path.suffix == ".csv":
        records = list(csv.DictReader(text.splitlines()))
    else:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"trace {str(path)!r} is not JSON lines: {exc}") from None
    if not records or any("timestamp" not in r for r in records):
        raise ValueError(f"trace {str(path)!r} needs a `timestamp` on every row")
    scale = (0.001 if config.trace_time_unit == "ms" else 1.0) / config.trace_speedup
    stamps = [float(r["timestamp"]) for r in records]
    first = min(stamps)
    rows = [
        TraceRow((t - first) * scale, _int_or_none(r.get("input_length")), _int_or_none(r.get("output_length")))
        for t, r in zip(stamps, records, strict=True)
    ]
    return sorted(rows, key=lambda row: row.offset_s)


def _int_or_none(value: object) -> int | None:
    if value in (None, ""):
        return None
    return int(float(value))  # type: ignore[arg-type]
