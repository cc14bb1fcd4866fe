"""The planner's policy on synthetic load reports: hysteresis, cooldown, one worker per role."""

from __future__ import annotations

from cluster.planner import DECODE, PREFILL, Planner, PlannerConfig
from protos.pdserve.v1 import common_pb2, registry_pb2, worker_pb2


def worker(worker_id, role, queued=0, seqs=0, state=common_pb2.WORKER_STATE_READY, epoch=1):
    return registry_pb2.WorkerRecord(
        info=common_pb2.WorkerInfo(
            worker_id=worker_id, incarnation_id="i", host="h", grpc_port=1, role=role, role_epoch=epoch, state=state
        ),
        load=worker_pb2.LoadReport(
            num_queued_prefill_tokens=queued, num_running_requests=seqs, num_kv_blocks_total=100
        ),
    )


CONFIG = PlannerConfig(sustain_windows=3, cooldown_s=10.0, prefill_queue_tokens_high=1000, decode_seqs_high=8)


def prefill_heavy():
    return [worker("p0", PREFILL, queued=5000), worker("d0", DECODE, seqs=1), worker("d1", DECODE, seqs=3)]


def decode_heavy():
    return [worker("p0", PREFILL), worker("p1", PREFILL, queued=10), worker("d0", DECODE, seqs=20)]


def test_sustained_prefill_pressure_flips_the_least_busy_decode_worker():
    planner = Planner(CONFIG)
    assert planner.decide(prefill_heavy(), now=0) is None
    assert planner.decide(prefill_heavy(), now=1) is None
    decision = planner.decide(prefill_heavy(), now=2)
    assert decision is not None and decision.worker_id == "d0"
    assert (decision.from_role, decision.to_role) == (DECODE, PREFILL)
    assert "prefill pressure for 3 windows" in decision.reason


def test_decode_pressure_flips_a_prefill_worker_to_decode():
    planner = Planner(CONFIG)
    decisions = [planner.decide(decode_heavy(), now=t) for t in range(3)]
    assert decisions[:2] == [None, None]
    assert decisions[2].worker_id == "p0" and decisions[2].to_role == DECODE


def test_an_interrupted_streak_starts_over():
    planner = Planner(CONFIG)
    balanced = [worker("p0", PREFILL), worker("d0", DECODE), worker("d1", DECODE)]
    planner.decide(prefill_heavy(), now=0)
    planner.decide(prefill_heavy(), now=1)
    assert planner.decide(balanced, now=2) is None
    assert planner.decide(prefill_heavy(), now=3) is None
    assert planner.decide(prefill_heavy(), now=4) is None
    assert planner.decide(prefill_heavy(), now=5) is not None


def test_cooldown_after_a_flip_prevents_flapping():
    planner = Planner(CONFIG)
    planner.last_flip_at = 0.0
    assert all(planner.decide(decode_heavy(), now=t) is None for t in (1, 2, 3, 9))
    assert planner.decide(decode_heavy(), now=10.5) is not None


def test_never_takes_the_last_worker_of_a_role_nor_flips_while_one_drains():
    planner = Planner(CONFIG)
    lone_decode = [worker("p0", PREFILL, queued=5000), worker("d0", DECODE)]
    assert all(planner.decide(lone_decode, now=t) is None for t in range(5))
    draining = prefill_heavy() + [worker("d2", DECODE, state=common_pb2.WORKER_STATE_DRAINING)]
    planner = Planner(CONFIG)
    assert all(planner.decide(draining, now=t) is None for t in range(5))
