"""The model runner: the step inputs it builds (tokens and KV slots of any chunk, one host buffer);
its warm-up: which token counts it runs, that it writes only the scratch block, and (on a GPU) that
serving after it compiles no Triton kernel variant it had not compiled."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import _slot_range, _token_range, warm_up_token_counts
from engine.request import Request
from engine.scheduler import ScheduledRequest, SchedulerOutput


@pytest.mark.parametrize("start", [0, 1, 15, 16, 17, 40, 47, 48])
@pytest.mark.parametrize("length", [1, 2, 16, 17, 33])
def test_token_and_slot_ranges_equal_a_walk_over_every_position(start, length):
    prompt, output = list(range(100, 140)), list(range(900, 920))  # 40 prompt tokens, 20 output
    block_ids = [7, 3, 11, 0, 5]  # 16-token blocks out of order
    end = min(start + length, 60)
    everything = prompt + output
    assert _token_range(prompt, output, start, end) == everything[start:end]
    assert _slot_range(block_ids, 16, start, end) == [block_ids[p // 16] * 16 + p % 16 for p in range(start, end)]


def test_prepare_lays_out_a_mixed_step_with_padded_block_tables():
    llm = LLM("tiny", num_kv_blocks=32)
    runner = llm.engine.runner
    chunk = Request("chunk", list(range(1, 41)))
    chunk.block_ids, chunk.num_computed_tokens = [4, 9, 2], 16  # tokens 16..39 of a 40-token prompt
    decoding = Request("decoding", [5, 6, 7], output_token_ids=[8])
    decoding.block_ids, decoding.num_computed_tokens = [30], 3
    inputs = runner.prepare(SchedulerOutput((ScheduledRequest.of(chunk, 24), ScheduledRequest.of(decoding, 1))))
    assert inputs.input_ids.tolist() == list(range(17, 41)) + [8]
    assert inputs.meta.positions.tolist() == list(range(16, 40)) + [3]
    assert inputs.meta.slot_mapping.tolist() == [9 * 16 + i for i in range(16)] + [2 * 16 + i for i in range(8)] + [483]
    assert inputs.meta.block_tables.tolist() == [[4, 9, 2], [30, 0, 0]]
    assert inputs.meta.seq_lens_tensor.dtype == torch.int32 and inputs.meta.seq_lens_tensor.tolist() == [40, 4]
    assert inputs.sample_rows.tolist() == [23, 24] and inputs.sample_request_ids == ("chunk", "decoding")


def test_warm_up_counts_cover_each_power_of_two_a_count_off_the_multiples_of_16_and_the_budget():
    assert warm_up_token_counts(1) == [1]
    assert warm_up_token_counts(100) == [1, 2, 4, 5, 7, 8, 11, 16, 19, 32, 35, 64, 67, 100]
    counts = warm_up_token_counts(2048)
    assert counts[-1] == 2048 and 2051 not in counts
    assert {c for c in counts if c % 16} and {1 << k for k in range(12)} <= set(counts)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1, got 0"):
        warm_up_token_counts(0)


def test_warm_up_writes_only_the_scratch_block():
    llm = LLM("tiny", num_kv_blocks=32)
    runner = llm.engine.runner
    runner.kv_cache = torch.cat([runner.kv_cache, torch.zeros_like(runner.kv_cache[:, :, :1])], dim=2)
    managed = runner.kv_cache[:, :, :32].clone()
    runner.warm_up([1, 5, 19, 40], scratch_block=32)
    assert torch.equal(runner.kv_cache[:, :, :32], managed)
    assert bool(runner.kv_cache[:, :, 32].abs().sum() > 0)


def _compiled_variants() -> dict[str, int]:
    """Compiled binaries per Triton kernel of engine.kernels, over every device."""
    from triton.runtime.jit import JITFunction

    import engine.kernels as package

    counts = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, fn in vars(module).items():
            if isinstance(fn, JITFunction):
                caches = [next(c for c in entry if isinstance(c, dict)) for entry in fn.device_caches.values()]
                counts[f"{info.name}.{name}"] = sum(len(cache) for cache in caches)
    return counts


@pytest.mark.gpu
def test_serving_after_the_warm_up_compiles_no_new_kernel_variant():
    llm = LLM("tiny", device="cuda", num_kv_blocks=512, max_num_seqs=16, max_num_batched_tokens=512)
    assert llm.engine.kv_cache.shape[2] == 513  # the managed blocks and the scratch block
    compiled = _compiled_variants()
    assert sum(compiled.values()) > 0
    # Prompts of awkward lengths, one longer than a step's budget (chunked, then with context), batched
    # with decodes of the others: prefill, mixed and decode steps of many token counts.
    lengths = (1, 7, 85, 300, 511, 512, 700, 1023)
    prompts = [[(7 * i + j) % 380 + 3 for j in range(n)] for i, n in enumerate(lengths)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert [len(out.token_ids) for out in outputs] == [6] * len(prompts)
    new = {name: n - compiled.get(name, 0) for name, n in _compiled_variants().items() if n != compiled.get(name, 0)}
    assert new == {}, f"kernel variants compiled while serving: {new}"
