"""The three load modes: one run at a rate, a sweep of rates, and a search for the highest rate
that meets the SLO (DistServe's goodput).

    run      one `RunConfig` → one `RunResult`
    sweep    the same workload (same prompts) at each rate of a list
    search   doubles the rate from a start value while the SLO holds (halves while it does not),
             then bisects between the best passing and the lowest failing rate until they are
             within `tolerance` of each other or `max_runs` is spent; the answer is the highest
             passing rate measured. A run passes when its SLO attainment (requests that
             completed and met every target, over requests sent) is at least the target. Run k
             draws its prompts with seed + k (`fresh_prompts`): none is a prefix-cache hit on
             an earlier run's.

Every run is bounded in requests and seconds (`RunLimits`), so a search is bounded by
`max_runs` × (max_duration_s + drain_timeout_s).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from load_tests.arrivals import ArrivalConfig, arrival_offsets, read_trace
from load_tests.backends import BackendConfig, RequestRecord
from load_tests.metrics import DEFAULT_PERCENTILES, Slo, per_request_rows, summarize
from load_tests.runner import Progress, RunLimits, run_load
from load_tests.scrape import MetricsSampler, Target, timeline
from load_tests.workload import RequestSpec, WorkloadConfig, build_workload, summarize_lengths


@dataclass(frozen=True)
class RunConfig:
    backend: BackendConfig
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)
    limits: RunLimits = field(default_factory=RunLimits)
    slo: Slo = field(default_factory=Slo)
    max_concurrency: int | None = None
    num_procs: int = 1
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    scrape_targets: tuple[Target, ...] = ()
    scrape_interval_s: float = 1.0
    tokenizer_model: str = "tiny"  # whose tokenizer builds prompts and counts ShareGPT tokens
    warmup_requests: int = 0
    num_gpus: int | None = None  # of the deployment under test (for per-GPU goodput)
    progress: bool = True
    # Sweeps and searches: send rate × this many seconds of requests per run (at least 10, at
    # most the workload), so a high rate is held as long as a low one rather than over in a burst.
    seconds_per_run: float | None = None

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_procs < 1:
            raise ValueError(f"client processes must be >= 1, got {self.num_procs}")

    def at_rate(self, rate: float) -> RunConfig:
        return dataclasses.replace(self, arrival=dataclasses.replace(self.arrival, rate=rate))


@dataclass
class RunResult:
    """A run's summary (vLLM-shaped), its per-request rows and records, and the server timeline."""

    summary: dict
    rows: list[dict]
    timeline: list[dict]
    records: list[RequestRecord]

    @property
    def rate(self) -> float:
        return self.summary["request_rate"]


def build_specs(config: RunConfig) -> list[RequestSpec]:
    """The workload's requests; a trace with lengths overrides the sampled lengths."""
    workload = config.workload
    n = min(workload.num_requests, config.limits.max_requests)
    workload = dataclasses.replace(workload, num_requests=n)
    specs = build_workload(workload, config.tokenizer_model)
    if config.arrival.kind != "trace" or workload.kind == "sharegpt":
        return specs
    rows = read_trace(config.arrival)
    if not any(r.input_length or r.output_length for r in rows):
        return specs
    from load_tests.workload import TokenPool

    pool = TokenPool.for_model(config.tokenizer_model)
    import numpy as np

    rng = np.random.default_rng(workload.seed + 1)
    out = []
    for spec in specs:
        row = rows[spec.index % len(rows)]
        prompt_len = row.input_length or spec.prompt_len
        prompt = pool.draw(rng, prompt_len) if row.input_length else spec.prompt
        out.append(
            dataclasses.replace(
                spec, prompt=prompt, prompt_len=prompt_len, max_tokens=row.output_length or spec.max_tokens
            )
        )
    return out


def execute(config: RunConfig, specs: Sequence[RequestSpec] | None = None, label: str = "") -> RunResult:
    """One bounded run: warm-up (not recorded), then the load, with the server sampled throughout."""
    specs = list(specs) if specs is not None else build_specs(config)
    rate = config.arrival.rate
    if config.seconds_per_run and math.isfinite(rate) and config.arrival.kind != "trace":
        specs = specs[: max(10, math.ceil(rate * config.seconds_per_run))]
    if config.warmup_requests:
        warm = [dataclasses.replace(s, max_tokens=min(s.max_tokens, 4)) for s in specs[: config.warmup_requests]]
        run_load(config.backend, warm, [0.0] * len(warm), RunLimits(len(warm), 30, 30), max_concurrency=4)
    offsets = arrival_offsets(config.arrival, len(specs))
    progress = Progress(len(specs), label or config.arrival.describe(), enabled=config.progress)
    sampler = MetricsSampler(list(config.scrape_targets), config.scrape_interval_s)
    began_wall = time.time()
    with sampler:
        start, records = run_load(
            config.backend, specs, offsets, config.limits, config.max_concurrency, config.num_procs, progress
        )
    summary = summarize(records, config.slo, config.percentiles, start=start)
    summary = {**describe(config, specs, began_wall), **summary}
    if config.num_gpus and summary["request_goodput"] is not None:
        summary["request_goodput_per_gpu"] = summary["request_goodput"] / config.num_gpus
    summary["scrape_failures"] = dict(sampler.failures)
    return RunResult(summary, per_request_rows(records, config.slo, start), timeline(sampler.samples, start), records)


def describe(config: RunConfig, specs: Sequence[RequestSpec], began_wall: float) -> dict:
    """The run's settings, in vLLM's field names where vLLM has one."""
    arrival, workload = config.arrival, config.workload
    return {
        "date": datetime.datetime.fromtimestamp(began_wall).strftime("%Y%m%d-%H%M%S"),
        "backend": config.backend.kind,
        "endpoint": config.backend.target,
        "model_id": config.backend.model or config.tokenizer_model,
        "tokenizer_id": config.tokenizer_model,
        "request_rate": arrival.rate if arrival.kind != "trace" else None,
        "arrival": arrival.kind,
        "burstiness": arrival.burstiness,
        "max_concurrency": config.max_concurrency,
        "client_procs": config.num_procs,
        "dataset_name": workload.kind,
        "input_len_dist": workload.input_len.describe() if workload.kind != "sharegpt" else None,
        "output_len_dist": workload.output_len.describe() if workload.kind != "sharegpt" else None,
        "seed": workload.seed,
        "max_duration_s": config.limits.max_duration_s,
        "num_gpus": config.num_gpus,
        **summarize_lengths(specs),
    }


def sweep(
    config: RunConfig, rates: Sequence[float], on_result: Callable[[RunResult], None] | None = None
) -> list[RunResult]:
    """The same prompts at each rate, lowest first."""
    specs = build_specs(config)
    results = []
    for rate in sorted(rates):
        result = execute(config.at_rate(rate), specs, label=f"rate {rate:g}")
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


@dataclass(frozen=True)
class SearchResult:
    best_rate: float | None  # highest measured rate that met the SLO (None: none did)
    lowest_failing_rate: float | None
    runs: list[RunResult]

    def to_dict(self, num_gpus: int | None) -> dict:
        best = self.best_rate
        return {
            "goodput_rate": best,
            "goodput_rate_per_gpu": best / num_gpus if best is not None and num_gpus else None,
            "lowest_failing_rate": self.lowest_failing_rate,
            "num_runs": len(self.runs),
        }


def fresh_prompts(config: RunConfig, run_index: int) -> RunConfig:
    """`config` with its workload seed moved on by `run_index`: each run of a search sends prompts
    of its own, so a server's prefix cache cannot serve a later run the prompts of an earlier one
    (that made every run after the first cheaper than the load it stood for)."""
    workload = dataclasses.replace(config.workload, seed=config.workload.seed + run_index)
    return dataclasses.replace(config, workload=workload)


def search(
    config: RunConfig,
    start_rate: float = 1.0,
    max_runs: int = 8,
    tolerance: float = 0.1,
    min_rate: float = 0.01,
    max_rate: float = 1e4,
    on_result: Callable[[RunResult], None] | None = None,
) -> SearchResult:
    """The highest request rate whose run meets `config.slo` (see the module doc)."""
    if not config.slo.is_set:
        raise ValueError("search needs an SLO (--slo 'ttft:1000 tpot:50')")
    if not (start_rate > 0 and math.isfinite(start_rate)):
        raise ValueError(f"the search's start rate must be finite and > 0, got {start_rate}")
    runs: list[RunResult] = []
    good: float | None = None
    bad: float | None = None

    def passes(rate: float) -> bool:
        run_config = fresh_prompts(config.at_rate(rate), len(runs))
        label = f"search {len(runs) + 1}/{max_runs} rate {rate:.3g}"
        result = execute(run_config, build_specs(run_config), label=label)
        runs.append(result)
        if on_result is not None:
            on_result(result)
        return bool(result.summary["slo_met"])

    rate = start_rate
    while len(runs) < max_runs:
        if passes(rate):
            good = rate if good is None else max(good, rate)
            if bad is not None:
                break
            if rate * 2 > max_rate:
                break
            rate *= 2
        else:
            bad = rate if bad is None else min(bad, rate)
            if good is not None:
                break
            if rate / 2 < min_rate:
                break
            rate /= 2
    while good is not None and bad is not None and len(runs) < max_runs and (bad - good) / good > tolerance:
        rate = (good + bad) / 2
        if passes(rate):
            good = rate
        else:
            bad = rate
    return SearchResult(good, bad, runs)
