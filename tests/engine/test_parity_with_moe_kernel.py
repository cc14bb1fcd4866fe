"""The engine's parity tests again, with the Triton MoE kernels on (float32, the CPU interpreter).

The checks are the ones of test_model.py and test_engine_parity.py, run in a `TRITON_INTERPRET=1`
worker (`tests/engine/kernels/parity_cases.py`); every case returns how often each Triton function
was called, and the tests assert those counts, so a run that fell back to the references fails.

The interpreter is slow (a decode step of the 3-layer tiny model costs ~0.1 s per MoE layer and
~0.4 s more with the attention, norm and RoPE kernels too), so this file runs a subset:
  prompt logits vs transformers: four configs (`default`: one shared expert, top-2, GQA 2;
      `no_shared_experts`; `moe_every_second_layer`; `all_layers_moe_top1`), with the whole
      `moe_backend="triton"` set (prefill only: cheap);
  batched greedy (32 tokens) vs transformers and one-at-a-time, and chunked prefill + prefix-cache
      hits vs cold: `interval2_topk3` (top-3, one MoE layer, GQA 4), with only routing and experts on
      Triton. tests/engine/test_backends.py runs the tiny presets end to end with every kernel on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.engine.kernels.interpreter_worker import InterpreterWorker
from tests.engine.test_engine_parity import NUM_TOKENS

CASES = "tests.engine.kernels.parity_cases"
MOE_KERNELS = {"route", "experts"}
ALL_KERNELS = MOE_KERNELS | {"attention", "norm", "rope_write_kv"}


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterWorker]:
    worker = InterpreterWorker()
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_models"))


# (config of test_model.CONFIGS, its number of MoE layers: one prefill pass calls each kernel once per layer)
@pytest.mark.parametrize(
    ("name", "num_moe_layers"),
    [("default", 2), ("no_shared_experts", 2), ("moe_every_second_layer", 2), ("all_layers_moe_top1", 3)],
)
def test_prompt_logits_match_transformers_with_the_triton_kernels(interpreter, tmp_path, name, num_moe_layers):
    calls = interpreter.call(f"{CASES}:prompt_logits", name=name, root=str(tmp_path), kernels="all")
    assert set(calls) == ALL_KERNELS, calls
    assert calls["route"] == calls["experts"] == num_moe_layers, calls


def test_batched_greedy_matches_transformers_and_single_runs_with_the_triton_moe_kernel(interpreter, tmp_root):
    calls = interpreter.call(f"{CASES}:batched_greedy", name="interval2_topk3", root=tmp_root, kernels="moe")
    assert set(calls) == MOE_KERNELS, calls
    # one MoE layer; at least one step per token of the batched run and of each of the three single runs
    assert calls["route"] == calls["experts"] >= 4 * NUM_TOKENS, calls


def test_chunked_prefill_and_prefix_hits_give_cold_tokens_with_the_triton_moe_kernel(interpreter, tmp_root):
    calls = interpreter.call(
        f"{CASES}:chunked_prefill_and_prefix_hits", name="interval2_topk3", root=tmp_root, kernels="moe"
    )
    assert set(calls) == MOE_KERNELS, calls
    # six generate calls (cold, chunked, cached twice, a longer prompt cached and cold) of >= 32 steps each
    assert calls["route"] == calls["experts"] >= 6 * NUM_TOKENS, calls
