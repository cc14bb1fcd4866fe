"""Fixtures that start real local clusters (router + worker processes over loopback gRPC)."""

from __future__ import annotations

import time

import grpc
import pytest

from cluster.launcher import ClusterSpec, LocalCluster
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

WORKER_ARGS = ("--num-kv-blocks", "256", "--max-model-len", "1024")


def start_cluster(num_prefill: int, num_decode: int, router_args: tuple[str, ...] = (), **kw) -> LocalCluster:
    spec = ClusterSpec(
        num_prefill=num_prefill,
        num_decode=num_decode,
        router_port=0,
        worker_args=WORKER_ARGS,
        router_args=("--max-model-len", "1024", *router_args),
        **kw,
    )
    return LocalCluster(spec).__enter__()


@pytest.fixture(scope="module")
def cluster_1p1d():
    cluster = start_cluster(1, 1)
    yield cluster
    cluster.stop()


def load_reports(cluster: LocalCluster) -> list[worker_pb2.LoadReport]:
    reports = []
    for worker in cluster.workers:
        if worker.popen.poll() is not None:
            continue
        with grpc.insecure_channel(worker.ready["grpc_address"]) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            reports.append(stub.GetLoad(worker_pb2.LoadRequest(), timeout=5))
    return reports


def wait_idle(cluster: LocalCluster, timeout: float = 10.0) -> list[worker_pb2.LoadReport]:
    """Every live worker idle with no KV block in use (GetLoad also checks the block invariant)."""
    deadline = time.monotonic() + timeout
    while True:
        reports = load_reports(cluster)
        busy = [r for r in reports if r.num_kv_blocks_used or r.num_running_requests or r.num_waiting_requests]
        if not busy:
            return reports
        if time.monotonic() > deadline:
            raise AssertionError(f"workers still hold work or blocks: {busy}")
        time.sleep(0.1)
