"""Prometheus metrics: the only module that imports `prometheus_client`.

The engine and roles keep plain stats objects (`SchedulerStats`, `BlockStats`,
`TransportStats`, role counters); this module reads them at scrape time (a collector) or is told
about events (`observe_*`), and serves `/metrics` on each process's own port.

Naming: `pdserve_` prefix, base units as suffix (`_seconds`, `_bytes`), `_total` for counters,
labels limited to model, role, worker and small enums. Histogram buckets for LLM latencies:

    LATENCY_BUCKETS  1 ms … 10 min: TTFT, end-to-end, queue time, KV transfer, role flips
    STEP_BUCKETS     0.5 ms … 30 s: one engine step (decode steps are ms, long prefills seconds)
    ITL_BUCKETS      0.5 ms … 5 s: time between two tokens of one stream
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROLES = ("prefill", "decode", "mixed")


def serve(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve `registry` at http://host:port/metrics on a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the worker collector reads at scrape time (built by the worker, torch-free)."""

    role: str
    role_epoch: int
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_total: int
    prefix_queries: int
    prefix_hits: int
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    transfers_active: int
    transfer_bytes_sent: int
    transfer_bytes_received: int
    transfer_failures: dict[str, int]
    requests_finished: dict[str, int]
    routed_tokens: list[list[int]]  # [moe layer][expert] tokens routed (cumulative)


class _WorkerCollector(Collector):
    def __init__(self, labels: dict[str, str], snapshot: Callable[[], WorkerSnapshot]) -> None:
        self.labels = labels
        self.snapshot = snapshot

    def collect(self) -> Iterable:
        s = self.snapshot()
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("pdserve_worker_running_requests", "Requests in the running batch.", s.running)
        yield gauge("pdserve_worker_waiting_requests", "Requests waiting for admission.", s.waiting)
        blocks = GaugeMetricFamily(
            "pdserve_kv_blocks",
            "KV blocks by state: used (referenced), cached (kept for prefix reuse), free.",
            labels=[*names, "state"],
        )
        free = s.kv_blocks_total - s.kv_blocks_used - s.kv_blocks_cached
        for state, count in (("used", s.kv_blocks_used), ("cached", s.kv_blocks_cached), ("free", free)):
            blocks.add_metric([*values, state], count)
        yield blocks
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield gauge("pdserve_kv_usage_ratio", "Used KV blocks over all KV blocks.", usage)
        yield counter("pdserve_prefix_cache_queries", "Full prompt blocks looked up.", s.prefix_queries)
        yield counter("pdserve_prefix_cache_hits", "Prompt blocks served from the prefix cache.", s.prefix_hits)
        yield counter("pdserve_prompt_tokens", "Prompt tokens of requests that produced a token.", s.prompt_tokens)
        yield counter("pdserve_generation_tokens", "Tokens sampled.", s.generation_tokens)
        yield counter("pdserve_preemptions", "Requests preempted for lack of KV blocks.", s.preemptions)
        yield gauge("pdserve_kv_transfer_queue_depth", "KV transfers in progress.", s.transfers_active)
        sent = CounterMetricFamily(
            "pdserve_kv_transfer_bytes", "KV bytes moved between workers.", labels=[*names, "direction"]
        )
        sent.add_metric([*values, "send"], s.transfer_bytes_sent)
        sent.add_metric([*values, "recv"], s.transfer_bytes_received)
        yield sent
        failures = CounterMetricFamily(
            "pdserve_kv_transfer_failures", "Failed KV transfers by reason.", labels=[*names, "reason"]
        )
        for reason, count in sorted(s.transfer_failures.items()):
            failures.add_metric([*values, reason], count)
        yield failures
        finished = CounterMetricFamily(
            "pdserve_worker_requests_finished", "Requests finished here, by reason.", labels=[*names, "finish_reason"]
        )
        for reason, count in sorted(s.requests_finished.items()):
            finished.add_metric([*values, reason], count)
        yield finished
        role = GaugeMetricFamily("pdserve_worker_role", "1 for the worker's current role.", labels=[*names, "role"])
        for name in ROLES:
            role.add_metric([*values, name], 1.0 if name == s.role else 0.0)
        yield role
        yield gauge("pdserve_worker_role_epoch", "Role epoch (increments on every committed flip).", s.role_epoch)
        routed = CounterMetricFamily(
            "pdserve_moe_routed_tokens",
            "Tokens routed to each expert, per MoE layer.",
            labels=[*names, "layer", "expert"],
        )
        for layer, per_expert in enumerate(s.routed_tokens):
            for expert, count in enumerate(per_expert):
                routed.add_metric([*values, str(layer), str(expert)], count)
        yield routed


class WorkerMetrics:
    """Metrics of one worker process. `observe_*` are thread-safe (prometheus_client locks)."""

    def __init__(self, model: str, worker: str, snapshot: Callable[[], WorkerSnapshot]) -> None:
        self.registry = CollectorRegistry()
        labels = {"model": model, "worker": worker}
        names = list(labels)
        self.registry.register(_WorkerCollector(labels, snapshot))
        self._labels = labels
        self.step_seconds = Histogram(
            "pdserve_engine_step_duration_seconds",
            "Duration of one engine step, by kind (prefill: the step computed prompt tokens).",
            [*names, "kind"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "pdserve_engine_batch_size",
            "Requests in one engine step.",
            names,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.transfer_seconds = Histogram(
            "pdserve_kv_transfer_duration_seconds",
            "Duration of one KV transfer, by direction.",
            [*names, "direction"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.flips = Counter(
            "pdserve_role_flips",
            "Role switches by from, to and result.",
            [*names, "from_role", "to_role", "result"],
            registry=self.registry,
        )
        self.flip_seconds = Histogram(
            "pdserve_role_flip_duration_seconds",
            "Drain + commit time of a role switch.",
            names,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_step(self, seconds: float, batch_size: int, is_prefill: bool) -> None:
        self.step_seconds.labels(**self._labels, kind="prefill" if is_prefill else "decode").observe(seconds)
        self.batch_size.labels(**self._labels).observe(batch_size)

    def observe_transfer(self, direction: str, seconds: float) -> None:
        self.transfer_seconds.labels(**self._labels, direction=direction).observe(seconds)

    def observe_flip(self, from_role: str, to_role: str, result: str, seconds: float) -> None:
        self.flips.labels(**self._labels, from_role=from_role, to_role=to_role, result=result).inc()
        if result == "ok":
            self.flip_seconds.labels(**self._labels).observe(seconds)


class RouterMetrics:
    """Metrics of the router process (request lifecycle, routing, per-worker circuit state)."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        reg = self.registry
        self.requests = Counter(
            "pdserve_router_requests", "Requests finished, by gRPC status code.", ["model", "status"], registry=reg
        )
        self.ttft = Histogram(
            "pdserve_router_time_to_first_token_seconds",
            "Arrival to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "pdserve_router_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "pdserve_router_e2e_request_latency_seconds",
            "Arrival to last token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_time = Histogram(
            "pdserve_router_queue_time_seconds",
            "Time waiting for a router slot.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inflight = Gauge("pdserve_router_inflight_requests", "Requests being served.", ["model"], registry=reg)
        self.queued = Gauge("pdserve_router_queued_requests", "Requests waiting for a slot.", ["model"], registry=reg)
        self.routing = Counter(
            "pdserve_router_routing_decisions",
            "Where prompts were prefilled: remote (a prefill worker) or local.",
            ["model", "prefill"],
            registry=reg,
        )
        self.retries = Counter(
            "pdserve_router_retries",
            "Requests retried on another pair before their first token.",
            ["model"],
            registry=reg,
        )
        self.migrations = Counter(
            "pdserve_router_migrations",
            "Streams continued on another decode worker after tokens.",
            ["model"],
            registry=reg,
        )
        self.cancellations = Counter(
            "pdserve_router_cancellations",
            "Requests cancelled by the client, Abort or a deadline.",
            ["model", "cause"],
            registry=reg,
        )
        self.tokens = Counter(
            "pdserve_router_generation_tokens", "Tokens streamed to clients.", ["model"], registry=reg
        )

    def watch_circuits(self, circuits: Callable[[], dict[str, bool]]) -> None:
        """Report `pdserve_router_worker_circuit_open{worker}` from `circuits()` at scrape time."""
        self.registry.register(_CircuitCollector(self.model, circuits))


class _CircuitCollector(Collector):
    def __init__(self, model: str, circuits: Callable[[], dict[str, bool]]) -> None:
        self.model = model
        self.circuits = circuits

    def collect(self) -> Iterable:
        family = GaugeMetricFamily(
            "pdserve_router_worker_circuit_open",
            "1 while the router keeps a worker out of rotation after a failure.",
            labels=["model", "worker"],
        )
        for worker, is_open in sorted(self.circuits().items()):
            family.add_metric([self.model, worker], 1.0 if is_open else 0.0)
        yield family
