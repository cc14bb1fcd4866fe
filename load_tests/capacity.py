"""Capacity planning: how many prefill and decode workers (and GPUs) a traffic needs at an SLO.

1. Profile (`profile`): measure per-worker capacity curves on the cluster under test, through
   its public API (so transfer and routing costs are in the numbers):

     prefill   for each prompt length L: the unloaded TTFT (a few requests one at a time, one
               output token) and the saturated prefill rate (requests kept in flight on every
               prefill worker) → tokens/s per prefill worker
     decode    for each batch size B (per decode worker) and context C: B × workers requests
               started together (prompt C, `output_len` tokens, ignore_eos); the steady TPOT is
               read in the window where all of them are decoding → TPOT(B, C) and B / TPOT
               tokens/s per decode worker

   Prefill curves are interpolated piecewise-linearly in L (clamped at the ends, flagged in the
   plan). Decode steps are fitted as TPOT(B, C) = a + b·B + c·B·C by least squares (c = 0 when
   one context was measured): weights are read once per step, KV once per sequence-token.

2. Plan (`plan`) for a traffic (rate λ, input and output length distributions, SLO):

     prefill   service rate per worker μ = tokens/s(L̄) / L̄; M/M/c queue (Erlang C) with c
               workers: P(wait > t) = C(c, λ/μ)·exp(−(cμ − λ)t), so the q-quantile wait is
               ln(C / (1 − q)) / (cμ − λ); predicted q-quantile TTFT = unloaded TTFT at the
               q-quantile prompt + that wait (adding quantiles is conservative). P = the
               fewest workers whose predicted TTFT meets the target (q = the attainment target).
     decode    concurrent sequences S = λ × mean output × TPOT target (Little's law at the
               target, an upper bound); per worker the largest batch with TPOT(B, C̄) ≤ target
               at the mean context C̄ = L̄ + Ō/2, times a headroom (batch size fluctuates),
               capped by KV room (KV tokens / (L̄ + Ō)); D = ⌈S / that batch⌉.
     colocated M mixed workers share time: prefill takes x = (λ/M)·L̄ / tokens/s(L̄) of each
               worker, decode steps y = TPOT(B_M)/target with B_M = S/M; decode steps stretch
               by 1/(1 − x), so TPOT ≈ TPOT(B_M)/(1 − x) must meet the target; prefill runs the
               M/M/c above with μ(1 − y) and an unloaded TTFT stretched by 1/(1 − y). M = the
               fewest workers meeting both. GPUs = workers × GPUs per worker.

3. Validate (`validate`): start the recommended shape with the local launcher, run the traffic
   bounded in requests and seconds, and compare SLO attainment with the target.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from load_tests.backends import BackendConfig, RequestRecord
from load_tests.metrics import Slo, request_metrics
from load_tests.runner import RunLimits, run_load
from load_tests.workload import LengthDist, RequestSpec, TokenPool


@dataclass(frozen=True)
class PrefillPoint:
    prompt_len: int
    latency_s: float  # unloaded TTFT (median)
    tokens_per_s: float  # per prefill worker, saturated


@dataclass(frozen=True)
class DecodePoint:
    batch: int  # per decode worker
    context: int
    tpot_s: float  # steady TPOT (median over requests)
    tokens_per_s: float  # per decode worker


@dataclass
class CapacityProfile:
    model: str
    target: str
    num_prefill: int
    num_decode: int
    gpus_per_worker: int = 1
    kv_tokens_per_worker: int | None = None
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    date: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CapacityProfile:
        data = dict(data)
        data["prefill"] = [PrefillPoint(**p) for p in data.get("prefill", [])]
        data["decode"] = [DecodePoint(**p) for p in data.get("decode", [])]
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CapacityProfile:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"cannot read capacity profile {str(path)!r}: {exc}") from None

    # -- curves ---------------------------------------------------------------------------------

    def _prefill_xy(self, attr: str) -> tuple[np.ndarray, np.ndarray]:
        if not self.prefill:
            raise ValueError("the capacity profile has no prefill points")
        points = sorted(self.prefill, key=lambda p: p.prompt_len)
        return np.array([p.prompt_len for p in points], float), np.array([getattr(p, attr) for p in points], float)

    def prefill_tokens_per_s(self, prompt_len: float) -> float:
        xs, ys = self._prefill_xy("tokens_per_s")
        return float(np.interp(prompt_len, xs, ys))

    def prefill_latency_s(self, prompt_len: float) -> float:
        xs, ys = self._prefill_xy("latency_s")
        if prompt_len > xs[-1] and len(xs) > 1:  # longer than measured: extrapolate the last slope
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return float(ys[-1] + max(0.0, slope) * (prompt_len - xs[-1]))
        return float(np.interp(prompt_len, xs, ys))

    def prefill_range(self) -> tuple[int, int]:
        xs, _ = self._prefill_xy("latency_s")
        return int(xs[0]), int(xs[-1])

    def decode_fit(self) -> tuple[float, float, float]:
        """(a, b, c) of TPOT(B, C) = a + b·B + c·B·C, in seconds."""
        if len(self.decode) < 2:
            raise ValueError("the capacity profile needs at least two decode points to fit TPOT(B)")
        batch = np.array([p.batch for p in self.decode], float)
        context = np.array([p.context for p in self.decode], float)
        tpot = np.array([p.tpot_s for p in self.decode], float)
        if len(set(context.tolist())) > 1:
            design = np.stack([np.ones_like(batch), batch, batch * context], axis=1)
            a, b, c = np.linalg.lstsq(design, tpot, rcond=None)[0]
        else:
            design = np.stack([np.ones_like(batch), batch], axis=1)
            (a, b), c = np.linalg.lstsq(design, tpot, rcond=None)[0], 0.0
        return float(max(a, 0.0)), float(max(b, 1e-9)), float(max(c, 0.0))

    def tpot_s(self, batch: float, context: float) -> float:
        a, b, c = self.decode_fit()
        return a + b * batch + c * batch * context

    def max_batch(self, tpot_s: float, context: float) -> float:
        """The largest (fractional) batch per decode worker whose fitted TPOT meets `tpot_s`."""
        a, b, c = self.decode_fit()
        return max(0.0, (tpot_s - a) / (b + c * context))


# ---------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileConfig:
    prompt_lens: tuple[int, ...] = (64, 128, 256, 512)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    contexts: tuple[int, ...] = (128,)
    decode_output_len: int = 48
    unloaded_requests: int = 3
    saturated_requests_per_worker: int = 8
    saturated_concurrency_per_worker: int = 4
    seed: int = 0
    timeout_s: float = 120.0  # bounds each measurement


def profile(
    backend: BackendConfig,
    num_prefill: int,
    num_decode: int,
    config: ProfileConfig = ProfileConfig(),
    model: str = "tiny",
    gpus_per_worker: int = 1,
    kv_tokens_per_worker: int | None = None,
    log=print,
) -> CapacityProfile:
    """Measure the per-worker curves of the cluster behind `backend` (see the module doc)."""
    if backend.kind != "grpc":
        backend = dataclasses.replace(backend, kind="grpc")  # exact token counts per message
    pool = TokenPool.for_model(model)
    rng = np.random.default_rng(config.seed)
    limits = RunLimits(10_000, config.timeout_s, config.timeout_s)
    result = CapacityProfile(
        model, backend.target, num_prefill, num_decode, gpus_per_worker, kv_tokens_per_worker,
        date=datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
    )  # fmt: skip
    prefill_workers = max(1, num_prefill)
    warmup = [RequestSpec(i, pool.draw(rng, config.prompt_lens[0]), config.prompt_lens[0], 4) for i in range(4)]
    run_load(backend, warmup, [0.0] * len(warmup), limits, max_concurrency=2)  # first requests pay for set-up
    for length in config.prompt_lens:
        specs = [RequestSpec(i, pool.draw(rng, length), length, 1) for i in range(config.unloaded_requests)]
        _, records = run_load(backend, specs, [0.0] * len(specs), limits, max_concurrency=1)
        ttfts = [m.ttft for m in map(request_metrics, records) if m.ttft is not None]
        n = config.saturated_requests_per_worker * prefill_workers
        specs = [RequestSpec(i, pool.draw(rng, length), length, 1) for i in range(n)]
        concurrency = config.saturated_concurrency_per_worker * prefill_workers
        _, records = run_load(backend, specs, [0.0] * n, limits, max_concurrency=concurrency)
        done = [r for r in records if r.success]
        if not ttfts or not done:
            raise RuntimeError(f"prefill profile at {length} tokens failed: {_first_error(records)}")
        span = max(r.ended_at for r in done) - min(r.sent_at for r in done)
        tokens_per_s = sum(r.prompt_len for r in done) / span / prefill_workers
        point = PrefillPoint(length, float(np.median(ttfts)), tokens_per_s)
        result.prefill.append(point)
        log(
            f"prefill  L={length:<6} unloaded TTFT {point.latency_s * 1000:8.1f} "
            f"ms   {tokens_per_s:10.0f} tok/s per worker"
        )
    for context in config.contexts:
        for batch in config.batches:
            n = batch * max(1, num_decode)
            specs = [RequestSpec(i, pool.draw(rng, context), context, config.decode_output_len) for i in range(n)]
            _, records = run_load(backend, specs, [0.0] * n, limits)
            tpot = steady_tpot(records)
            if tpot is None:
                raise RuntimeError(f"decode profile at batch {batch} failed: {_first_error(records)}")
            point = DecodePoint(batch, context, tpot, batch / tpot)
            result.decode.append(point)
            log(
                f"decode   B={batch:<4} C={context:<6} TPOT {tpot * 1000:8.2f} "
                f"ms   {point.tokens_per_s:10.0f} tok/s per worker"
            )
    return result


def steady_tpot(records: Sequence[RequestRecord]) -> float | None:
    """Median time per token while every request of a batch was decoding (the window from the
    last first token to the first last token); the whole-request TPOT when that window is short."""
    done = [r for r in records if r.success and len(r.chunk_times) > 2]
    if not done:
        return None
    begin = max(r.chunk_times[0] for r in done)
    end = min(r.chunk_times[-1] for r in done)
    per_request = []
    for r in done:
        times = [t for t in r.chunk_times if begin <= t <= end]
        if len(times) >= 4:
            per_request.append((times[-1] - times[0]) / (len(times) - 1))
    if len(per_request) < max(1, len(done) // 2):
        per_request = [(r.chunk_times[-1] - r.chunk_times[0]) / (len(r.chunk_times) - 1) for r in done]
    return float(np.median(per_request))


def _first_error(records: Sequence[RequestRecord]) -> str:
    failed = [r for r in records if not r.success]
    return f"{failed[0].status}: {failed[0].error}" if failed else "no tokens streamed"


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    rate: float
    input_len: LengthDist
    output_len: LengthDist
    slo: Slo

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"traffic rate must be finite and > 0 req/s, got {self.rate}")
        if self.slo.ttft_ms is None or self.slo.tpot_ms is None:
            raise ValueError("planning needs both a TTFT and a TPOT target")

    @classmethod
    def load(cls, path: str | Path) -> Traffic:
        """YAML or JSON: {rate, input, output, slo: {ttft_ms, tpot_ms, attainment}}; lengths as
        `lognormal:512:0.6` strings or {dist: ..., ...} dicts."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read traffic file {str(path)!r}: {exc}") from None
        if not isinstance(data, dict) or not {"rate", "input", "output", "slo"} <= set(data):
            raise ValueError(f"traffic file {str(path)!r} needs rate, input, output and slo")
        slo = data["slo"]
        if not isinstance(slo, dict):
            raise ValueError("traffic slo must be a mapping {ttft_ms, tpot_ms, attainment}")
        return cls(
            float(data["rate"]),
            LengthDist.parse(data["input"]),
            LengthDist.parse(data["output"]),
            Slo(slo.get("ttft_ms"), slo.get("tpot_ms"), slo.get("e2el_ms"), float(slo.get("attainment", 0.9))),
        )

    def to_dict(self) -> dict:
        return {
            "rate": self.rate,
            "input": self.input_len.describe(),
            "output": self.output_len.describe(),
            "slo": self.slo.to_dict(),
        }


@dataclass
class Plan:
    traffic: Traffic
    num_prefill: int | None
    num_decode: int | None
    num_mixed: int | None
    gpus_per_worker: int
    lines: list[str]
    predicted: dict = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)

    @property
    def disaggregated_gpus(self) -> int | None:
        if self.num_prefill is None or self.num_decode is None:
            return None
        return (self.num_prefill + self.num_decode) * self.gpus_per_worker

    @property
    def colocated_gpus(self) -> int | None:
        return None if self.num_mixed is None else self.num_mixed * self.gpus_per_worker

    def to_dict(self) -> dict:
        return {
            "traffic": self.traffic.to_dict(),
            "num_prefill": self.num_prefill,
            "num_decode": self.num_decode,
            "num_mixed": self.num_mixed,
            "gpus_per_worker": self.gpus_per_worker,
            "disaggregated_gpus": self.disaggregated_gpus,
            "colocated_gpus": self.colocated_gpus,
            "predicted": self.predicted,
            "arithmetic": self.lines,
            "validation": self.validation,
        }


def erlang_c(servers: int, load: float) -> float:
    """Probability an arrival waits in an M/M/c queue with `servers` and offered load λ/μ."""
    if load >= servers:
        return 1.0
    blocking = 1.0
    for k in range(1, servers + 1):  # Erlang B, the stable recurrence
        blocking = load * blocking / (k + load * blocking)
    rho = load / servers
    return blocking / (1 - rho * (1 - blocking))


def mmc_wait_quantile(servers: int, arrival_rate: float, service_rate: float, q: float) -> float:
    """The q-quantile of the waiting time in M/M/c (inf when the queue is unstable)."""
    capacity = servers * service_rate
    if arrival_rate >= capacity:
        return math.inf
    wait_prob = erlang_c(servers, arrival_rate / service_rate)
    if wait_prob <= 1 - q:
        return 0.0
    return math.log(wait_prob / (1 - q)) / (capacity - arrival_rate)


MAX_WORKERS = 4096


def plan(
    profile_: CapacityProfile,
    traffic: Traffic,
    gpus_per_worker: int | None = None,
    decode_headroom: float = 0.9,
) -> Plan:
    """Worker counts for `traffic` from the measured curves, with the arithmetic spelled out."""
    gpus = gpus_per_worker or profile_.gpus_per_worker
    lam, slo = traffic.rate, traffic.slo
    q = slo.attainment
    ttft_s, tpot_s = slo.ttft_ms / 1000, slo.tpot_ms / 1000  # type: ignore[operator]
    mean_in, mean_out = traffic.input_len.mean, traffic.output_len.mean
    in_q = traffic.input_len.quantile(q)
    lines = [
        f"Traffic: {lam:g} req/s; input {traffic.input_len.describe()} "
        f"(mean {mean_in:.0f}, p{q * 100:g} {in_q:.0f} tokens); "
        f"output {traffic.output_len.describe()} (mean {mean_out:.0f}); SLO {slo.describe()}.",
        f"Profile: {profile_.target} ({profile_.model}), measured {profile_.date} on {profile_.num_prefill} prefill + "
        f"{profile_.num_decode} decode worker(s), {gpus} GPU(s) per worker.",
        "",
    ]
    notes = _range_notes(profile_, mean_in, in_q)
    tps = profile_.prefill_tokens_per_s(mean_in)
    mu = tps / mean_in
    latency_q = profile_.prefill_latency_s(in_q)
    lines += [
        "Prefill",
        f"  demand       {lam:g} req/s × {mean_in:.0f} tokens = {lam * mean_in:,.0f} prompt tokens/s",
        f"  per worker   {tps:,.0f} tokens/s at {mean_in:.0f} tokens "
        f"→ μ = {tps:,.0f} / {mean_in:.0f} = {mu:.2f} req/s; "
        f"offered load λ/μ = {lam / mu:.2f} workers",
        f"  unloaded     TTFT of a p{q * 100:g} prompt ({in_q:.0f} tokens) = {latency_q * 1000:.1f} ms",
    ]
    num_prefill, prefill_pred = _prefill_servers(lam, mu, latency_q, ttft_s, q)
    if num_prefill is None:
        lines.append(f"  ✗ the unloaded TTFT alone exceeds the {slo.ttft_ms:g} ms target: no prefill count meets it")
    else:
        lines.append(
            f"  queueing     M/M/c with c = {num_prefill}: utilisation {lam / (num_prefill * mu):.1%}, "
            f"P(wait) = {prefill_pred['wait_probability']:.3f}, "
            f"p{q * 100:g} wait = {prefill_pred['wait_s'] * 1000:.1f} ms"
        )
        lines.append(
            f"  → {num_prefill} prefill worker(s): predicted p{q * 100:g} TTFT {latency_q * 1000:.1f} + "
            f"{prefill_pred['wait_s'] * 1000:.1f} = {prefill_pred['ttft_s'] * 1000:.1f} ms ≤ {slo.ttft_ms:g} ms"
        )
    context = mean_in + mean_out / 2
    a, b, c = profile_.decode_fit()
    concurrent = lam * mean_out * tpot_s
    batch_tpot = profile_.max_batch(tpot_s, context)
    batch_cap = batch_tpot * decode_headroom
    kv_batch = profile_.kv_tokens_per_worker / (mean_in + mean_out) if profile_.kv_tokens_per_worker else math.inf
    per_worker = min(batch_cap, kv_batch)
    lines += [
        "",
        "Decode",
        f"  fit          TPOT(B, C) = {a * 1000:.2f} + {b * 1000:.3f}·B"
        + (f" + {c * 1e6:.4f}e-3·B·C" if c else "")
        + " ms",
        f"  concurrency  S = {lam:g} req/s × {mean_out:.0f} tokens "
        f"× {tpot_s:.3f} s = {concurrent:.1f} sequences in flight",
        f"  per worker   largest batch with TPOT ≤ {slo.tpot_ms:g} ms at context {context:.0f}: {batch_tpot:.1f}; "
        f"× {decode_headroom:g} headroom = {batch_cap:.1f}"
        + (
            f"; KV room {profile_.kv_tokens_per_worker} / {mean_in + mean_out:.0f} = {kv_batch:.1f}"
            if math.isfinite(kv_batch)
            else ""
        ),
    ]
    num_decode = math.ceil(concurrent / per_worker - 1e-9) if per_worker >= 1 else None
    if num_decode is None:
        lines.append(f"  ✗ not even one sequence per worker meets TPOT ≤ {slo.tpot_ms:g} ms")
    else:
        num_decode = max(1, num_decode)
        lines.append(f"  → ⌈{concurrent:.1f} / {per_worker:.1f}⌉ = {num_decode} decode worker(s)")
    if max(b_ for b_ in (p.batch for p in profile_.decode)) < min(per_worker, concurrent / max(1, num_decode or 1)):
        notes.append(
            f"decode batch {per_worker:.0f} is beyond the largest measured batch: the TPOT fit is extrapolated"
        )
    num_mixed, mixed_lines, mixed_pred = _colocated(
        profile_, lam, mean_in, mean_out, in_q, ttft_s, tpot_s, q, context, kv_batch
    )
    lines += ["", "Colocated (mixed workers, time-sharing model)", *mixed_lines]
    result = Plan(
        traffic, num_prefill, num_decode, num_mixed, gpus, lines, {"prefill": prefill_pred, "colocated": mixed_pred}
    )
    lines += ["", "Recommendation"]
    if result.disaggregated_gpus is not None:
        workers = result.disaggregated_gpus // gpus
        lines.append(
            f"  disaggregated  {num_prefill} prefill + {num_decode} decode = {workers} workers × {gpus} GPU"
            f" = {result.disaggregated_gpus} GPUs ({lam / result.disaggregated_gpus:.2f} req/s per GPU)"
        )
    if result.colocated_gpus is not None:
        lines.append(
            f"  colocated      {num_mixed} mixed workers × {gpus} GPU = {result.colocated_gpus} GPUs "
            f"({lam / result.colocated_gpus:.2f} req/s per GPU)"
        )
    if result.disaggregated_gpus is not None and result.colocated_gpus is not None:
        if result.disaggregated_gpus == result.colocated_gpus:
            lines.append(f"  → both need {result.colocated_gpus} GPUs for this traffic and SLO")
        else:
            better = "disaggregated" if result.disaggregated_gpus < result.colocated_gpus else "colocated"
            lines.append(f"  → {better} needs fewer GPUs for this traffic and SLO")
    if notes:
        lines += ["", "Notes", *(f"  - {n}" for n in notes)]
    return result


def _prefill_servers(lam: float, mu: float, latency_q: float, ttft_s: float, q: float) -> tuple[int | None, dict]:
    if latency_q > ttft_s:
        return None, {}
    for servers in range(max(1, math.floor(lam / mu) + 1), MAX_WORKERS):
        wait = mmc_wait_quantile(servers, lam, mu, q)
        if latency_q + wait <= ttft_s:
            pred = {"wait_probability": erlang_c(servers, lam / mu), "wait_s": wait, "ttft_s": latency_q + wait}
            return servers, pred
    return None, {}


def _colocated(
    profile_, lam, mean_in, mean_out, in_q, ttft_s, tpot_s, q, context, kv_batch
) -> tuple[int | None, list[str], dict]:
    tps = profile_.prefill_tokens_per_s(mean_in)
    mu = tps / mean_in
    concurrent = lam * mean_out * tpot_s
    for workers in range(1, MAX_WORKERS):
        share = lam / workers
        x = share * mean_in / tps
        batch = concurrent / workers
        step_tpot = profile_.tpot_s(batch, context)
        y = step_tpot / tpot_s
        if x + y >= 1 or batch > kv_batch:
            continue
        tpot = step_tpot / (1 - x)
        wait = mmc_wait_quantile(workers, lam, mu * (1 - y), q)
        ttft = profile_.prefill_latency_s(in_q) / (1 - y) + wait
        if tpot <= tpot_s and ttft <= ttft_s:
            lines = [
                f"  M = {workers}: each gets {share:.2f} req/s; prefill share "
                f"x = {share:.2f} × {mean_in:.0f} / {tps:,.0f} = {x:.1%}",
                f"         batch B = {concurrent:.1f} / {workers} = {batch:.1f}; "
                f"decode step share y = TPOT({batch:.1f}) / target "
                f"= {step_tpot * 1000:.2f} / {tpot_s * 1000:g} = {y:.1%}",
                f"         TPOT ≈ {step_tpot * 1000:.2f} / (1 − x) = {tpot * 1000:.2f} ms ≤ {tpot_s * 1000:g} ms; "
                f"p{q * 100:g} TTFT ≈ {profile_.prefill_latency_s(in_q) * 1000:.1f} "
                f"/ (1 − y) + {wait * 1000:.1f} = {ttft * 1000:.1f} ms "
                f"≤ {ttft_s * 1000:g} ms",
                f"  → {workers} mixed worker(s)",
            ]
            return workers, lines, {"x": x, "y": y, "tpot_s": tpot, "ttft_s": ttft}
    return None, ["  ✗ no count of mixed workers meets both targets in this model"], {}


def _range_notes(profile_: CapacityProfile, mean_in: float, in_q: float) -> list[str]:
    low, high = profile_.prefill_range()
    notes = []
    if mean_in < low or in_q > high:
        notes.append(
            f"prompt lengths outside the measured {low}–{high} tokens: prefill curves are clamped/extrapolated"
        )
    return notes


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalShape:
    """How to start local clusters for profiling and validation."""

    model: str = "tiny"
    device: str = "cpu"
    worker_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    max_workers: int = 4  # refuse to validate shapes larger than this on one machine


def validate(
    plan_: Plan,
    shape: LocalShape,
    limits: RunLimits,
    num_requests: int,
    seed: int = 0,
    colocated: bool = False,
    log=print,
) -> list[dict]:
    """Run the planned shape(s) locally at the traffic's rate; returns one dict per shape."""
    from cluster.launcher import ClusterSpec, LocalCluster
    from load_tests.arrivals import ArrivalConfig
    from load_tests.modes import RunConfig, execute
    from load_tests.scrape import targets_from_cluster
    from load_tests.workload import WorkloadConfig

    shapes = []
    if plan_.num_prefill is not None and plan_.num_decode is not None:
        shapes.append(("disaggregated", plan_.num_prefill, plan_.num_decode, 0))
    if colocated and plan_.num_mixed is not None:
        shapes.append(("colocated", 0, 0, plan_.num_mixed))
    traffic = plan_.traffic
    out = []
    for name, num_p, num_d, num_m in shapes:
        if num_p + num_d + num_m > shape.max_workers:
            log(
                f"validation of {name} ({num_p}P {num_d}D {num_m}M) "
                f"skipped: more than {shape.max_workers} local workers"
            )
            out.append({"shape": name, "skipped": f"more than {shape.max_workers} workers"})
            continue
        spec = ClusterSpec(
            model=shape.model, num_prefill=num_p, num_decode=num_d, num_mixed=num_m, device=shape.device,
            router_port=0, http_port=-1, worker_args=shape.worker_args, router_args=shape.router_args,
        )  # fmt: skip
        log(f"validating {name}: {num_p} prefill + {num_d} decode + {num_m} mixed workers at {traffic.rate:g} req/s")
        with LocalCluster(spec) as cluster:
            config = RunConfig(
                backend=BackendConfig(
                    "grpc", cluster.address, request_timeout_s=limits.max_duration_s + limits.drain_timeout_s
                ),
                workload=WorkloadConfig("random", num_requests, traffic.input_len, traffic.output_len, seed=seed),
                arrival=ArrivalConfig("poisson", traffic.rate, seed=seed),
                limits=limits,
                slo=traffic.slo,
                scrape_targets=tuple(targets_from_cluster(cluster)),
                tokenizer_model=shape.model,
                warmup_requests=2,
                num_gpus=(num_p + num_d + num_m) * plan_.gpus_per_worker,
            )
            result = execute(config, label=f"validate {name}")
        s = result.summary
        entry = {
            "shape": name,
            "num_prefill": num_p,
            "num_decode": num_d,
            "num_mixed": num_m,
            "rate": traffic.rate,
            "num_sent": s["num_sent"],
            "slo_attainment": s["slo_attainment"],
            "target": traffic.slo.attainment,
            "passed": bool(s["slo_met"]),
            f"p{traffic.slo.attainment * 100:g}_ttft_ms": _quantile(result.rows, "ttft_ms", traffic.slo.attainment),
            f"p{traffic.slo.attainment * 100:g}_tpot_ms": _quantile(result.rows, "tpot_ms", traffic.slo.attainment),
            "request_goodput": s["request_goodput"],
        }
        out.append(entry)
        log(
            f"  attainment {s['slo_attainment']:.1%} (target "
            f"{traffic.slo.attainment:.0%}) over {s['num_sent']} requests: " + ("PASS" if entry["passed"] else "FAIL")
        )
    return out


def _quantile(rows: list[dict], key: str, q: float) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.quantile(values, q)) if values else None


def plan_markdown(plan_: Plan) -> str:
    q = f"p{plan_.traffic.slo.attainment * 100:g}"
    lines = ["# pdserve capacity plan", "", "```", *plan_.lines, "```", ""]
    if plan_.validation:
        lines += ["## Validation on the local launcher", ""]
        lines += [
            f"| shape | P | D | mixed | rate | sent | attainment | target | {q} TTFT (ms) | {q} TPOT (ms) | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in plan_.validation:
            if "skipped" in v:
                lines.append(f"| {v['shape']} | | | | | | | | | | skipped: {v['skipped']} |")
                continue
            ttft, tpot = v.get(f"{q}_ttft_ms"), v.get(f"{q}_tpot_ms")
            lines.append(
                f"| {v['shape']} | {v['num_prefill']} | {v['num_decode']} | {v['num_mixed']} | {v['rate']:g} "
                f"| {v['num_sent']} | {v['slo_attainment']:.1%} | {v['target']:.0%} "
                f"| {'-' if ttft is None else f'{ttft:.1f}'} | {'-' if tpot is None else f'{tpot:.2f}'} "
                f"| {'PASS' if v['passed'] else 'FAIL'} |"
            )
        lines.append("")
    return "\n".join(lines)


def profile_markdown(p: CapacityProfile) -> str:
    lines = [
        "# pdserve capacity profile",
        "",
        f"{p.target} ({p.model}), {p.num_prefill} prefill + {p.num_decode} decode worker(s), measured {p.date}.",
        "",
        "| prompt tokens | unloaded TTFT (ms) | prefill tokens/s per worker |",
        "|---|---|---|",
        *(f"| {x.prompt_len} | {x.latency_s * 1000:.1f} | {x.tokens_per_s:,.0f} |" for x in p.prefill),
        "",
        "| batch per worker | context | steady TPOT (ms) | decode tokens/s per worker |",
        "|---|---|---|---|",
        *(f"| {x.batch} | {x.context} | {x.tpot_s * 1000:.2f} | {x.tokens_per_s:,.0f} |" for x in p.decode),
        "",
    ]
    if len(p.decode) >= 2:
        a, b, c = p.decode_fit()
        lines.append(
            f"Fit: TPOT(B, C) = {a * 1000:.2f} + {b * 1000:.3f}·B" + (f" + {c * 1000:.6f}·B·C" if c else "") + " ms."
        )
        lines.append("")
    return "\n".join(lines)


def profile_plot(p: CapacityProfile, path: Path) -> Path:
    from load_tests.plots import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [x.prompt_len for x in p.prefill]
    left.plot(xs, [x.tokens_per_s for x in p.prefill], "o-", label="tokens/s per worker")
    left.set_xlabel("prompt tokens")
    left.set_ylabel("prefill tokens/s")
    twin = left.twinx()
    twin.plot(xs, [x.latency_s * 1000 for x in p.prefill], "s--", color="tab:orange", label="unloaded TTFT (ms)")
    twin.set_ylabel("TTFT (ms)")
    left.set_title("prefill capacity")
    left.grid(alpha=0.3)
    for context in sorted({x.context for x in p.decode}):
        points = [x for x in p.decode if x.context == context]
        right.plot(
            [x.batch for x in points], [x.tpot_s * 1000 for x in points], "o", label=f"measured, context {context}"
        )
        if len(p.decode) >= 2:
            grid = np.linspace(1, max(x.batch for x in p.decode) * 1.5, 50)
            right.plot(
                grid, [p.tpot_s(b, context) * 1000 for b in grid], "-", alpha=0.6, label=f"fit, context {context}"
            )
    right.set_xlabel("batch per decode worker")
    right.set_ylabel("steady TPOT (ms)")
    right.set_title("decode TPOT vs batch")
    right.grid(alpha=0.3)
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
