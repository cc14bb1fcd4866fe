"""The router's view of the workers: gRPC stubs, last load reports, and the routing policy.

Membership and load come from one of two sources:

* a registry (`watch(registry)`): the workers' heartbeats carry their load reports; a worker
  whose record disappears stays routable until its TTL has passed since it was last seen (so a
  Redis restart, which loses every record until the next beats, costs nothing), and while the
  registry is unreachable the router keeps the membership it last saw;
* a static address list: a background task polls every worker's `GetLoad`.

A worker that fails a request is suspended for a short back-off (a small circuit breaker). The
policy never blocks on a worker: it reads the last reports plus the router's own count of
requests it has in flight on each worker since that report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from cluster.registry import Registry, RegistryUnavailable
from protos.pdserve.v1 import common_pb2, registry_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

DECODE_ROLES = (common_pb2.WORKER_ROLE_DECODE, common_pb2.WORKER_ROLE_MIXED)
PREFILL_ROLES = (common_pb2.WORKER_ROLE_PREFILL,)


@dataclass
class WorkerHandle:
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    report: worker_pb2.LoadReport | None = None
    reachable: bool = False
    suspended_until: float = 0.0
    num_inflight: int = 0
    num_failures: int = 0
    last_seen: float = 0.0  # monotonic time of the last report (poll or heartbeat)
    ttl_s: float = 0.0  # registry TTL; 0 for polled workers
    info: common_pb2.WorkerInfo | None = None

    @property
    def worker_id(self) -> str:
        return self.report.worker_id if self.report else self.address

    @property
    def available(self) -> bool:
        if self.ttl_s and time.monotonic() - self.last_seen > self.ttl_s:
            return False
        return (
            self.reachable
            and self.report is not None
            and self.report.state == common_pb2.WORKER_STATE_READY
            and time.monotonic() >= self.suspended_until
        )

    @property
    def suspended(self) -> bool:
        return time.monotonic() < self.suspended_until

    def ref(self) -> common_pb2.WorkerRef:
        assert self.report is not None
        return common_pb2.WorkerRef(
            worker_id=self.report.worker_id, incarnation_id=self.report.incarnation_id, grpc_address=self.address
        )


class WorkerPool:
    """Owned by the router's asyncio loop; not thread-safe."""

    def __init__(self, addresses: Iterable[str], poll_interval_s: float = 0.25, suspend_s: float = 2.0) -> None:
        self.poll_interval_s = poll_interval_s
        self.suspend_s = suspend_s
        self.workers: dict[str, WorkerHandle] = {}
        self._poller: asyncio.Task | None = None
        self.changed = asyncio.Event()
        for address in addresses:
            self.add(address)

    def add(self, address: str) -> WorkerHandle:
        if address not in self.workers:
            channel = grpc.aio.insecure_channel(address)
            self.workers[address] = WorkerHandle(address, channel, worker_pb2_grpc.WorkerStub(channel))
        return self.workers[address]

    async def remove(self, address: str) -> None:
        handle = self.workers.pop(address, None)
        if handle is not None:
            await handle.channel.close()

    async def start(self) -> None:
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for handle in self.workers.values():
            await handle.channel.close()

    def sync(self, records: list[registry_pb2.WorkerRecord]) -> None:
        """Adopt the registry's view: new workers join, reports refresh, restarts are noticed."""
        now = time.monotonic()
        for record in records:
            info = record.info
            address = f"{info.host}:{info.grpc_port}"
            handle = self.add(address)
            if handle.report is not None and handle.report.incarnation_id != info.incarnation_id:
                log.info("worker %s at %s restarted (incarnation %s)", info.worker_id, address, info.incarnation_id)
                handle.suspended_until = 0.0
            handle.info = info
            handle.report = record.load
            handle.reachable = True
            handle.last_seen = now
            handle.ttl_s = record.ttl_seconds or 3.0
        self.changed.set()
        self.changed = asyncio.Event()

    async def watch(self, registry: Registry, interval_s: float = 0.25) -> None:
        """Follow `registry` until cancelled; keep the last view while it is unreachable."""
        healthy = True
        while True:
            try:
                self.sync(await registry.list_workers())
                if not healthy:
                    log.info("registry reachable again")
                healthy = True
            except RegistryUnavailable as exc:
                if healthy:
                    log.warning("registry unreachable, routing on the last known membership: %s", exc)
                healthy = False
            await asyncio.sleep(interval_s)

    def start_watching(self, registry: Registry, interval_s: float = 0.25) -> None:
        self._poller = asyncio.create_task(self.watch(registry, interval_s))

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(h) for h in list(self.workers.values())))
        self.changed.set()
        self.changed = asyncio.Event()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.poll_once()

    async def _poll(self, handle: WorkerHandle) -> None:
        try:
            report = await handle.stub.GetLoad(worker_pb2.LoadRequest(), timeout=max(1.0, self.poll_interval_s * 4))
        except grpc.aio.AioRpcError as exc:
            if handle.reachable:
                log.warning("worker %s unreachable: %s", handle.address, exc.code().name)
            handle.reachable = False
            return
        if handle.report is not None and handle.report.incarnation_id != report.incarnation_id:
            log.info("worker %s restarted (incarnation %s)", handle.address, report.incarnation_id)
            handle.suspended_until = 0.0
        handle.report = report
        handle.reachable = True
        handle.last_seen = time.monotonic()

    def suspend(self, handle: WorkerHandle) -> None:
        """Take a worker out of rotation for a back-off after it failed a request."""
        handle.num_failures += 1
        handle.suspended_until = time.monotonic() + self.suspend_s

    # ----------------------------------------------------------------------------- policy
    def pick_decode(self, exclude: set[str]) -> WorkerHandle | None:
        """Fewest requests (running + waiting + in flight from here), then lowest KV usage."""
        candidates = [
            h
            for h in self.workers.values()
            if h.available and h.address not in exclude and h.report.role in DECODE_ROLES
        ]
        if not candidates:
            return None
        return min(candidates, key=_decode_load)

    def pick_prefill(self, exclude: set[str]) -> WorkerHandle | None:
        """Fewest queued prefill tokens (reported) and requests sent since that report."""
        candidates = [
            h
            for h in self.workers.values()
            if h.available and h.address not in exclude and h.report.role in PREFILL_ROLES
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda h: (h.report.num_queued_prefill_tokens + 1) * (1 + h.num_inflight))

    def has_decode_capacity(self) -> bool:
        """A decode-capable worker is up (a short suspension after a failure does not count as down)."""
        return any(
            h.reachable
            and h.report is not None
            and h.report.role in DECODE_ROLES
            and h.report.state == common_pb2.WORKER_STATE_READY
            and not (h.ttl_s and time.monotonic() - h.last_seen > h.ttl_s)
            for h in self.workers.values()
        )


def _decode_load(handle: WorkerHandle) -> tuple[float, float]:
    report = handle.report
    busy = report.num_running_requests + report.num_waiting_requests + handle.num_inflight
    usage = report.num_kv_blocks_used / report.num_kv_blocks_total if report.num_kv_blocks_total else 0.0
    return (busy, usage)
