"""The load-test clients send a multimodal workload's images over both APIs, to an in-process
router on the tiny-vl preset (scripted workers): the router receives every image."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from load_tests.backends import BackendConfig, RequestRecord, make_backend
from load_tests.workload import WorkloadConfig, build_workload
from protos.pdserve.v1 import generate_pb2_grpc
from tests.router.scripted import ScriptedService, serving


async def _send_all(kind: str, target: str, specs) -> list[RequestRecord]:
    backend = make_backend(BackendConfig(kind=kind, target=target, model="tiny-vl", num_channels=1))
    await backend.open()
    records = [RequestRecord(s.index, s.prompt_len, s.max_tokens) for s in specs]
    try:
        await asyncio.gather(*(backend.send(s, r) for s, r in zip(specs, records, strict=True)))
    finally:
        await backend.close()
    return records


@pytest.mark.parametrize("kind", ["grpc", "openai-chat"])
def test_multimodal_workload_reaches_the_router_with_its_images(kind: str) -> None:
    specs = build_workload(
        WorkloadConfig("multimodal", 3, images_per_request=2, image_size=32, prompt_format="text"), model="tiny-vl"
    )
    service = ScriptedService(["a", "b"], model_id="tiny-vl")

    async def scenario():
        if kind != "grpc":
            async with serving(service) as url:
                return await _send_all(kind, url, specs)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", service.max_body_bytes)])
        generate_pb2_grpc.add_GenerationServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await _send_all(kind, f"127.0.0.1:{port}", specs)
        finally:
            await server.stop(None)

    records = asyncio.run(scenario())
    assert [r.status for r in records] == ["OK"] * 3, [r.error for r in records]
    assert sorted(len(req.mm_items) for req in service.prepared) == [2, 2, 2]
