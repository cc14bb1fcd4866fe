"""Registry stores: expiry, incarnations, the gRPC-served embedded store and Redis (real server)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.registry import (
    EmbeddedRegistry,
    GrpcRegistry,
    Heartbeater,
    RedisRegistry,
    RegistryService,
    RegistryUnavailable,
    make_registry,
)
from protos.pdserve.v1 import common_pb2, registry_pb2, registry_pb2_grpc


def record(worker_id: str, incarnation: str = "a", ttl: float = 3.0, role=common_pb2.WORKER_ROLE_DECODE):
    return registry_pb2.WorkerRecord(
        info=common_pb2.WorkerInfo(
            worker_id=worker_id, incarnation_id=incarnation, host="127.0.0.1", grpc_port=1, role=role
        ),
        ttl_seconds=ttl,
    )


def test_embedded_store_expires_records_after_their_ttl():
    now = [0.0]
    store = EmbeddedRegistry(clock=lambda: now[0])

    async def scenario():
        assert await store.heartbeat(record("w1", ttl=3.0)) is True
        assert await store.heartbeat(record("w1", ttl=3.0)) is False
        assert await store.heartbeat(record("w1", incarnation="b")) is True  # restarted: a new incarnation
        now[0] = 2.9
        assert [r.info.worker_id for r in await store.list_workers()] == ["w1"]
        now[0] = 3.1
        assert await store.list_workers() == []
        with pytest.raises(ValueError, match="worker_id"):
            await store.heartbeat(registry_pb2.WorkerRecord())

    asyncio.run(scenario())


def test_deregister_removes_only_the_named_incarnation():
    store = EmbeddedRegistry()

    async def scenario():
        await store.heartbeat(record("w1", incarnation="new"))
        assert await store.deregister("w1", "old") is False
        assert len(await store.list_workers()) == 1
        assert await store.deregister("w1", "new") is True
        assert await store.list_workers() == []

    asyncio.run(scenario())


def test_grpc_registry_talks_to_the_router_served_store():
    async def scenario():
        store = EmbeddedRegistry()
        server = grpc.aio.server()
        registry_pb2_grpc.add_RegistryServicer_to_server(RegistryService(store), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = make_registry(f"grpc://127.0.0.1:{port}")
        assert isinstance(client, GrpcRegistry)
        assert await client.heartbeat(record("w1")) is True
        assert [r.info.worker_id for r in await client.list_workers()] == ["w1"]
        assert await client.deregister("w1", "a") is True
        await server.stop(None)
        with pytest.raises(RegistryUnavailable):
            await client.list_workers()
        await client.close()

    asyncio.run(scenario())


def test_redis_registry_round_trip_ttl_and_outage(redis_server):
    async def scenario():
        store = make_registry(redis_server.url)
        assert isinstance(store, RedisRegistry)
        assert await store.heartbeat(record("w1", ttl=0.3)) is True
        assert await store.heartbeat(record("w1", ttl=0.3)) is False
        await store.heartbeat(record("w2", ttl=5.0))
        assert sorted(r.info.worker_id for r in await store.list_workers()) == ["w1", "w2"]
        await asyncio.sleep(0.5)
        assert [r.info.worker_id for r in await store.list_workers()] == ["w2"]
        assert await store.deregister("w2", "a") is True
        redis_server.kill()
        with pytest.raises(RegistryUnavailable):
            await store.list_workers()
        beats = Heartbeater(store, lambda: record("w3"))
        await beats.beat()  # tolerated: counted, not raised
        assert beats.num_failures == 1
        redis_server.start()
        await beats.beat()
        assert [r.info.worker_id for r in await store.list_workers()] == ["w3"]
        await store.close()

    asyncio.run(scenario())


def test_bad_registry_urls_are_refused():
    with pytest.raises(ValueError, match="registry URL"):
        make_registry("http://nope")
