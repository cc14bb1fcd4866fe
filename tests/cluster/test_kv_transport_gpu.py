"""KV transport over NCCL between two GPUs (two processes, one GPU each). Runs on the GPU machine.

Proves on real hardware what the gloo tests prove on CPU: whole-prompt and layer-wise transfers
land bit-exact in the named blocks, a layer-wise sender's transfer stream really waits for the
compute stream's writes (a spin kernel delays each write), bursts of many-chunk transfers stay in
order, and an abort mid-transfer stops the receiver's writes at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from tests.cluster.kv_nodes import NodeHandle, start_nodes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

# ERNIE-4.5-21B's KV shape (28 layers x 4 KV heads x 128), a pool of 512 blocks of 16 tokens.
SHAPE = {"num_layers": 28, "num_blocks": 512, "block_size": 16, "num_kv_heads": 4, "head_dim": 128}
CONFIG = {"chunk_bytes": 4 << 20, "deadline_base_s": 10.0, "connect_timeout_s": 60.0, "expect_timeout_s": 120.0}


@pytest.fixture(scope="module")
def gpus() -> Iterator[tuple[NodeHandle, NodeHandle]]:
    common = {"backend": "nccl", "shape": SHAPE, "config": CONFIG, "incarnation": "g1"}
    prefill, decode = start_nodes(
        [
            {"worker_id": "gpu-p", "seed": 1, "device": "cuda:0", **common},
            {"worker_id": "gpu-d", "seed": 2, "device": "cuda:1", **common},
        ],
        timeout=300,
    )
    yield prefill, decode
    prefill.stop()
    decode.stop()


def _check(prefill: NodeHandle, decode: NodeHandle, tid: str, src: list[int], dst: list[int]) -> None:
    sent, received = (
        prefill.call("wait", tid, wait_s=120, timeout=150),
        decode.call("wait", tid, wait_s=120, timeout=150),
    )
    assert sent["ok"], sent
    assert received["ok"], received
    assert prefill.call("digest", src) == decode.call("digest", dst), f"{tid}: received KV differs"


def test_nccl_whole_prompt_transfers_land_bit_exact(gpus):
    prefill, decode = gpus
    decode.call("reset_baseline")
    sizes = [1, 17, 1000, 4096]  # 4096 tokens: 7 MiB per layer, 28 one-layer chunks
    dst = {f"w{n}": decode.call("expect", prefill.peer, f"w{n}", n) for n in sizes}
    src = {f"w{n}": prefill.call("send", decode.peer, f"w{n}", n) for n in sizes}
    for tid in src:
        _check(prefill, decode, tid, src[tid], dst[tid])
    assert decode.call("untouched_ok")
    for tid in src:
        prefill.call("release", tid)
        decode.call("release", tid)
    assert decode.call("block_stats")["num_used"] == prefill.call("block_stats")["num_used"] == 0


def test_nccl_bursts_of_many_chunk_transfers_stay_in_order_and_land_bit_exact(gpus):
    """Whole sends submitted back to back, each cut into 14 chunks through 3 staging buffers: the
    caller's thread begins each one and the pair thread posts what is left. NCCL matches sends to
    receives in posting order, so a transfer begun between another's chunks hangs both sides or
    lands the wrong bytes (seen at f3feae1 with 16 MiB chunks of 4096-token transfers)."""
    prefill, decode = gpus
    for burst in range(20):
        plan = [(f"b{burst}/{i}", 1024) for i in range(6)]  # 2 MiB a layer: 2 layers a 4 MiB chunk
        dst = {tid: decode.call("expect", prefill.peer, tid, n) for tid, n in plan}
        src = prefill.call("send_burst", decode.peer, plan)
        for tid, _ in plan:
            _check(prefill, decode, tid, src[tid], dst[tid])
        for tid, _ in plan:
            prefill.call("release", tid)
            decode.call("release", tid)
    assert decode.call("block_stats")["num_used"] == prefill.call("block_stats")["num_used"] == 0


def test_nccl_layerwise_transfer_waits_for_the_compute_stream_and_lands_bit_exact(gpus):
    prefill, decode = gpus
    dst = decode.call("expect", prefill.peer, "lw", 2000)
    # Each layer's KV is written on the compute stream after a ~1 ms spin, then marked ready.
    src = prefill.call("write_and_stream", decode.peer, "lw", 2000, sleep_cycles=2_000_000, timeout=150)
    _check(prefill, decode, "lw", src, dst)
    for worker in (prefill, decode):
        worker.call("release", "lw")


def test_nccl_abort_mid_transfer_stops_receiver_writes(gpus):
    prefill, decode = gpus
    dst = decode.call("expect", prefill.peer, "ab", 3000)
    prefill.call("open_send", decode.peer, "ab", 3000)
    prefill.call("layer_ready", "ab", [0, 1, 2])
    deadline = time.monotonic() + 60
    while decode.call("progress", "ab") < 1:
        assert time.monotonic() < deadline, "no layer landed"
        time.sleep(0.01)
    assert decode.call("abort", "ab") is True
    frozen = decode.call("digest", dst)
    decode.call("release", "ab")
    prefill.call("finish", "ab")
    assert prefill.call("wait", "ab", wait_s=120, timeout=150)["ok"]  # drained by the receiver
    assert decode.call("digest", dst) == frozen
    prefill.call("release", "ab")
    # The pair still works afterwards.
    dst = decode.call("expect", prefill.peer, "after", 300)
    src = prefill.call("send", decode.peer, "after", 300)
    _check(prefill, decode, "after", src, dst)
    for worker in (prefill, decode):
        worker.call("release", "after")
        assert worker.call("block_stats")["num_used"] == 0
