"""Samples the cluster's Prometheus `/metrics` during a run, for a timeline of load and roles.

A daemon thread scrapes every target every `interval_s` (plain HTTP GET, parsed with
`prometheus_client.parser`) and keeps the `pdserve_*` samples (histogram buckets and the
per-expert routing counters left out: they are many and the timeline does not use them).
`timeline()` turns the samples into one row per (time, target):

    role, role_epoch, running, waiting, kv_usage            gauges as scraped
    kv_send_gbps, kv_recv_gbps                              KV transfer bytes counter → GB/s
    prompt_tokens_per_s, generation_tokens_per_s, flips     counters → rates / totals
    inflight, queued, router_tokens_per_s                   the router's own metrics

Targets: a `LocalCluster`'s READY lines (router and workers), the workers registered with a
router's embedded registry (`discover_targets`), or URLs the user passes.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_SKIP_PREFIXES = ("pdserve_moe_routed_tokens",)
ROLE_CODES = {"prefill": 0, "decode": 1, "mixed": 2}


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # http://host:port/metrics

    @classmethod
    def parse(cls, text: str) -> Target:
        """`NAME=URL` or `URL`; a bare host:port gets http:// and /metrics."""
        name, sep, url = text.partition("=")
        if not sep:
            name, url = "", text
        if "://" not in url:
            url = f"http://{url}"
        if url.count("/") < 3:
            url += "/metrics"
        return cls(name or url.split("://", 1)[1].split("/", 1)[0], url)


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic seconds
    target: str
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def scrape(url: str, timeout_s: float = 2.0) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every pdserve_ sample at `url`."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    out = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("pdserve_") or family.name.startswith(_SKIP_PREFIXES):
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") or sample.name.endswith("_created"):
                continue
            out.append((sample.name, dict(sample.labels), float(sample.value)))
    return out


class MetricsSampler:
    """Scrapes targets on a daemon thread until `stop()`; failures are counted, not raised."""

    def __init__(self, targets: list[Target], interval_s: float = 1.0) -> None:
        self.targets = targets
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.failures: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-sampler", daemon=True)

    def __enter__(self) -> MetricsSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.targets:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
            self.sample_once()  # a last sample after the load, so counters cover the whole run

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - began)))

    def sample_once(self) -> None:
        for target in self.targets:
            now = time.monotonic()
            try:
                rows = scrape(target.url, timeout_s=min(2.0, max(0.2, self.interval_s)))
            except Exception:  # a target down for a moment is expected (role flips, restarts)
                self.failures[target.name] += 1
                continue
            self.samples.extend(
                Sample(now, target.name, name, tuple(sorted(labels.items())), value) for name, labels, value in rows
            )


def timeline(samples: list[Sample], start: float) -> list[dict]:
    """One row per (scrape time, target), gauges as read and counters as rates since the last row."""
    by_key: dict[tuple[float, str], dict[str, float | str]] = {}
    for s in samples:
        row = by_key.setdefault((s.t, s.target), {})
        labels = dict(s.labels)
        if s.name == "pdserve_worker_role":
            if s.value >= 1:
                row["role"] = labels.get("role", "")
        elif s.name == "pdserve_kv_transfer_bytes_total":
            row[f"_kv_{labels.get('direction', '')}"] = (
                float(row.get(f"_kv_{labels.get('direction', '')}", 0)) + s.value
            )
        elif s.name == "pdserve_role_flips_total":
            if labels.get("result") == "ok":
                row["flips"] = float(row.get("flips", 0)) + s.value
        else:
            key = _COLUMNS.get(s.name)
            if key:
                row[key] = float(row.get(key, 0)) + s.value
    rows = []
    previous: dict[str, tuple[float, dict]] = {}
    for (t, target), values in sorted(by_key.items()):
        out: dict = {"t_s": round(t - start, 3), "target": target}
        out.update({k: v for k, v in values.items() if not k.startswith("_") and not k.startswith("cum_")})
        if "role" in out:
            out["role_code"] = ROLE_CODES.get(str(out["role"]), -1)
        last = previous.get(target)
        if last is not None and t > last[0]:
            dt = t - last[0]
            for raw, col, scale in _RATES:
                if raw in values and raw in last[1]:
                    out[col] = max(0.0, (float(values[raw]) - float(last[1][raw])) / dt * scale)
        previous[target] = (t, values)
        rows.append(out)
    return rows


_COLUMNS = {
    "pdserve_worker_running_requests": "running",
    "pdserve_worker_waiting_requests": "waiting",
    "pdserve_kv_usage_ratio": "kv_usage",
    "pdserve_worker_role_epoch": "role_epoch",
    "pdserve_kv_transfer_queue_depth": "kv_transfers_active",
    "pdserve_preemptions_total": "preemptions",
    "pdserve_prompt_tokens_total": "cum_prompt_tokens",
    "pdserve_generation_tokens_total": "cum_generation_tokens",
    "pdserve_router_inflight_requests": "inflight",
    "pdserve_router_queued_requests": "queued",
    "pdserve_router_generation_tokens_total": "cum_router_tokens",
}
# (raw column, rate column, scale): counters turned into per-second rates.
_RATES = (
    ("_kv_send", "kv_send_gbps", 1e-9),
    ("_kv_recv", "kv_recv_gbps", 1e-9),
    ("cum_prompt_tokens", "prompt_tokens_per_s", 1.0),
    ("cum_generation_tokens", "generation_tokens_per_s", 1.0),
    ("cum_router_tokens", "router_tokens_per_s", 1.0),
)


def targets_from_cluster(cluster) -> list[Target]:
    """The router's and every worker's /metrics of a `cluster.launcher.LocalCluster`."""
    targets = []
    if cluster.router is not None and cluster.router.ready.get("metrics_address"):
        targets.append(Target("router", f"http://{cluster.router.ready['metrics_address']}/metrics"))
    for worker in cluster.workers:
        address = worker.ready.get("metrics_address")
        if address:
            targets.append(Target(worker.ready.get("worker_id", worker.name), f"http://{address}/metrics"))
    return targets


def discover_targets(router_address: str, timeout_s: float = 3.0) -> list[Target]:
    """Workers registered with a router's embedded registry (empty if it has none, e.g. Redis)."""
    import grpc

    from protos.pdserve.v1 import registry_pb2, registry_pb2_grpc

    with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(router_address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        response = stub.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=timeout_s)
        return [
            Target(r.info.worker_id, f"http://{r.info.host}:{r.info.metrics_port}/metrics")
            for r in sorted(response.workers, key=lambda r: r.info.worker_id)
            if r.info.metrics_port
        ]
    return []


def worker_roles(targets: list[Target]) -> dict[str, str]:
    """Each target's current role (workers only), read once."""
    roles = {}
    for target in targets:
        with contextlib.suppress(Exception):
            for name, labels, value in scrape(target.url):
                if name == "pdserve_worker_role" and value >= 1:
                    roles[target.name] = labels.get("role", "")
    return roles


def kv_capacity_tokens(targets: list[Target], block_size: int = 16) -> dict[str, int]:
    """KV capacity in tokens per worker (blocks of every state × block size)."""
    out: dict[str, int] = {}
    for target in targets:
        with contextlib.suppress(Exception):
            blocks = sum(v for name, _labels, v in scrape(target.url) if name == "pdserve_kv_blocks")
            if blocks:
                out[target.name] = int(blocks) * block_size
    return out
