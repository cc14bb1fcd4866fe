"""The engine's ERNIE-4.5 MoE model against transformers' (the definition of correctness), and the
paged-cache invariants: chunked prefill, decode and mixed batches give the same logits as one pass."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.kernels.fused_moe_ref import fused_moe_ref
from engine.loader import load_model
from engine.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM, ModelBackends, SparseMoE
from tests.helpers import make_kv_cache, make_meta, num_blocks_for, prefill_logits
from tests.helpers.hf_models import hf_logits, make_hf_model_dir

CONFIGS = {
    "default": {},
    "no_shared_experts": {"moe_num_shared_experts": 0},
    "two_shared_experts": {"moe_num_shared_experts": 2},
    "moe_every_second_layer": {"num_hidden_layers": 4, "moe_layer_interval": 2},
    "all_layers_moe_top1": {"moe_layer_start_index": 0, "moe_k": 1},
    "moe_end_index": {"num_hidden_layers": 4, "moe_layer_end_index": 2},
    "no_gqa": {"num_key_value_heads": 4},
    "gqa_4": {"num_attention_heads": 8, "num_key_value_heads": 2},
    "use_bias": {"use_bias": True},
    "untied_embeddings": {"tie_word_embeddings": False},
    "rope_theta_1e4": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}


def _token_ids(n: int, seed: int = 0, vocab: int = 384) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"max |diff| {error:.3g} exceeds {rel} x max |logit| {scale:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_logits_match_transformers(name: str, tmp_path) -> None:
    check_prompt_logits_match_transformers(name, tmp_path)


def check_prompt_logits_match_transformers(name: str, root: Path, backends: ModelBackends | None = None) -> None:
    """Config `name` saved under `root`; our prompt logits (with `backends`, else the references) vs transformers'.
    tests/engine/test_parity_with_moe_kernel.py runs it again with the Triton MoE kernels."""
    folder = make_hf_model_dir(root / name, seed=3, **CONFIGS[name])
    ids = _token_ids(19, seed=len(name))
    model = load_model(str(folder)).model
    if backends is not None:
        model.set_backends(backends)
    _assert_close(prefill_logits(model, ids, block_size=4), hf_logits(folder, ids))


@pytest.fixture(scope="module")
def tiny() -> Ernie4_5_MoeForCausalLM:
    return load_model("tiny").model


def test_chunked_prefill_matches_one_pass(tiny: Ernie4_5_MoeForCausalLM) -> None:
    ids = _token_ids(23, seed=1)
    expected = prefill_logits(tiny, ids, block_size=4)
    cache = make_kv_cache(tiny.config, num_blocks_for(1, 6), block_size=4)
    first = tiny.compute_logits(tiny(torch.tensor(ids[:10]), make_meta([(0, 10)], 4, 6), cache))
    second = tiny.compute_logits(tiny(torch.tensor(ids[10:]), make_meta([(10, 13)], 4, 6), cache))
    _assert_close(torch.cat([first, second]), expected)


def test_token_by_token_decode_matches_one_pass(tiny: Ernie4_5_MoeForCausalLM) -> None:
    ids = _token_ids(9, seed=2)
    expected = prefill_logits(tiny, ids, block_size=4)
    cache = make_kv_cache(tiny.config, num_blocks_for(1, 3), block_size=4)
    rows = [
        tiny.compute_logits(tiny(torch.tensor([tok]), make_meta([(pos, 1)], 4, 3), cache))
        for pos, tok in enumerate(ids)
    ]
    _assert_close(torch.cat(rows), expected)


def test_flat_batch_of_two_sequences_matches_each_alone(tiny: Ernie4_5_MoeForCausalLM) -> None:
    a, b = _token_ids(7, seed=3), _token_ids(12, seed=4)
    cache = make_kv_cache(tiny.config, num_blocks_for(2, 3), block_size=4)
    hidden = tiny(torch.tensor(a + b), make_meta([(0, 7), (0, 12)], 4, 3), cache)
    logits = tiny.compute_logits(hidden)
    _assert_close(logits[:7], prefill_logits(tiny, a))
    _assert_close(logits[7:], prefill_logits(tiny, b))


def test_mixed_batch_of_decode_and_prefill_chunk(tiny: Ernie4_5_MoeForCausalLM) -> None:
    a, b = _token_ids(6, seed=5), _token_ids(8, seed=6)
    cache = make_kv_cache(tiny.config, num_blocks_for(2, 2), block_size=4)
    tiny(torch.tensor(a[:5] + b[:3]), make_meta([(0, 5), (0, 3)], 4, 2), cache)
    hidden = tiny(torch.tensor(a[5:] + b[3:]), make_meta([(5, 1), (3, 5)], 4, 2), cache)
    logits = tiny.compute_logits(hidden)
    _assert_close(logits[:1], prefill_logits(tiny, a)[5:])
    _assert_close(logits[1:], prefill_logits(tiny, b)[3:])


def test_forward_writes_kv_only_at_slot_mapping(tiny: Ernie4_5_MoeForCausalLM) -> None:
    cache = make_kv_cache(tiny.config, num_blocks_for(1, 2), block_size=4)
    tiny(torch.tensor(_token_ids(5)), make_meta([(0, 5)], 4, 2), cache)
    written = cache.flatten(2, 3).abs().sum(dim=(0, 1, 3, 4)) != 0  # per flat slot
    assert written.nonzero().flatten().tolist() == [4, 5, 6, 7, 8]  # blocks 1 and 2; block 0 untouched


def test_logits_are_float32_and_hidden_in_model_dtype() -> None:
    model = load_model("tiny", dtype="bfloat16").model
    ids = _token_ids(5)
    cache = make_kv_cache(model.config, num_blocks_for(1, 2), 4, dtype=torch.bfloat16)
    hidden = model(torch.tensor(ids), make_meta([(0, 5)], 4, 2), cache)
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (5, model.config.hidden_size)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (5, model.config.vocab_size)
    for moe in model.moe_layers():
        assert moe.gate_weight.dtype == torch.float32 and moe.e_score_correction_bias.dtype == torch.float32
    full = load_model("tiny").model
    assert (logits.argmax(-1) == prefill_logits(full, ids).argmax(-1)).float().mean() >= 0.8


def test_expert_computation_goes_through_the_swappable_function(tiny: Ernie4_5_MoeForCausalLM) -> None:
    calls: list[int] = []

    def counting_experts(hidden, w13, w2, topk_weights, topk_ids, *, expert_offset=0):  # the Triton kernel's form
        calls.append(expert_offset)
        return fused_moe_ref(hidden, w13, w2, topk_weights, topk_ids, expert_offset)

    ids = _token_ids(6)
    expected = prefill_logits(tiny, ids)
    try:
        tiny.set_backends(ModelBackends(experts=counting_experts))
        _assert_close(prefill_logits(tiny, ids), expected)
    finally:
        tiny.set_backends(ModelBackends())
    assert len(calls) == len(tiny.moe_layers()) == 3


def test_expert_parallel_slices_sum_to_the_full_layer() -> None:
    full = load_model("tiny").model.moe_layers()[0]
    halves = [load_model("tiny", expert_range=r).model.moe_layers()[0] for r in ((0, 3), (3, 8))]
    assert [(m.expert_offset, m.num_local_experts) for m in halves] == [(0, 3), (3, 5)]
    x = torch.randn(11, full.gate_weight.shape[1], generator=torch.Generator().manual_seed(0))
    combined = sum(m.routed(x) for m in halves) + full.shared_experts(x)
    torch.testing.assert_close(combined, full(x), rtol=1e-5, atol=1e-5)
    assert isinstance(full, SparseMoE) and full.num_local_experts == 8


def test_bad_kv_cache_shape_is_rejected(tiny: Ernie4_5_MoeForCausalLM) -> None:
    cache = torch.zeros(2, 2, 3, 4, 2, 16)
    with pytest.raises(ValueError, match=r"kv_cache must be \[L=4"):
        tiny(torch.tensor([1, 2]), make_meta([(0, 2)], 4, 1), cache)
