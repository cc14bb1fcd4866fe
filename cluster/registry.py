"""The cluster registry: who is in the cluster, in which role and epoch, and how loaded.

Workers heartbeat their `WorkerRecord` (info + load report) every `heartbeat_interval_s`; a
record expires `ttl_s` after its last beat, so a worker that stops beating leaves routing within
the TTL. The router lists the records to route; it is never on a request's hot path.

Stores, one interface (`Registry`, asyncio):

    RedisRegistry     redis://host:port/db     production (what the Helm chart deploys)
    EmbeddedRegistry  (in the router process)  the `pdserve up` default; served to workers by
    GrpcRegistry      grpc://host:port         RegistryService on the router's gRPC port

`make_registry(url)` picks one. Records travel and rest as protobuf (`registry.proto`), never
pickles. Errors reaching the store raise `RegistryUnavailable`; callers keep their last view and
try again on their next beat (the router keeps routing on the membership it last saw).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc

from protos.pdserve.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 3.0
DEFAULT_HEARTBEAT_S = 0.5


class RegistryUnavailable(Exception):
    """The store could not be reached; the operation may succeed later."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check(record: registry_pb2.WorkerRecord) -> None:
    if not record.info.worker_id or not record.info.incarnation_id:
        raise ValueError("a worker record needs info.worker_id and info.incarnation_id")


class Registry(abc.ABC):
    """A membership store. Coroutine methods; safe to call from one asyncio loop."""

    @abc.abstractmethod
    async def heartbeat(self, record: registry_pb2.WorkerRecord) -> bool:
        """Create or refresh `record` (its `ttl_seconds` applies). True when newly created."""

    @abc.abstractmethod
    async def deregister(self, worker_id: str, incarnation_id: str) -> bool: ...

    @abc.abstractmethod
    async def list_workers(self) -> list[registry_pb2.WorkerRecord]: ...

    async def close(self) -> None:
        return None


class EmbeddedRegistry(Registry):
    """In-memory store with expiry; lives in the router process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, tuple[registry_pb2.WorkerRecord, float]] = {}

    async def heartbeat(self, record: registry_pb2.WorkerRecord) -> bool:
        _check(record)
        self._expire()
        previous = self._records.get(record.info.worker_id)
        created = previous is None or previous[0].info.incarnation_id != record.info.incarnation_id
        stored = registry_pb2.WorkerRecord()
        stored.CopyFrom(record)
        stored.heartbeat_unix_ms = _now_ms()
        ttl = record.ttl_seconds or DEFAULT_TTL_S
        self._records[record.info.worker_id] = (stored, self._clock() + ttl)
        return created

    async def deregister(self, worker_id: str, incarnation_id: str) -> bool:
        entry = self._records.get(worker_id)
        if entry is None or entry[0].info.incarnation_id != incarnation_id:
            return False
        del self._records[worker_id]
        return True

    async def list_workers(self) -> list[registry_pb2.WorkerRecord]:
        self._expire()
        return [record for record, _ in self._records.values()]

    def _expire(self) -> None:
        now = self._clock()
        for worker_id in [w for w, (_, expires) in self._records.items() if expires <= now]:
            log.info("registry: worker %s expired", worker_id)
            del self._records[worker_id]


class RegistryService(registry_pb2_grpc.RegistryServicer):
    """Serves an EmbeddedRegistry over gRPC (registered on the router's server)."""

    def __init__(self, store: EmbeddedRegistry) -> None:
        self.store = store

    async def Heartbeat(self, request, context):
        try:
            created = await self.store.heartbeat(request.record)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return registry_pb2.HeartbeatResponse(created=created)

    async def Deregister(self, request, context):
        removed = await self.store.deregister(request.worker_id, request.incarnation_id)
        return registry_pb2.DeregisterResponse(removed=removed)

    async def ListWorkers(self, request, context):
        return registry_pb2.ListWorkersResponse(workers=await self.store.list_workers())


class GrpcRegistry(Registry):
    """Client of a RegistryService (the router's embedded store)."""

    def __init__(self, address: str, timeout_s: float = 2.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RegistryUnavailable(f"registry at {self.address}: {exc.code().name}: {exc.details()}") from None

    async def heartbeat(self, record: registry_pb2.WorkerRecord) -> bool:
        _check(record)
        response = await self._call(self._stub.Heartbeat, registry_pb2.HeartbeatRequest(record=record))
        return response.created

    async def deregister(self, worker_id: str, incarnation_id: str) -> bool:
        request = registry_pb2.DeregisterRequest(worker_id=worker_id, incarnation_id=incarnation_id)
        return (await self._call(self._stub.Deregister, request)).removed

    async def list_workers(self) -> list[registry_pb2.WorkerRecord]:
        return list((await self._call(self._stub.ListWorkers, registry_pb2.ListWorkersRequest())).workers)

    async def close(self) -> None:
        await self._channel.close()


class RedisRegistry(Registry):
    """Records under `{prefix}worker:{worker_id}` with a millisecond TTL (SET PX)."""

    def __init__(self, url: str, prefix: str = "pdserve:", timeout_s: float = 1.0) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self._redis = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def _key(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    async def _run(self, coro):
        import redis

        try:
            return await coro
        except (redis.RedisError, OSError) as exc:
            raise RegistryUnavailable(f"redis at {self.url}: {exc}") from None

    async def heartbeat(self, record: registry_pb2.WorkerRecord) -> bool:
        _check(record)
        stored = registry_pb2.WorkerRecord()
        stored.CopyFrom(record)
        stored.heartbeat_unix_ms = _now_ms()
        ttl_ms = int((record.ttl_seconds or DEFAULT_TTL_S) * 1000)
        previous = await self._run(
            self._redis.set(self._key(record.info.worker_id), stored.SerializeToString(), px=ttl_ms, get=True)
        )
        if previous is None:
            return True
        return registry_pb2.WorkerRecord.FromString(previous).info.incarnation_id != record.info.incarnation_id

    async def deregister(self, worker_id: str, incarnation_id: str) -> bool:
        raw = await self._run(self._redis.get(self._key(worker_id)))
        if raw is None or registry_pb2.WorkerRecord.FromString(raw).info.incarnation_id != incarnation_id:
            return False
        return bool(await self._run(self._redis.delete(self._key(worker_id))))

    async def list_workers(self) -> list[registry_pb2.WorkerRecord]:
        keys = [key async for key in self._scan()]
        if not keys:
            return []
        values = await self._run(self._redis.mget(keys))
        return [registry_pb2.WorkerRecord.FromString(v) for v in values if v is not None]

    async def _scan(self):
        import redis

        try:
            async for key in self._redis.scan_iter(match=f"{self.prefix}worker:*", count=200):
                yield key
        except (redis.RedisError, OSError) as exc:
            raise RegistryUnavailable(f"redis at {self.url}: {exc}") from None

    async def close(self) -> None:
        await self._redis.aclose()


def make_registry(url: str) -> Registry:
    """`redis://...` → RedisRegistry, `grpc://host:port` → GrpcRegistry, `embedded` → EmbeddedRegistry."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRegistry(url)
    if url.startswith("grpc://"):
        return GrpcRegistry(url.removeprefix("grpc://"))
    if url == "embedded":
        return EmbeddedRegistry()
    raise ValueError(f"registry URL {url!r} must be 'embedded', grpc://host:port or redis://host:port[/db]")


class Heartbeater:
    """Beats a worker's record into a registry until stopped; tolerates the store being down."""

    def __init__(
        self,
        registry: Registry,
        make_record: Callable[[], registry_pb2.WorkerRecord] | Callable[[], asyncio.Future],
        interval_s: float = DEFAULT_HEARTBEAT_S,
    ) -> None:
        self.registry = registry
        self.make_record = make_record
        self.interval_s = interval_s
        self.num_failures = 0
        self._task: asyncio.Task | None = None
        self._healthy = True

    def start(self) -> Heartbeater:
        self._task = asyncio.create_task(self._run())
        return self

    async def beat(self) -> None:
        record = self.make_record()
        if asyncio.iscoroutine(record):
            record = await record
        try:
            await self.registry.heartbeat(record)
        except RegistryUnavailable as exc:
            self.num_failures += 1
            if self._healthy:
                log.warning("heartbeat failed (will keep trying): %s", exc)
            self._healthy = False
            return
        if not self._healthy:
            log.info("heartbeat restored")
        self._healthy = True

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception:  # a bug here must not stop the beats
                log.exception("heartbeat crashed")
            await asyncio.sleep(self.interval_s)

    async def stop(self, record_id: tuple[str, str] | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if record_id is not None:
            with contextlib.suppress(RegistryUnavailable):
                await self.registry.deregister(*record_id)
