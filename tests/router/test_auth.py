"""API keys: where they come from, and the gRPC side (the HTTP side is in test_openai_http)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pdserve.v1 import generate_pb2, generate_pb2_grpc
from protos.services import GENERATION_SERVICE, add_standard_services
from router.auth import ApiKeyInterceptor, ApiKeys, load_api_keys
from router.client import AsyncClient, Client
from tests.router.scripted import ScriptedService


def test_keys_from_flag_file_and_environment(tmp_path):
    assert not load_api_keys().enabled
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated monthly\nalpha\n\n  beta  \n")
    keys = load_api_keys(None, str(key_file), None)
    assert keys.check_header("Bearer alpha") and keys.check_header("bearer beta")
    assert not keys.check_header("Bearer gamma") and not keys.check_header("alpha") and not keys.check_header(None)
    assert load_api_keys("flag").check_header("Bearer flag")
    assert load_api_keys(env_key="env").check_header("Bearer env")
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(None, str(tmp_path / "empty"))


def test_grpc_generate_needs_the_key_and_health_does_not():
    async def scenario():
        service = ScriptedService(["hi"])
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor(ApiKeys(["secret"]))])
        generate_pb2_grpc.add_GenerationServicer_to_server(service, server)
        add_standard_services(server, [GENERATION_SERVICE])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        request = generate_pb2.GenerateRequest(text="Hello")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = generate_pb2_grpc.GenerationStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    [m async for m in stub.Generate(request)]
                with pytest.raises(grpc.aio.AioRpcError) as wrong:
                    await stub.ListModels(generate_pb2.ListModelsRequest(), metadata=[("authorization", "Bearer x")])
                ok = [m async for m in stub.Generate(request, metadata=[("authorization", "Bearer secret")])]
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        finally:
            await server.stop(None)
        return refused.value, wrong.value, ok, health

    refused, wrong, ok, health = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in refused.details()
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "".join(m.text for m in ok) == "hi"
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_router_modules_never_import_torch():
    code = (
        "import sys, router.main, router.openai_api, router.reasoning, router.tool_calls, router.auth; "
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_the_python_clients_send_their_api_key():
    async def serve():
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor(ApiKeys(["secret"]))])
        generate_pb2_grpc.add_GenerationServicer_to_server(ScriptedService(["hi"]), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"

    async def scenario():
        server, address = await serve()
        try:
            async with AsyncClient(address, api_key="secret") as client:
                ok = (await client.generate("Hello")).text
            async with AsyncClient(address) as client:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generate("Hello")
            # the blocking client, from a thread (this loop serves)
            sync_text = await asyncio.to_thread(lambda: Client(address, api_key="secret").generate("Hello").text)
        finally:
            await server.stop(None)
        return ok, refused.value, sync_text

    ok, refused, sync_text = asyncio.run(scenario())
    assert ok == sync_text == "hi"
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_router_binding_every_interface_must_be_told_its_address():
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "router", "--host", "0.0.0.0", "--port", "0", "--http-port", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "binds every interface: set --advertise-host" in out.stderr
