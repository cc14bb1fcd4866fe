"""The router's view of the workers: gRPC stubs, last load reports, and the routing policy.

A background task polls every worker's `GetLoad` (the registry's job once it exists: the router
then learns addresses from it). A worker whose poll fails is out of rotation until a poll
succeeds again; a worker that fails a request is suspended for a short back-off (a small circuit
breaker). The policy never blocks on a worker: it reads the last reports plus the router's own
count of requests it has in flight on each worker since that report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

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
    extra: dict = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return self.report.worker_id if self.report else self.address

    @property
    def available(self) -> bool:
        return (
            self.reachable
            and self.report is not None
            and self.report.state == common_pb2.WORKER_STATE_READY
            and time.monotonic() >= self.suspended_until
        )

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
        return any(h.available and h.report.role in DECODE_ROLES for h in self.workers.values())


def _decode_load(handle: WorkerHandle) -> tuple[float, float]:
    report = handle.report
    busy = report.num_running_requests + report.num_waiting_requests + handle.num_inflight
    usage = report.num_kv_blocks_used / report.num_kv_blocks_total if report.num_kv_blocks_total else 0.0
    return (busy, usage)
