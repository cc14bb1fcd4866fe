"""The model runner's warm-up: which token counts it runs, that it writes only the scratch block,
and (on a GPU) that serving after it compiles no Triton kernel variant it had not compiled."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import warm_up_token_counts


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
