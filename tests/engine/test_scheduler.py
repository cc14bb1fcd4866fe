"""Scheduler: chunked prefill under the token budget, continuous batching, preemption by recompute."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from engine.block_manager import BlockManager
from engine.config import ConfigError, SchedulerConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import SampledToken, Scheduler


def make_scheduler(num_blocks=64, block_size=4, budget=16, max_seqs=8, prefix=True, chunked=True) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=256, enable_chunked_prefill=chunked
    )
    return Scheduler(config, BlockManager(num_blocks, block_size, prefix), max_model_len=256)


def make_request(rid: str, n: int, max_tokens: int = 4, eos=frozenset()) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), eos_token_ids=eos)


def run_step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sampled = {s.request.request_id: SampledToken(token) for s in out.scheduled if s.samples}
    return out, sched.update(out, sampled)


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    sched = make_scheduler(budget=8)
    req = make_request("a", 20)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out, _ = run_step(sched)
        chunks.append([(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled])
    assert chunks == [[("a", 8, False)], [("a", 8, False)], [("a", 4, True)]]
    assert req.num_output_tokens == 1 and req.num_computed_tokens == 20


def test_decodes_are_scheduled_before_new_prompts_share_the_budget():
    sched = make_scheduler(budget=10, prefix=False)
    a = make_request("a", 6)
    sched.add_request(a)
    run_step(sched)  # a prefilled, 1 token out
    b = make_request("b", 12)
    sched.add_request(b)
    out, _ = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 9)]


def test_prefill_only_steps_take_the_prefill_budget_and_give_it_back():
    config = SchedulerConfig(max_num_batched_tokens=8, max_model_len=256, prefill_max_num_batched_tokens=32)
    sched = Scheduler(config, BlockManager(64, 4, False), max_model_len=256)
    sched.add_request(make_request("a", 20))
    sched.add_request(make_request("b", 20))
    sched.set_prefill_only(True)
    out, _ = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 20), ("b", 12)]
    sched.set_prefill_only(False)
    sched.add_request(make_request("c", 20))
    out, _ = run_step(sched)  # a and b decode one token each, c gets what is left of 8
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    assert SchedulerConfig(max_num_batched_tokens=8).prefill_budget == 8  # None: one budget for every role
    assert config.largest_step_tokens == 32


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8192"])
def test_prefill_budget_must_be_a_positive_integer(bad):
    with pytest.raises(
        ConfigError, match=re.escape(f"prefill_max_num_batched_tokens must be a positive integer or None, got {bad!r}")
    ):
        SchedulerConfig(prefill_max_num_batched_tokens=bad)


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(budget=64, max_seqs=2)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 4))
    out, _ = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_without_chunking_a_prompt_over_budget_waits():
    sched = make_scheduler(budget=8, chunked=False)
    sched.add_request(make_request("big", 9))
    out, _ = run_step(sched)
    assert out.is_empty


def test_finishes_on_max_tokens_and_eos_and_frees_blocks():
    sched = make_scheduler()
    a = make_request("a", 5, max_tokens=3)
    b = make_request("b", 5, max_tokens=10, eos=frozenset({7}))
    sched.add_request(a)
    sched.add_request(b)
    _, results = run_step(sched, token=7)
    assert [r.finished for r in results] == [False, True]
    assert b.status is RequestStatus.FINISHED_STOPPED and b.block_ids == []
    run_step(sched, token=8)
    _, results = run_step(sched, token=8)
    assert results[0].finished and a.status is RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == [7, 8, 8]
    sched.block_manager.check_invariants()
    assert sched.block_manager.stats().num_used == 0


def test_preempts_the_latest_request_when_blocks_run_out_and_recomputes_it():
    # 4 blocks of 4 tokens: two 8-token prompts fit (2 blocks each); their first decode needs a fifth.
    sched = make_scheduler(num_blocks=4, block_size=4, budget=32, prefix=False)
    a, b = make_request("a", 8, max_tokens=6), make_request("b", 8, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # both prefilled: blocks full, one token out each
    out, _ = run_step(sched)  # each needs a third block: b is preempted so a can grow
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.output_token_ids == [7]  # kept: recomputed later from prompt + output
    while not a.is_finished:
        run_step(sched)
    # With a done, b is readmitted and recomputes its 9 tokens (prompt + 1 output) in one chunk.
    out, _ = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 9)]
    while not b.is_finished:
        run_step(sched)
    assert b.num_output_tokens == 6 and b.num_preemptions == 1
    sched.block_manager.check_invariants()
    assert sched.block_manager.stats().num_used == 0


def test_prefix_cache_hit_skips_computed_tokens():
    sched = make_scheduler(budget=64)
    a = make_request("a", 13, max_tokens=1)
    sched.add_request(a)
    run_step(sched)
    b = make_request("b", 13, max_tokens=1)
    sched.add_request(b)
    out, _ = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 1)]
    assert b.num_cached_tokens == 12


def test_abort_is_idempotent_and_frees_blocks():
    sched = make_scheduler()
    a = make_request("a", 9)
    sched.add_request(a)
    run_step(sched)
    assert sched.abort(a) is True
    assert sched.abort(a) is False
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert sched.block_manager.stats().num_used == 0


def test_abort_during_a_step_drops_its_update():
    sched = make_scheduler()
    a = make_request("a", 5)
    sched.add_request(a)
    out = sched.schedule()
    sched.abort(a)
    assert sched.update(out, {"a": SampledToken(3)}) == []
    assert a.output_token_ids == []


def test_scheduler_and_block_manager_import_without_torch():
    code = (
        "import sys, engine.scheduler, engine.block_manager, engine.request, engine.config, engine.sampling_params;"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
