"""The planner against a real cluster: a prefill-heavy phase then a decode-heavy one flip a worker
each way, and no worker flaps."""

from __future__ import annotations

import asyncio

from cluster.launcher import ClusterSpec, LocalCluster
from cluster.planner import Planner, PlannerConfig
from cluster.registry import make_registry
from router.client import AsyncClient


def long_prompt(n: int) -> list[int]:
    # Every request gets a prompt of its own (its first block differs), so the prefix cache never
    # shortcuts a prefill and the queue stays long for as long as the phase runs, on any machine.
    return [n % 200 + 20, n // 200 % 200 + 20] + [(n * 7 + j) % 250 + 20 for j in range(898)]


def short_prompt(n: int) -> list[int]:
    return [n % 16 + 3, n % 16 + 4, n % 16 + 5]


async def phase(address: str, make_prompt, max_tokens: int, seconds: float, concurrency: int) -> int:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0
    issued = 0

    async def lane() -> None:
        nonlocal done, issued
        async with AsyncClient(address, timeout=120) as client:
            while loop.time() < end:
                prompt = make_prompt(issued)
                issued += 1
                await client.generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                done += 1

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return done


def test_workload_shift_flips_a_worker_each_way_without_flapping():
    # Pools big enough that the decode workers admit every long prompt: the queue builds on prefill.
    # The prefill worker keeps 2048-token steps (its default is 8192): at 8192 this CPU load drains
    # its queue too fast to hold the planner's threshold for two windows.
    spec = ClusterSpec(
        num_prefill=1,
        num_decode=2,
        router_port=0,
        http_port=0,
        worker_args=("--num-kv-blocks", "2048", "--max-model-len", "1024", "--prefill-max-num-batched-tokens", "2048"),
        router_args=("--max-model-len", "1024"),
    )
    cluster = LocalCluster(spec).__enter__()
    config = PlannerConfig(
        window_s=0.5,
        sustain_windows=2,
        cooldown_s=3.0,
        prefill_queue_tokens_high=1500,
        ttft_slo_s=30.0,
        decode_seqs_high=5,
        decode_kv_usage_high=0.99,
        itl_slo_s=10.0,
        drain_timeout_s=10.0,
    )
    planner = Planner(config)
    try:

        async def scenario():
            registry = make_registry(cluster.registry_url)
            task = asyncio.create_task(planner.run(registry))
            prefill_done = await phase(cluster.address, long_prompt, 1, seconds=8.0, concurrency=16)
            after_prefill = dict(planner.decisions)
            decode_done = await phase(cluster.address, short_prompt, 160, seconds=10.0, concurrency=16)
            task.cancel()
            await registry.close()
            return prefill_done, after_prefill, decode_done

        prefill_done, after_prefill, decode_done = asyncio.run(scenario())
        assert prefill_done > 0 and decode_done > 0
        assert after_prefill == {("decode", "prefill", "SET_ROLE_RESULT_OK"): 1}, planner.decisions
        assert dict(planner.decisions) == {
            ("decode", "prefill", "SET_ROLE_RESULT_OK"): 1,
            ("prefill", "decode", "SET_ROLE_RESULT_OK"): 1,
        }
    finally:
        cluster.stop()
