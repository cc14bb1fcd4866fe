"""Control plane with real processes: forced role flips under load, a killed prefill or decode worker,
and a Redis restart — no request fails and every stream stays token-identical to one engine; a
prefill worker's token budget follows its role."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.launcher import ClusterSpec, LocalCluster, Process
from cluster.planner import set_role
from cluster.registry import make_registry
from engine import LLM, SamplingParams
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from router.client import AsyncClient
from tests.integration.conftest import WORKER_ARGS, load_reports, start_cluster, wait_idle

PROMPTS = [[(i * 53 + j * 17) % 280 + 5 for j in range(n)] for i, n in enumerate([6, 40, 19, 70, 3, 25, 51, 12])]


@pytest.fixture(scope="module")
def expected():
    llm = LLM(model="tiny", max_model_len=1024)
    return {
        max_tokens: [
            list(o.token_ids)
            for o in llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        ]
        for max_tokens in (8, 300)
    }


async def steady_load(address: str, stop: asyncio.Event, max_tokens: int, concurrency: int = 6):
    """Requests back to back until `stop`; returns (index, tokens) per completed request."""
    results: list[tuple[int, list[int]]] = []

    async def lane(lane_id: int) -> None:
        async with AsyncClient(address, timeout=120) as client:
            i = lane_id
            while not stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                out = await client.generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                results.append((i % len(PROMPTS), out.token_ids))
                i += concurrency

    await asyncio.gather(*(lane(k) for k in range(concurrency)))
    return results


def test_forced_flip_under_load_loses_nothing_and_bumps_the_epoch(expected):
    cluster = start_cluster(1, 2)
    try:

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(steady_load(cluster.address, stop, max_tokens=8))
            registry = make_registry(cluster.registry_url)
            await asyncio.sleep(1.0)
            flip = await set_role(registry, "decode-2", "prefill", drain_timeout_s=20)
            await asyncio.sleep(1.0)
            back = await set_role(registry, "decode-2", "decode", drain_timeout_s=20)
            await asyncio.sleep(1.0)
            stop.set()
            results = await load
            await registry.close()
            return flip, back, results

        flip, back, results = asyncio.run(scenario())
        assert flip.result == worker_pb2.SET_ROLE_RESULT_OK and flip.role == common_pb2.WORKER_ROLE_PREFILL
        assert back.result == worker_pb2.SET_ROLE_RESULT_OK and back.role == common_pb2.WORKER_ROLE_DECODE
        assert (flip.role_epoch, back.role_epoch) == (2, 3)
        assert len(results) > 10
        for index, tokens in results:
            assert tokens == expected[8][index]
        wait_idle(cluster)
    finally:
        cluster.stop()


def test_killing_a_decode_worker_mid_stream_continues_every_stream_elsewhere(expected):
    cluster = start_cluster(1, 2)
    try:

        async def scenario():
            progress = [0] * 16
            started = asyncio.Event()

            async def one(client: AsyncClient, i: int) -> list[int]:
                tokens: list[int] = []
                finish = None
                async for message in client.stream(PROMPTS[i % 8], max_tokens=300, temperature=0, ignore_eos=True):
                    tokens.extend(message.token_ids)
                    progress[i] = len(tokens)
                    if min(progress) >= 5:
                        started.set()
                    finish = message.finish_reason or finish
                assert finish == common_pb2.FINISH_REASON_LENGTH
                return tokens

            async with AsyncClient(cluster.address, timeout=300) as client:
                jobs = [asyncio.create_task(one(client, i)) for i in range(16)]
                await asyncio.wait_for(started.wait(), timeout=60)  # every stream is under way
                # Kill the decode worker running the most streams (so there is something to continue).
                running = {r.worker_id: r.num_running_requests for r in load_reports(cluster)}
                victim_id = max((w for w in running if w.startswith("decode")), key=running.get)
                assert running[victim_id] > 0, running
                victim = next(w for w in cluster.workers if w.name == victim_id)
                os.kill(victim.popen.pid, signal.SIGKILL)
                return await asyncio.gather(*jobs)

        results = asyncio.run(scenario())
        for i, tokens in enumerate(results):
            assert tokens == expected[300][i % 8], f"stream {i}: duplicated, missing or different tokens"
        # The router saw streams fail on the dead worker and continued them (the log says so).
        assert any("retrying" in line for line in cluster.router.tail), list(cluster.router.tail)
        wait_idle(cluster)
    finally:
        cluster.stop()


KILL_LANES = 16  # concurrent request lanes in the prefill-kill test
KILL_ROUNDS = 5  # requests per lane, back to back
KILL_MAX_TOKENS = 8


def unique_prompt(index: int) -> list[int]:
    """A prompt no other request shares from its first token (prefix caching would skip a prefill)."""
    length = 20 + (index * 29) % 90
    return [5 + index] + [(index * 61 + j * 23) % 280 + 5 for j in range(1, length)]


@pytest.fixture(scope="module")
def expected_unique() -> list[list[int]]:
    llm = LLM(model="tiny", max_model_len=1024)
    prompts = [unique_prompt(i) for i in range(KILL_LANES * KILL_ROUNDS)]
    params = SamplingParams(max_tokens=KILL_MAX_TOKENS, temperature=0, ignore_eos=True)
    return [list(o.token_ids) for o in llm.generate(prompts, params)]


def victim_is_busy(worker: Process) -> bool:
    """The worker holds a request (queued, prefilling, or sending its KV) right now."""
    with grpc.insecure_channel(worker.ready["grpc_address"]) as channel:
        report = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.LoadRequest(), timeout=5)
    return bool(report.num_running_requests or report.num_waiting_requests or report.num_kv_blocks_used)


def router_counter(cluster: LocalCluster, name: str) -> float:
    url = f"http://{cluster.router.ready['metrics_address']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_killing_a_prefill_worker_under_load_completes_every_request(expected_unique):
    """kill -9 of a prefill worker while 16 lanes of unique prompts run: every request finishes
    token-identical to the offline engine (those caught on the dead worker finish on the other)."""
    cluster = start_cluster(2, 1)
    try:
        victim = cluster.workers[0]
        assert victim.name == "prefill-0"

        async def scenario():
            done: dict[int, list[int]] = {}
            warm = asyncio.Event()

            async def lane(client: AsyncClient, lane_id: int) -> None:
                for k in range(KILL_ROUNDS):
                    index = k * KILL_LANES + lane_id
                    out = await client.generate(
                        unique_prompt(index), max_tokens=KILL_MAX_TOKENS, temperature=0, ignore_eos=True
                    )
                    assert out.finish_reason == "length", (index, out.finish_reason)
                    done[index] = out.token_ids
                    if len(done) >= KILL_LANES:
                        warm.set()

            async with AsyncClient(cluster.address, timeout=120) as client:
                lanes = asyncio.gather(*(lane(client, i) for i in range(KILL_LANES)))
                await asyncio.wait_for(warm.wait(), timeout=60)  # a round through both prefill workers
                deadline = time.monotonic() + 10
                while not await asyncio.to_thread(victim_is_busy, victim):
                    assert time.monotonic() < deadline, "the prefill worker never had a request to lose"
                    await asyncio.sleep(0.01)
                num_done_at_kill = len(done)
                os.kill(victim.popen.pid, signal.SIGKILL)
                await lanes
            return done, num_done_at_kill

        done, num_done_at_kill = asyncio.run(scenario())
        victim.popen.wait()
        assert num_done_at_kill < KILL_LANES * KILL_ROUNDS - KILL_LANES  # well before the end of the load
        assert sorted(done) == list(range(KILL_LANES * KILL_ROUNDS))
        for index, tokens in done.items():
            assert tokens == expected_unique[index], f"request {index}: duplicated, missing or different tokens"
        # Requests that met the dead worker before their first token went to the other one
        # (retries); those whose first token was out, their KV still on the wire, were continued
        # from prompt + that token (migrations). Both end token-identical (checked above).
        num_retries = router_counter(cluster, "pdserve_router_retries_total")
        num_migrations = router_counter(cluster, "pdserve_router_migrations_total")
        assert num_retries + num_migrations >= 1, list(cluster.router.tail)
        reports = wait_idle(cluster)  # GetLoad checks every survivor's block-manager invariant
        assert sorted(r.worker_id for r in reports) == ["decode-2", "prefill-1"]
    finally:
        cluster.stop()


def test_redis_restart_during_load_fails_no_request(redis_server, expected):
    cluster = start_cluster(1, 1, registry=redis_server.url)
    try:
        assert len(load_reports(cluster)) == 2

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(steady_load(cluster.address, stop, max_tokens=8, concurrency=4))
            await asyncio.sleep(1.0)
            redis_server.kill()
            await asyncio.sleep(2.0)  # routing on the last known membership
            redis_server.start()
            await asyncio.sleep(2.0)  # workers re-register with their next beats
            stop.set()
            return await load

        results = asyncio.run(scenario())
        assert any("registry unreachable" in line for line in cluster.router.tail), list(cluster.router.tail)
        assert len(results) > 8
        for index, tokens in results:
            assert tokens == expected[8][index]
        registry = make_registry(redis_server.url)
        records = asyncio.run(_list(registry))
        assert sorted(r.info.worker_id for r in records) == ["decode-1", "prefill-0"]
        wait_idle(cluster)
    finally:
        cluster.stop()


async def _list(registry):
    try:
        deadline = time.monotonic() + 5
        while True:
            records = await registry.list_workers()
            if len(records) == 2 or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.1)
    finally:
        await registry.close()


def test_a_draining_worker_reports_not_serving_until_its_switch_commits():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cluster = start_cluster(1, 1)
    try:
        decode = next(w for w in cluster.workers if w.name.startswith("decode"))

        def status() -> int:
            with grpc.insecure_channel(decode.ready["grpc_address"]) as channel:
                request = health_pb2.HealthCheckRequest(service="pdserve.v1.Worker")
                return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status

        async def scenario():
            seen = []
            async with AsyncClient(cluster.address, timeout=120) as client:
                # A long stream keeps the decode worker busy, so its switch must drain.
                stream = asyncio.create_task(
                    client.generate(PROMPTS[1], max_tokens=400, temperature=0, ignore_eos=True)
                )
                await asyncio.sleep(1.0)
                registry = make_registry(cluster.registry_url)
                switch = asyncio.create_task(set_role(registry, "decode-1", "mixed", drain_timeout_s=60))
                while not switch.done():
                    seen.append(await asyncio.to_thread(status))
                    await asyncio.sleep(0.1)
                await stream
                await registry.close()
                return seen, switch.result()

        seen, result = asyncio.run(scenario())
        assert result.result == worker_pb2.SET_ROLE_RESULT_OK
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen  # while draining
        time.sleep(0.3)
        assert status() == health_pb2.HealthCheckResponse.SERVING  # committed: serving again
    finally:
        cluster.stop()


def _prefill_steps(cluster: LocalCluster) -> dict[str, float]:
    """Engine steps that computed prompt tokens so far, per live worker (from its /metrics)."""
    steps = {}
    for worker in cluster.workers:
        url = f"http://{worker.ready['metrics_address']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        steps[worker.name] = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "pdserve_engine_step_duration_seconds_count" and sample.labels.get("kind") == "prefill"
        )
    return steps


def test_a_prefill_worker_runs_its_own_token_budget_until_it_flips_to_mixed(expected):
    budgets = ("--max-num-batched-tokens", "16", "--prefill-max-num-batched-tokens", "128")
    spec = ClusterSpec(num_prefill=1, num_decode=1, router_port=0, worker_args=WORKER_ARGS + budgets)
    cluster = LocalCluster(spec).__enter__()
    try:

        async def generate(index: int) -> list[int]:
            async with AsyncClient(cluster.address, timeout=120) as client:
                out = await client.generate(PROMPTS[index], max_tokens=8, temperature=0, ignore_eos=True)
                return out.token_ids

        def prefill_steps_of_one_request(index: int) -> dict[str, float]:
            before = _prefill_steps(cluster)
            assert asyncio.run(generate(index)) == expected[8][index]
            wait_idle(cluster)
            after = _prefill_steps(cluster)
            return {name: after[name] - before[name] for name in after}

        prefill = next(w.name for w in cluster.workers if w.name.startswith("prefill"))
        decode = next(w.name for w in cluster.workers if w.name.startswith("decode"))
        assert prefill_steps_of_one_request(3) == {prefill: 1, decode: 0}  # 70 tokens: one step under 128

        async def flip() -> worker_pb2.SetRoleResponse:
            registry = make_registry(cluster.registry_url)
            try:
                return await set_role(registry, prefill, "mixed", drain_timeout_s=30)
            finally:
                await registry.close()

        assert asyncio.run(flip()).result == worker_pb2.SET_ROLE_RESULT_OK
        time.sleep(0.6)  # the router syncs from the registry every 0.25 s
        # No prefill worker left: the decode target (either worker) prefills a new prompt (51 tokens,
        # nothing of it cached) itself, in chunks of the budget of 16.
        assert sum(prefill_steps_of_one_request(6).values()) == 4
    finally:
        cluster.stop()
