"""`pdserve up --launcher ray`: the same processes, placed by a (local) Ray instance, serve requests."""

from __future__ import annotations

from cluster.launcher import ClusterSpec
from cluster.launcher_ray import RayCluster
from engine import LLM, SamplingParams
from router.client import Client


def test_ray_launcher_starts_a_cluster_that_serves_token_identical_output():
    prompt = [(i * 7) % 200 + 10 for i in range(30)]
    expected = LLM(model="tiny", max_model_len=1024).generate(
        prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )[0]
    spec = ClusterSpec(
        num_prefill=1,
        num_decode=1,
        router_port=0,
        http_port=0,
        worker_args=("--num-kv-blocks", "128", "--max-model-len", "1024"),
        router_args=("--max-model-len", "1024"),
    )
    cluster = RayCluster(spec)
    try:
        cluster.start()
        assert all(p.alive() for p in [cluster.router, *cluster.workers])
        with Client(cluster.address, timeout=60) as client:
            result = client.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True)
        assert result.token_ids == list(expected.token_ids)
    finally:
        cluster.stop()
    assert not any(p.alive() for p in [cluster.router, *cluster.workers])
