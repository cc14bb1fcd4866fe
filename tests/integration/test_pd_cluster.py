"""PD serving end to end: real router and worker processes, gRPC over loopback, KV over gloo."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, SamplingParams
from protos.pdserve.v1 import generate_pb2
from router.client import AsyncClient, Client, build_request
from tests.integration.conftest import start_cluster, wait_idle

PROMPTS = [[(i * 37 + j * 11) % 300 + 3 for j in range(n)] for i, n in enumerate([5, 17, 33, 64, 9, 100, 2, 48])]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def offline_tokens() -> list[list[int]]:
    llm = LLM(model="tiny", max_model_len=1024)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [list(o.token_ids) for o in llm.generate(PROMPTS, params)]


def router_metric(cluster, name: str, **labels: str) -> float:
    """Sum of the router's /metrics samples named `name` whose labels include `labels`."""
    with urllib.request.urlopen(f"http://{cluster.router.ready['metrics_address']}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def run_streams(address: str, num_streams: int) -> list[list[int]]:
    async with AsyncClient(address, timeout=120) as client:
        jobs = [
            client.generate(PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
            for i in range(num_streams)
        ]
        results = await asyncio.gather(*jobs)
    assert all(r.finish_reason == "length" for r in results)
    return [r.token_ids for r in results]


def test_greedy_output_matches_offline_engine_with_32_streams(cluster_1p1d, offline_tokens):
    results = asyncio.run(run_streams(cluster_1p1d.address, 32))
    for i, tokens in enumerate(results):
        assert tokens == offline_tokens[i % len(PROMPTS)], f"stream {i}"
    wait_idle(cluster_1p1d)


def test_two_prefill_two_decode_match_offline_engine(offline_tokens):
    cluster = start_cluster(2, 2)
    try:
        results = asyncio.run(run_streams(cluster.address, 32))
        for i, tokens in enumerate(results):
            assert tokens == offline_tokens[i % len(PROMPTS)]
        reports = wait_idle(cluster)
        assert len(reports) == 4
    finally:
        cluster.stop()


def test_text_prompt_stop_string_and_usage(cluster_1p1d):
    llm = LLM(model="tiny", max_model_len=1024)
    offline = llm.generate("Hello there", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    with Client(cluster_1p1d.address, timeout=60) as client:
        result = client.generate("Hello there", max_tokens=16, temperature=0, ignore_eos=True)
        assert result.token_ids == list(offline.token_ids)
        assert result.text == offline.text
        assert result.usage.prompt_tokens == len(offline.prompt_token_ids) and result.usage.completion_tokens == 16
        stop = offline.text[4:6]
        stopped = client.generate("Hello there", max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
        assert stopped.finish_reason == "stop" and stopped.matched_stop == stop
        assert stopped.text == offline.text[: offline.text.find(stop)]
    wait_idle(cluster_1p1d)


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ({"prompt": "hi", "model": "gpt-9"}, grpc.StatusCode.NOT_FOUND, "gpt-9"),
        ({"prompt": [5] * 1024}, grpc.StatusCode.INVALID_ARGUMENT, "context holds 1024"),
        ({"prompt": "hi", "max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens=5000"),
        ({"prompt": "hi", "temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": [99999]}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        # Past the router's gRPC receive limit (max request bytes + 64 KiB): gRPC itself refuses it.
        ({"prompt": "x" * (5 << 20)}, grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"),
        # Under that limit but over --max-request-bytes (4 MiB): the router's own check.
        ({"prompt": "x" * ((4 << 20) + 100)}, grpc.StatusCode.INVALID_ARGUMENT, "bytes is too large"),
        ({"prompt": "hi", "min_p": 0.1}, grpc.StatusCode.INVALID_ARGUMENT, "min_p is not supported"),
    ],
)
def test_bad_input_gets_a_status_and_the_cluster_keeps_serving(cluster_1p1d, kwargs, code, message):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    with Client(cluster_1p1d.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(prompt, **kwargs)
        assert info.value.code() == code
        assert message in (info.value.details() or "")
        assert len(client.generate("still fine", max_tokens=3).token_ids) >= 1
    wait_idle(cluster_1p1d)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (generate_pb2.GenerateRequest(), "prompt is missing: set text, chat or token_ids"),
        (generate_pb2.GenerateRequest(chat=generate_pb2.ChatPrompt()), "chat.messages is empty"),
    ],
    ids=["no-prompt", "chat-without-messages"],
)
def test_malformed_grpc_request_gets_invalid_argument_naming_the_problem(cluster_1p1d, request_, message):
    """Raw protos the Python client never builds: an unset `prompt` oneof, an empty chat."""
    with Client(cluster_1p1d.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as info:
            list(client.stub.Generate(request_, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
        assert len(client.generate("still fine", max_tokens=3).token_ids) >= 1
    wait_idle(cluster_1p1d)


def test_client_cancel_mid_stream_frees_every_block(cluster_1p1d):
    cancelled_before = router_metric(cluster_1p1d, "pdserve_router_cancellations_total", cause="client")
    with Client(cluster_1p1d.address, timeout=60) as client:
        call = client.stub.Generate(build_request(PROMPTS[5], max_tokens=800, temperature=0, ignore_eos=True))
        received = 0
        for message in call:
            received += len(message.token_ids)
            if received >= 3:
                call.cancel()
                break
        assert received >= 3
        assert call.code() == grpc.StatusCode.CANCELLED
        with pytest.raises(grpc.RpcError) as info:
            next(call)  # the stream ends with the status, not with more tokens
        assert info.value.code() == grpc.StatusCode.CANCELLED
    # The router saw the client leave (not an abort, not a deadline) and counted it.
    deadline = time.monotonic() + 10
    while router_metric(cluster_1p1d, "pdserve_router_cancellations_total", cause="client") == cancelled_before:
        assert time.monotonic() < deadline, "the router never counted the client's cancellation"
        time.sleep(0.05)
    wait_idle(cluster_1p1d)


def test_abort_rpc_ends_the_stream_with_abort(cluster_1p1d):
    async def scenario():
        async with AsyncClient(cluster_1p1d.address, timeout=60) as client:
            stream = client.stream(PROMPTS[1], max_tokens=800, temperature=0, ignore_eos=True, request_id="to-abort")
            finish = None
            async for message in stream:
                if message.token_ids and finish is None:
                    assert await client.abort("to-abort")
                    finish = "asked"
                if message.finish_reason:
                    finish = message.finish_reason
            return finish

    from protos.pdserve.v1 import common_pb2

    assert asyncio.run(scenario()) == common_pb2.FINISH_REASON_ABORT
    wait_idle(cluster_1p1d)


def test_deadline_and_queue_bound():
    cluster = start_cluster(1, 1, router_args=("--max-inflight", "1", "--max-queued", "1"))
    try:

        async def scenario():
            async with AsyncClient(cluster.address, timeout=60) as client:
                long = asyncio.create_task(client.generate(PROMPTS[3], max_tokens=600, temperature=0, ignore_eos=True))
                await asyncio.sleep(1.0)  # the long request holds the router's only slot
                queued = AsyncClient(cluster.address, timeout=0.5)
                full = AsyncClient(cluster.address, timeout=30)
                deadline_job = asyncio.create_task(queued.generate("waits", max_tokens=2))
                await asyncio.sleep(0.1)
                with pytest.raises(grpc.aio.AioRpcError) as exhausted:
                    await full.generate("no room", max_tokens=2)
                with pytest.raises(grpc.aio.AioRpcError) as expired:
                    await deadline_job
                await long
                await queued.close()
                await full.close()
                return exhausted.value, expired.value

        exhausted, expired = asyncio.run(scenario())
        assert exhausted.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in exhausted.details()
        assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_idle(cluster)
    finally:
        cluster.stop()


def test_prefill_worker_killed_before_first_token_is_retried_on_the_other(offline_tokens):
    cluster = start_cluster(2, 1)
    try:
        victim = cluster.workers[0]
        assert victim.name.startswith("prefill")
        assert router_metric(cluster, "pdserve_router_retries_total") == 0
        os.kill(victim.popen.pid, signal.SIGKILL)
        victim.popen.wait()
        # The registry lists the dead worker until its TTL passes, so some requests are sent to it.
        results = asyncio.run(run_streams(cluster.address, 8))
        assert results == [offline_tokens[i] for i in range(8)]
        assert router_metric(cluster, "pdserve_router_retries_total") >= 1, list(cluster.router.tail)
        assert router_metric(cluster, "pdserve_router_migrations_total") == 0  # no token came before a failure
        wait_idle(cluster)
    finally:
        cluster.stop()


def test_health_and_reflection(cluster_1p1d):
    with grpc.insecure_channel(cluster_1p1d.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "pdserve.v1.Generation" in names
    for worker in cluster_1p1d.workers:
        with grpc.insecure_channel(worker.ready["grpc_address"]) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(service="pdserve.v1.Worker"), timeout=5).status == 1


def test_router_reports_not_serving_without_decode_workers():
    cluster = start_cluster(1, 1)
    try:
        decode = next(w for w in cluster.workers if w.name.startswith("decode"))
        os.kill(decode.popen.pid, signal.SIGKILL)
        with grpc.insecure_channel(cluster.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            status = None
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        cluster.stop()


def test_prefill_streams_the_first_token_before_the_kv_is_sent(cluster_1p1d, offline_tokens):
    """P's Prefill stream: the token first, while its KV cannot have left (the destination has
    not posted its receive yet), then the transfer's stats once the KV is in the right blocks."""
    import torch

    from cluster.kv_transport import PeerRef, make_transport
    from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    prefill = next(w for w in cluster_1p1d.workers if w.name.startswith("prefill"))
    kv = torch.zeros(4, 2, 12, 16, 2, 16)  # the tiny model's cache shape, 12 blocks
    transport = make_transport(
        "gloo", kv=kv, local=PeerRef("early-decode", "inc-1"), model_hash=prefill.ready["model_hash"]
    )
    prompt, blocks = PROMPTS[5], [9, 2, 7, 0, 4, 11, 5]  # 100 tokens: 7 blocks
    try:
        local = transport.local
        request = worker_pb2.PrefillRequest(
            request=worker_pb2.EngineRequest(
                request_id="early-1",
                prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
            ),
            destination=worker_pb2.KVDestination(
                worker=common_pb2.WorkerRef(worker_id="early-decode", incarnation_id="inc-1"),
                kv_store_host=local.host,
                kv_store_port=local.port,
                block_ids=blocks,
            ),
            transfer_id=5,
        )
        with grpc.insecure_channel(prefill.ready["grpc_address"]) as channel:
            stream = worker_pb2_grpc.WorkerStub(channel).Prefill(request, timeout=60)
            first = next(stream)
            assert first.first_token_id == offline_tokens[5][0]
            assert not first.HasField("transfer")
            assert transport.stats().num_received == 0 and not kv.any()
            source = PeerRef(prefill.ready["worker_id"], prefill.ready["incarnation_id"])
            landed = transport.expect(source, "early-1/5", blocks, len(prompt))
            rest = list(stream)
            landed.result(timeout=30)
        block_bytes = 4 * 2 * 16 * 2 * 16 * 4
        assert len(rest) == 1 and rest[0].transfer.num_blocks == 7 and rest[0].transfer.num_bytes == 7 * block_bytes
        filled = kv.abs().sum(dim=(0, 1, 3, 4, 5)) > 0
        assert filled.nonzero().flatten().tolist() == sorted(blocks)
    finally:
        transport.close()
    wait_idle(cluster_1p1d)


def test_decode_worker_receives_the_prompt_kv_and_skips_blocks_it_has_cached(cluster_1p1d):
    from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    prefill = next(w for w in cluster_1p1d.workers if w.name.startswith("prefill"))
    decode = next(w for w in cluster_1p1d.workers if w.name.startswith("decode"))
    prompt = [(j * 13) % 250 + 40 for j in range(100)]  # 100 tokens no other test sends: 7 blocks of 16
    expected = LLM(model="tiny", max_model_len=1024).generate(
        prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    )[0]

    def decode_once(request_id: str, transfer_id: int):
        request = worker_pb2.DecodeRequest(
            request=worker_pb2.EngineRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
            ),
            prefill_peer=common_pb2.WorkerRef(
                worker_id=prefill.ready["worker_id"],
                incarnation_id=prefill.ready["incarnation_id"],
                grpc_address=prefill.ready["grpc_address"],
            ),
            transfer_id=transfer_id,
        )
        with grpc.insecure_channel(decode.ready["grpc_address"]) as channel:
            return list(worker_pb2_grpc.WorkerStub(channel).Decode(request, timeout=60))

    block_bytes = 4 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block tokens x kv heads x head dim x fp32
    cold = decode_once("direct-1", 777)
    info = cold[0].prefill
    assert info.is_remote and info.worker_id == prefill.ready["worker_id"]
    assert info.num_cached_tokens == 0
    assert info.transfer.num_blocks == 7 and info.transfer.num_bytes == 7 * block_bytes
    assert [t for r in cold for t in r.token_ids] == list(expected.token_ids)

    warm = decode_once("direct-2", 778)  # the decode worker now caches 6 full blocks of this prompt
    info = warm[0].prefill
    assert info.num_cached_tokens == 96
    assert info.transfer.num_blocks == 1 and info.transfer.num_bytes == block_bytes
    assert [t for r in warm for t in r.token_ids] == list(expected.token_ids)
    wait_idle(cluster_1p1d)


def test_one_token_requests_finish_at_hand_off(cluster_1p1d, offline_tokens):
    """max_tokens=1: the prefill worker's token is the whole answer; the decode side ends at once."""
    with Client(cluster_1p1d.address, timeout=60) as client:
        for i, prompt in enumerate(PROMPTS[:4]):
            result = client.generate(prompt, max_tokens=1, temperature=0, ignore_eos=True)
            assert result.token_ids == offline_tokens[i][:1] and result.finish_reason == "length"
    wait_idle(cluster_1p1d)
