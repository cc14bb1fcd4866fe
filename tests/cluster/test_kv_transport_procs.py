"""KV transport acceptance on CPU: real processes, gloo, real block managers.

Each worker is a child process (`kv_nodes.Node`) with its own KV cache, `BlockManager` and gloo
transport; the test drives them like the prefill and decode roles will. Transfers are checked
bit for bit (sha256 of the sender's blocks == of the receiver's blocks, every other receiver
block unchanged), and every test ends with no block in use and the block-manager invariant
holding on every worker it touched.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cluster.kv_transport import PeerRef
from tests.cluster.kv_nodes import NodeHandle, start_nodes

pytestmark = pytest.mark.timeout(180)

# Tiny shape (4 layers, 256 B per block-layer): a 33-token transfer goes in 4 one-layer chunks.
CONFIG = {
    "chunk_bytes": 2048,
    "deadline_base_s": 3.0,
    "deadline_bandwidth": 1e8,
    "expect_timeout_s": 30.0,
    "stream_timeout_s": 6.0,
    "connect_timeout_s": 5.0,
}
FAILED_FAST_S = 5.0  # a failure the transport detects (not a deadline) arrives well within this


def _node(worker_id: str, seed: int, incarnation: str = "i1", **extra: Any) -> dict[str, Any]:
    return {"worker_id": worker_id, "incarnation": incarnation, "seed": seed, "config": CONFIG, **extra}


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, NodeHandle]]:
    specs = {
        "p1": _node("p1", 1),
        "p2": _node("p2", 2),
        "d1": _node("d1", 11),
        "d2": _node("d2", 12),
        "d3": _node("d3", 13),  # a receiver the tests kill
        "p3": _node("p3", 3),  # a sender the tests kill
        "bad": _node("bad", 4, model_hash="another-model"),
    }
    handles = dict(zip(specs, start_nodes(list(specs.values())), strict=True))
    yield handles
    for handle in handles.values():
        handle.stop()


def assert_no_leak(*workers: NodeHandle) -> None:
    for worker in workers:
        stats = worker.call("block_stats")  # also runs BlockManager.check_invariants()
        assert stats["num_used"] == 0, f"{worker.name} leaks blocks: {stats}"


def assert_same_kv(sender: NodeHandle, src: list[int], receiver: NodeHandle, dst: list[int]) -> None:
    assert sender.call("digest", src) == receiver.call("digest", dst), "received KV differs from the sent KV"


def wait_progress(worker: NodeHandle, transfer_id: str, at_least: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.call("progress", transfer_id) < at_least:
        assert time.monotonic() < deadline, f"{worker.name}: {transfer_id} made no progress"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_prefill_to_two_decodes_concurrently_lands_bit_exact_in_the_right_blocks(nodes):
    p1, d1, d2 = nodes["p1"], nodes["d1"], nodes["d2"]
    for decode in (d1, d2):
        decode.call("reset_baseline")
    plan = [(decode, f"fan-{decode.name}-{i}", n) for decode in (d1, d2) for i, n in enumerate([1, 7, 33, 16])]
    dst = {tid: decode.call("expect", p1.peer, tid, n) for decode, tid, n in plan}  # decode allocates first
    src = {tid: p1.call("send", decode.peer, tid, n) for decode, tid, n in plan[:-1]}
    # The last one goes layer-wise, layers marked out of order.
    _, tid, n = plan[-1]
    src[tid] = p1.call("open_send", d2.peer, tid, n)
    p1.call("layer_ready", tid, [2, 0, 3, 1])
    p1.call("finish", tid)
    for decode, tid, _ in plan:
        assert p1.call("wait", tid)["ok"], tid
        assert decode.call("wait", tid)["ok"], tid
        assert_same_kv(p1, src[tid], decode, dst[tid])
    for decode in (d1, d2):
        assert decode.call("untouched_ok"), f"{decode.name}: a block outside the transfers changed"
    for decode, tid, _ in plan:
        p1.call("release", tid)
        decode.call("release", tid)
    assert_no_leak(p1, d1, d2)


def test_two_prefills_into_one_decode_concurrently_land_bit_exact(nodes):
    p1, p2, d1 = nodes["p1"], nodes["p2"], nodes["d1"]
    d1.call("reset_baseline")
    plan = [(prefill, f"fanin-{prefill.name}-{i}", n) for i, n in enumerate([5, 33, 2]) for prefill in (p1, p2)]
    dst = {tid: d1.call("expect", prefill.peer, tid, n) for prefill, tid, n in plan}
    src = {tid: prefill.call("send", d1.peer, tid, n) for prefill, tid, n in plan}
    for prefill, tid, _ in plan:
        assert prefill.call("wait", tid)["ok"], tid
        assert d1.call("wait", tid)["ok"], tid
        assert_same_kv(prefill, src[tid], d1, dst[tid])
        prefill.call("release", tid)
        d1.call("release", tid)
    assert d1.call("untouched_ok")
    assert_no_leak(p1, p2, d1)


def test_abort_before_during_and_after_the_transfer_leaks_no_block(nodes):
    p1, d1 = nodes["p1"], nodes["d1"]

    # Before: decode aborts its expect; the sender's data is drained on arrival, never written.
    d1.call("expect", p1.peer, "ab-before", 9)
    assert d1.call("abort", "ab-before") is True
    assert d1.call("wait", "ab-before")["reason"] == "aborted"
    assert d1.call("release", "ab-before") == 3
    assert d1.call("abort", "ab-before") is False  # idempotent
    assert d1.call("release", "ab-before") == 0
    p1.call("send", d1.peer, "ab-before", 9)
    assert p1.call("wait", "ab-before")["ok"]
    p1.call("release", "ab-before")

    # During, decode side: abort after the first layer landed; the freed blocks are never written again.
    dst = d1.call("expect", p1.peer, "ab-recv", 33)
    p1.call("open_send", d1.peer, "ab-recv", 33)
    p1.call("layer_ready", "ab-recv", [0])
    wait_progress(d1, "ab-recv", 1)
    assert d1.call("abort", "ab-recv") is True
    frozen = d1.call("digest", dst)
    assert d1.call("release", "ab-recv") == 9
    p1.call("layer_ready", "ab-recv", [1, 2, 3])
    p1.call("finish", "ab-recv")
    assert p1.call("wait", "ab-recv")["ok"]  # the sender never learns; its data was drained
    assert d1.call("digest", dst) == frozen, "the receiver wrote into blocks after the abort"
    p1.call("release", "ab-recv")

    # During, prefill side: the sender aborts mid-stream; the receiver's transfer fails ABORTED.
    d1.call("expect", p1.peer, "ab-send", 33)
    p1.call("open_send", d1.peer, "ab-send", 33)
    p1.call("layer_ready", "ab-send", [0])
    wait_progress(d1, "ab-send", 1)
    assert p1.call("abort", "ab-send") is True
    assert p1.call("wait", "ab-send")["reason"] == "aborted"
    assert p1.call("release", "ab-send") == 9
    outcome = d1.call("wait", "ab-send")
    assert outcome["reason"] == "aborted" and outcome["waited"] < FAILED_FAST_S, outcome
    d1.call("release", "ab-send")

    # After: both ends finished; aborting changes nothing.
    dst = d1.call("expect", p1.peer, "ab-after", 12)
    src = p1.call("send", d1.peer, "ab-after", 12)
    assert p1.call("wait", "ab-after")["ok"] and d1.call("wait", "ab-after")["ok"]
    assert d1.call("abort", "ab-after") is False and p1.call("abort", "ab-after") is False
    assert_same_kv(p1, src, d1, dst)
    for worker in (p1, d1):
        assert worker.call("release", "ab-after") == 3
        assert worker.call("release", "ab-after") == 0
    assert_no_leak(p1, d1)

    # The pair survived all of it.
    dst = d1.call("expect", p1.peer, "ab-next", 17)
    src = p1.call("send", d1.peer, "ab-next", 17)
    assert p1.call("wait", "ab-next")["ok"] and d1.call("wait", "ab-next")["ok"]
    assert_same_kv(p1, src, d1, dst)
    p1.call("release", "ab-next")
    d1.call("release", "ab-next")
    assert_no_leak(p1, d1)


def test_handshake_mismatch_fails_both_sides_fast_and_sends_no_payload(nodes):
    bad, d2 = nodes["bad"], nodes["d2"]
    dst = d2.call("expect", bad.peer, "mismatch", 9)
    before = d2.call("digest", dst)
    bad.call("send", d2.peer, "mismatch", 9)
    for worker in (bad, d2):
        outcome = worker.call("wait", "mismatch")
        assert outcome["reason"] == "handshake_mismatch" and outcome["waited"] < FAILED_FAST_S, outcome
        assert "model_hash" in outcome["detail"]
        worker.call("release", "mismatch")
    assert d2.call("digest", dst) == before
    assert_no_leak(bad, d2)


def test_expired_deadline_resets_only_that_pair_and_the_next_transfer_rebuilds_it(nodes):
    p1, d1, d2 = nodes["p1"], nodes["d1"], nodes["d2"]
    built = p1.call("transport_stats")["num_groups_built"]
    # A layer-wise stream whose prefill stalls after one layer: it outlives stream_timeout_s.
    d1.call("expect", p1.peer, "stall", 33)
    p1.call("open_send", d1.peer, "stall", 33)
    p1.call("layer_ready", "stall", [0])
    # Meanwhile the p1 -> d2 pair works normally.
    dst = d2.call("expect", p1.peer, "bystander", 20)
    src = p1.call("send", d2.peer, "bystander", 20)
    assert p1.call("wait", "bystander")["ok"] and d2.call("wait", "bystander")["ok"]
    assert_same_kv(p1, src, d2, dst)
    limit = CONFIG["stream_timeout_s"] + CONFIG["deadline_base_s"] + 2.0
    sent = p1.call("wait", "stall", wait_s=limit)
    assert sent["reason"] == "timeout", sent
    received = d1.call("wait", "stall", wait_s=limit)
    assert received["reason"] in ("timeout", "peer_gone"), received
    # The next transfer on the reset pair rebuilds its group.
    dst2 = d1.call("expect", p1.peer, "after-stall", 6)
    src2 = p1.call("send", d1.peer, "after-stall", 6)
    assert p1.call("wait", "after-stall")["ok"] and d1.call("wait", "after-stall")["ok"]
    assert_same_kv(p1, src2, d1, dst2)
    assert p1.call("transport_stats")["num_groups_built"] > built
    for tid in ("stall", "bystander", "after-stall"):
        p1.call("release", tid)
    for worker, tid in ((d1, "stall"), (d2, "bystander"), (d1, "after-stall")):
        worker.call("release", tid)
    assert_no_leak(p1, d1, d2)


def test_sending_to_a_receiver_that_never_comes_up_fails_within_its_deadline(nodes):
    p2 = nodes["p2"]
    ghost = PeerRef("ghost", "never", "127.0.0.1", free_port())
    p2.call("send", ghost, "to-ghost", 9)
    outcome = p2.call("wait", "to-ghost")
    deadline = CONFIG["deadline_base_s"] + 9 * 1024 / CONFIG["deadline_bandwidth"]
    assert outcome["reason"] in ("peer_gone", "timeout"), outcome
    assert outcome["waited"] < deadline + 1.0, outcome
    p2.call("release", "to-ghost")
    assert_no_leak(p2)


def test_receiver_killed_mid_transfer_fails_the_sender_within_deadline_then_restarted_receiver_reconnects(nodes):
    p1, d1, d3 = nodes["p1"], nodes["d1"], nodes["d3"]
    d3.call("expect", p1.peer, "to-victim", 33)
    p1.call("open_send", d3.peer, "to-victim", 33)
    p1.call("layer_ready", "to-victim", [0])
    wait_progress(d3, "to-victim", 1)
    d3.kill()
    p1.call("layer_ready", "to-victim", [1, 2, 3])
    p1.call("finish", "to-victim")
    outcome = p1.call("wait", "to-victim")
    assert outcome["reason"] in ("peer_gone", "timeout"), outcome
    assert outcome["waited"] < CONFIG["deadline_base_s"] + 1.0, outcome
    p1.call("release", "to-victim")
    # The sender keeps serving: other receivers, and fast failures for the dead one.
    dst = d1.call("expect", p1.peer, "still-serving", 10)
    src = p1.call("send", d1.peer, "still-serving", 10)
    assert p1.call("wait", "still-serving")["ok"] and d1.call("wait", "still-serving")["ok"]
    assert_same_kv(p1, src, d1, dst)
    p1.call("send", d3.peer, "to-dead", 3)
    assert p1.call("wait", "to-dead")["reason"] in ("peer_gone", "timeout")
    for tid in ("still-serving", "to-dead"):
        p1.call("release", tid)
    d1.call("release", "still-serving")
    # The receiver comes back as a new incarnation at the same address. A sender still holding the
    # old incarnation is told so (never mixed up with the new process); the new one is reached.
    [reborn] = start_nodes([_node("d3", 23, incarnation="i2", config={**CONFIG, "port": d3.peer.port})])
    try:
        assert (reborn.peer.host, reborn.peer.port) == (d3.peer.host, d3.peer.port)
        reborn.call("expect", p1.peer, "to-old-incarnation", 3)
        p1.call("send", d3.peer, "to-old-incarnation", 3)
        outcome = p1.call("wait", "to-old-incarnation")
        # Usually the store says at once that the incarnation changed; on a loaded machine the
        # reconnect can outlast the deadline instead. Either way the transfer fails in bounded
        # time, and (below) nothing reaches the new process.
        assert outcome["reason"] in ("peer_restarted", "timeout"), outcome
        assert outcome["waited"] < CONFIG["deadline_base_s"] + 1.0, outcome
        assert reborn.call("wait", "to-old-incarnation", wait_s=0.5)["reason"] == "running"  # nothing arrived
        assert reborn.call("abort", "to-old-incarnation") is True
        dst = reborn.call("expect", p1.peer, "to-reborn", 33)
        src = p1.call("send", reborn.peer, "to-reborn", 33)
        assert p1.call("wait", "to-reborn")["ok"] and reborn.call("wait", "to-reborn")["ok"]
        assert_same_kv(p1, src, reborn, dst)
        for worker in (p1, reborn):
            worker.call("release", "to-reborn")
            worker.call("release", "to-old-incarnation")
        assert_no_leak(p1, d1, reborn)
    finally:
        reborn.stop()


def test_sender_killed_mid_transfer_frees_the_receivers_blocks_then_restarted_sender_reconnects(nodes):
    p3, d1 = nodes["p3"], nodes["d1"]
    d1.call("expect", p3.peer, "from-victim", 33)
    d1.call("expect", p3.peer, "never-started", 5)  # queued behind it at the old incarnation
    p3.call("open_send", d1.peer, "from-victim", 33)
    p3.call("layer_ready", "from-victim", [0])
    wait_progress(d1, "from-victim", 1)
    p3.kill()
    outcome = d1.call("wait", "from-victim")
    assert outcome["reason"] in ("peer_gone", "timeout"), outcome
    assert outcome["waited"] < CONFIG["stream_timeout_s"] + CONFIG["deadline_base_s"] + 1.0, outcome
    assert d1.call("release", "from-victim") == 9
    # The sender comes back as a new incarnation: the old one's pending expect fails, the new one works.
    [reborn] = start_nodes([_node("p3", 33, incarnation="i2")])
    try:
        dst = d1.call("expect", reborn.peer, "from-reborn", 33)
        stale = d1.call("wait", "never-started")
        assert stale["reason"] == "peer_restarted" and stale["waited"] < FAILED_FAST_S, stale
        d1.call("release", "never-started")
        src = reborn.call("send", d1.peer, "from-reborn", 33)
        assert reborn.call("wait", "from-reborn")["ok"] and d1.call("wait", "from-reborn")["ok"]
        assert_same_kv(reborn, src, d1, dst)
        reborn.call("release", "from-reborn")
        d1.call("release", "from-reborn")
        assert_no_leak(d1, reborn)
    finally:
        reborn.stop()
