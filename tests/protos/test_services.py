"""Real gRPC round trips over loopback: our services, health and reflection, on aio and sync servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.pdserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from protos.services import (
    GENERATION_SERVICE,
    HEALTH_SERVICE,
    NOT_SERVING,
    REFLECTION_SERVICE,
    SERVING,
    WORKER_SERVICE,
    add_standard_services,
)

TIMEOUT_S = 10.0


class ToyGeneration(generate_pb2_grpc.GenerationServicer):
    """Streams "Hello" as two messages: metadata + first token, then the last token + finish."""

    async def Generate(self, request: generate_pb2.GenerateRequest, context) -> AsyncIterator:
        metadata = generate_pb2.GenerateMetadata(
            request_id=request.request_id or "assigned-1",
            model=request.model,
            num_prompt_tokens=len(request.token_ids.token_ids),
        )
        yield generate_pb2.GenerateResponse(token_ids=[11], text="Hel", metadata=metadata)
        yield generate_pb2.GenerateResponse(
            token_ids=[12],
            text="lo",
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=metadata.num_prompt_tokens, completion_tokens=2),
        )


class ToyWorker(worker_pb2_grpc.WorkerServicer):
    def GetLoad(self, request: worker_pb2.LoadRequest, context) -> worker_pb2.LoadReport:
        return worker_pb2.LoadReport(worker_id="w0", role=common_pb2.WORKER_ROLE_MIXED, num_running_requests=3)


@asynccontextmanager
async def aio_generation_server() -> AsyncIterator[tuple[str, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    generate_pb2_grpc.add_GenerationServicer_to_server(ToyGeneration(), server)
    health_servicer = add_standard_services(server, [GENERATION_SERVICE])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", health_servicer
    finally:
        await server.stop(grace=None)


@contextmanager
def sync_worker_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServicer_to_server(ToyWorker(), server)
    health_servicer = add_standard_services(server, [WORKER_SERVICE])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", health_servicer
    finally:
        server.stop(grace=None).wait()


def list_services_request() -> reflection_pb2.ServerReflectionRequest:
    return reflection_pb2.ServerReflectionRequest(list_services="")


def test_service_names_are_fully_qualified() -> None:
    assert GENERATION_SERVICE == "pdserve.v1.Generation"
    assert WORKER_SERVICE == "pdserve.v1.Worker"
    assert HEALTH_SERVICE == "grpc.health.v1.Health"
    assert REFLECTION_SERVICE == "grpc.reflection.v1alpha.ServerReflection"


def test_generate_streams_two_messages_over_loopback() -> None:
    async def scenario() -> list[generate_pb2.GenerateResponse]:
        async with aio_generation_server() as (address, _), grpc.aio.insecure_channel(address) as channel:
            stub = generate_pb2_grpc.GenerationStub(channel)
            request = generate_pb2.GenerateRequest(model="tiny", token_ids=generate_pb2.TokenIds(token_ids=[1, 2, 3]))
            return [response async for response in stub.Generate(request, timeout=TIMEOUT_S)]

    first, last = asyncio.run(scenario())
    assert (first.metadata.request_id, first.metadata.model, first.metadata.num_prompt_tokens) == (
        "assigned-1",
        "tiny",
        3,
    )
    assert (list(first.token_ids), first.text, first.finish_reason) == (
        [11],
        "Hel",
        common_pb2.FINISH_REASON_UNSPECIFIED,
    )
    assert (list(last.token_ids), last.text, last.finish_reason) == ([12], "lo", common_pb2.FINISH_REASON_LENGTH)
    assert not last.HasField("metadata")
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 2)


def test_aio_health_serves_per_service_status() -> None:
    async def scenario() -> list[object]:
        async with aio_generation_server() as (address, servicer), grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def check(service: str) -> object:
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return response.status

            seen = [await check(GENERATION_SERVICE), await check(""), await check("pdserve.v1.Nope")]
            await servicer.set(GENERATION_SERVICE, NOT_SERVING)
            seen.append(await check(GENERATION_SERVICE))
            return seen

    assert asyncio.run(scenario()) == [SERVING, SERVING, grpc.StatusCode.NOT_FOUND, NOT_SERVING]


def test_aio_reflection_lists_services_and_resolves_their_files() -> None:
    async def scenario() -> tuple[list[str], descriptor_pb2.FileDescriptorProto]:
        async with aio_generation_server() as (address, _), grpc.aio.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [
                list_services_request(),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=GENERATION_SERVICE),
            ]
            listed, files = [
                response async for response in stub.ServerReflectionInfo(iter(requests), timeout=TIMEOUT_S)
            ]
            names = [service.name for service in listed.list_services_response.service]
            first_file = files.file_descriptor_response.file_descriptor_proto[0]
            return names, descriptor_pb2.FileDescriptorProto.FromString(first_file)

    names, generate_file = asyncio.run(scenario())
    assert sorted(names) == sorted([GENERATION_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE])
    assert generate_file.name == "protos/pdserve/v1/generate.proto"
    assert [service.name for service in generate_file.service] == ["Generation"]


def test_sync_server_gets_the_same_standard_services() -> None:
    with sync_worker_server() as (address, servicer), grpc.insecure_channel(address) as channel:
        report = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.LoadRequest(), timeout=TIMEOUT_S)
        assert (report.worker_id, report.role, report.num_running_requests) == ("w0", common_pb2.WORKER_ROLE_MIXED, 3)

        health_stub = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=WORKER_SERVICE)
        assert health_stub.Check(check, timeout=TIMEOUT_S).status == SERVING
        servicer.set(WORKER_SERVICE, NOT_SERVING)
        assert health_stub.Check(check, timeout=TIMEOUT_S).status == NOT_SERVING

        reflection_stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (listed,) = reflection_stub.ServerReflectionInfo(iter([list_services_request()]), timeout=TIMEOUT_S)
        names = [service.name for service in listed.list_services_response.service]
        assert sorted(names) == sorted([WORKER_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE])


def test_unimplemented_worker_rpcs_answer_unimplemented() -> None:
    with sync_worker_server() as (address, _), grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            worker_pb2_grpc.WorkerStub(channel).SetRole(worker_pb2.SetRoleRequest(), timeout=TIMEOUT_S)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
