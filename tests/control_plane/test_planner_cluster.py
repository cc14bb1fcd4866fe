"""The planner against a real cluster: a prefill-heavy phase then a decode-heavy one flip a worker
each way, and no worker flaps."""

from __future__ import annotations

import asyncio

from cluster.launcher import ClusterSpec, LocalCluster
from cluster.planner import Planner, PlannerConfig
from cluster.registry import make_registry
from router.client import AsyncClient

LONG_PROMPTS = [[(i * 7 + j) % 250 + 20 for j in range(900)] for i in range(16)]
SHORT_PROMPTS = [[i + 3, i + 4, i + 5] for i in range(16)]


async def phase(address: str, prompts, max_tokens: int, seconds: float, concurrency: int) -> int:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0

    async def lane(k: int) -> None:
        nonlocal done
        async with AsyncClient(address, timeout=120) as client:
            i = k
            while loop.time() < end:
                await client.generate(prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0, ignore_eos=True)
                done += 1
                i += concurrency

    await asyncio.gather(*(lane(k) for k in range(concurrency)))
    return done


def test_workload_shift_flips_a_worker_each_way_without_flapping():
    # Pools big enough that the decode workers admit every long prompt: the queue builds on prefill.
    spec = ClusterSpec(
        num_prefill=1,
        num_decode=2,
        router_port=0,
        http_port=0,
        worker_args=("--num-kv-blocks", "2048", "--max-model-len", "1024"),
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
            prefill_done = await phase(cluster.address, LONG_PROMPTS, 1, seconds=8.0, concurrency=16)
            after_prefill = dict(planner.decisions)
            decode_done = await phase(cluster.address, SHORT_PROMPTS, 160, seconds=10.0, concurrency=16)
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
