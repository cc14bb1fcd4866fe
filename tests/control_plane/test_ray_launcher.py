"""`pdserve up --launcher ray`: the same processes, placed by a (local) Ray instance, serve requests."""

from __future__ import annotations

import ray

from cluster.launcher import ClusterSpec
from cluster.launcher_ray import RayCluster, with_node_address
from engine import LLM, SamplingParams
from router.client import Client


def test_ray_launcher_starts_a_cluster_that_serves_token_identical_output():
    prompt = [(i * 7) % 200 + 10 for i in range(30)]
    expected = LLM(model="tiny", max_model_len=1024).generate(
        prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )[0]
    # Every process binds all interfaces, as across the nodes of a Ray cluster: each advertises the
    # address of the node Ray placed it on, and everyone dials those.
    spec = ClusterSpec(
        host="0.0.0.0",
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
        node_ip = ray.util.get_node_ip_address()
        assert cluster.address.startswith(f"{node_ip}:") and cluster.registry_url.startswith(f"grpc://{node_ip}:")
        with Client(cluster.address, timeout=60) as client:
            result = client.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True)
        assert result.token_ids == list(expected.token_ids)
    finally:
        cluster.stop()
    assert not any(p.alive() for p in [cluster.router, *cluster.workers])


def test_processes_that_bind_every_interface_advertise_their_node():
    argv = ["worker", "--host", "0.0.0.0", "--port", "0"]
    assert with_node_address(argv, "10.1.2.3") == [*argv, "--advertise-host", "10.1.2.3"]
    told = ["router", "--host", "::", "--advertise-host", "router.internal"]
    assert with_node_address(told, "10.1.2.3") == told
    assert with_node_address(["router", "--host", "127.0.0.1"], "10.1.2.3") == ["router", "--host", "127.0.0.1"]
