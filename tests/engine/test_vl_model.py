"""The ERNIE-4.5-VL model against transformers' Ernie4_5_VLMoeForConditionalGeneration: prompt logits
with and without images, the 3D RoPE, the checkpoint layout (transposed gates, two-row correction
bias, one expert list for both pools), the config and the presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeTextRotaryEmbedding

from engine.config import ConfigError, ModelConfig
from engine.loader import build_model, load_model
from engine.mm_inputs import MultiModalInputs
from engine.models.ernie4_5_moe import rope_cos_sin, rope_inv_freq
from engine.models.ernie4_5_vl_moe import Ernie4_5_VLMoeForConditionalGeneration, mrope_cos_sin, mrope_pair_axes
from engine.presets import ERNIE_4_5_VL_28B_A3B, PRESETS, TINY_VL, estimate_num_params
from engine.request import Request
from engine.scheduler import ScheduledRequest
from engine.weights import ModelLoadError, load_checkpoint
from tests.helpers import make_kv_cache, make_meta
from tests.helpers.hf_vl_models import (
    hf_vl_logits,
    load_hf_vl_model,
    make_hf_vl_model_dir,
    png,
    prompt_with_images,
)

# (text pieces around the images, image sizes as (height, width) before the processor's resize)
PROMPTS = {
    "text_only": ([[1, 5, 6, 7, 8, 9]], []),
    "28x28": ([[1, 5, 6], [7, 8]], [(28, 28)]),  # resized to 56x56: a 4x4 patch grid, 4 placeholders
    "56x84": ([[1, 5], [9, 10, 11]], [(56, 84)]),  # 4x6 patches
    "100x60": ([[1], [9, 10]], [(100, 60)]),  # resized to 112x56: 8x4 patches
    "two_images": ([[1, 5], [6, 7], [8, 9]], [(28, 28), (100, 60)]),
}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"max |diff| {error:.3g} exceeds {rel} x max |logit| {scale:.3g}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_hf_vl_model_dir(tmp_path_factory.mktemp("vl") / "model", seed=3)


@pytest.fixture(scope="module")
def hf_model(folder: Path):
    return load_hf_vl_model(folder)


@pytest.fixture(scope="module")
def ours(folder: Path):
    return load_model(str(folder))


def _images(sizes: list[tuple[int, int]]) -> list[bytes]:
    return [png(height, width, seed=i) for i, (height, width) in enumerate(sizes)]


@torch.no_grad()
def _prefill_logits(loaded, ids: list[int], items, block_size: int = 4) -> torch.Tensor:
    """Our logits [T, V] of one prompt in one step, inputs built as the runner builds them."""
    model = loaded.model
    num_blocks = -(-len(ids) // block_size)
    cache = make_kv_cache(model.config, 1 + num_blocks, block_size)
    inputs = MultiModalInputs(model, loaded.preprocessor_config, torch.device("cpu"))
    step = inputs.prepare([ScheduledRequest(Request("r", list(ids), mm_items=items), len(ids), True)])
    meta = make_meta([(0, len(ids))], block_size, num_blocks)
    meta.positions = step.positions
    return model.compute_logits(model(torch.tensor(ids), meta, cache, step.batch))


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_logits_match_transformers(name: str, ours, hf_model) -> None:
    pieces, sizes = PROMPTS[name]
    images = _images(sizes)
    ids, items = prompt_with_images(pieces, images)
    assert len(items) == len(images)
    _assert_close(_prefill_logits(ours, ids, items), hf_vl_logits(hf_model, ids, images))


def test_the_image_changes_the_logits(ours) -> None:
    ids, items = prompt_with_images([[1, 5], [6, 7]], [png(56, 56, seed=1)])
    _, other = prompt_with_images([[1, 5], [6, 7]], [png(56, 56, seed=2)])
    before_image = items[0].offset - 1
    first, second = _prefill_logits(ours, ids, items), _prefill_logits(ours, ids, other)
    torch.testing.assert_close(first[:before_image], second[:before_image], rtol=0, atol=1e-5)  # causal
    assert (first[-1] - second[-1]).abs().max() > 1e-2


@pytest.mark.parametrize(("section", "head_dim"), [((22, 22, 20), 128), ((3, 3, 2), 16)])
def test_mrope_matches_transformers_rotary_embedding(section, head_dim) -> None:
    """transformers pre-permutes inv_freq and recomposes cos / sin (then repeats each value for the
    interleaved pair); ours reads each pair's axis. Bit-identical."""
    from transformers import Ernie4_5_VLMoeTextConfig

    config = Ernie4_5_VLMoeTextConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": list(section)},
    )
    positions = torch.randint(0, 3000, (3, 1, 23))
    cos_ref, sin_ref = Ernie4_5_VLMoeTextRotaryEmbedding(config)(torch.zeros(1), positions)
    cos, sin = mrope_cos_sin(positions[:, 0], rope_inv_freq(head_dim, 500000.0), mrope_pair_axes(section))
    assert torch.equal(cos[:, 0].repeat_interleave(2, dim=-1), cos_ref[0])
    assert torch.equal(sin[:, 0].repeat_interleave(2, dim=-1), sin_ref[0])


def test_text_tokens_rotate_as_in_the_text_model() -> None:
    positions = torch.tensor([0, 5, 17, 4095])
    inv_freq = rope_inv_freq(128, 500000.0)
    text = rope_cos_sin(positions, inv_freq)
    vl = mrope_cos_sin(positions.expand(3, -1), inv_freq, mrope_pair_axes((22, 22, 20)))
    assert torch.equal(text[0], vl[0]) and torch.equal(text[1], vl[1])


def test_checkpoint_layout_maps_onto_both_pools(folder: Path, ours, hf_model) -> None:
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_slice("model.layers.1.mlp.gate.weight").get_shape() == [64, 6]  # [H, E]: transposed
        assert handle.get_slice("model.layers.1.mlp.moe_statics.e_score_correction_bias").get_shape() == [2, 6]
    assert "model.layers.1.mlp.experts.11.down_proj.weight" in keys  # vision expert 5 of 6
    assert "model.layers.1.mlp.gate.weight_1" in keys and "model.vision_model.ln.weight" in keys
    theirs = dict(hf_model.named_parameters())
    mine = dict(ours.model.named_parameters())
    for pool in ("text_moe", "vision_moe"):
        hf_pool = f"model.language_model.layers.2.mlp.{pool}"
        our_pool = f"model.layers.2.mlp.{pool}"
        assert torch.equal(mine[f"{our_pool}.gate_weight"], theirs[f"{hf_pool}.gate.weight"])
        bias = theirs[f"{hf_pool}.gate.moe_statics.e_score_correction_bias"]
        assert torch.equal(mine[f"{our_pool}.e_score_correction_bias"], bias[0])
        assert torch.equal(mine[f"{our_pool}.w13"], theirs[f"{hf_pool}.experts.gate_up_proj"])
        assert torch.equal(mine[f"{our_pool}.w2"], theirs[f"{hf_pool}.experts.down_proj"])
    assert mine["model.layers.2.mlp.vision_moe.w13"].shape == (6, 32, 64)  # vision experts: width 16
    hf_spatial = theirs["model.resampler_model.spatial_linear.fc1.weight"]
    assert torch.equal(mine["model.resampler_model.spatial_linear.0.weight"], hf_spatial)
    assert torch.equal(
        mine["model.vision_model.blocks.1.attn.qkv.bias"], theirs["model.vision_tower.blocks.1.attn.qkv.bias"]
    )


def test_expert_range_loads_that_slice_of_both_pools(folder: Path, ours) -> None:
    part = load_model(str(folder), expert_range=(2, 5)).model
    whole = dict(ours.model.named_parameters())
    for name, param in part.named_parameters():
        if name.endswith(("w13", "w2")):
            assert torch.equal(param, whole[name][2:5]), name
        else:
            assert torch.equal(param, whole[name]), name


def _rewrite(folder: Path, target: Path, change) -> Path:
    from safetensors.torch import save_file

    target.mkdir()
    for name in ("config.json",):
        (target / name).write_text((folder / name).read_text())
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("model.vision_model.blocks.0.attn.qkv.weight"), r"missing 1 keys: .*blocks\.0\.attn\.qkv"),
        (
            lambda t: t.update({"model.layers.1.mlp.gate.weight": t["model.layers.1.mlp.gate.weight"].T.contiguous()}),
            r"model\.layers\.1\.mlp\.gate\.weight.*expected \[64, 6\], got \[6, 64\]",
        ),
        (
            lambda t: t.update({"model.layers.1.mlp.moe_statics.e_score_correction_bias": torch.zeros(1, 6)}),
            r"e_score_correction_bias.*expected \[2, 6\]",
        ),
        (lambda t: t.update({"model.layers.1.mlp.experts.12.up_proj.weight": torch.zeros(16, 64)}), "unexpected"),
    ],
)
def test_bad_vl_checkpoints_name_the_key(folder: Path, tmp_path, change, message: str) -> None:
    bad = _rewrite(folder, tmp_path / "bad", change)
    model = build_model(ModelConfig.from_model_dir(folder), "cpu")
    with pytest.raises(ModelLoadError, match=message):
        load_checkpoint(model, bad)


def test_config_reads_transformers_config_and_round_trips(folder: Path) -> None:
    config = ModelConfig.from_model_dir(folder)
    assert config.is_multimodal and config.model_type == "ernie4_5_vl_moe"
    assert (config.moe_intermediate_size, config.vision_moe_intermediate_size) == (32, 16)
    assert config.mrope_section == (3, 3, 2) and config.vision is not None and config.vision.depth == 2
    assert [config.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert config.vision_expert_token_ids == frozenset(range(378, 384))
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    for preset in (TINY_VL, ERNIE_4_5_VL_28B_A3B):
        assert ModelConfig.from_hf_dict(json.loads(json.dumps(preset.to_hf_dict()))) == preset


def _vl_dict(**text_changes) -> dict:
    raw = TINY_VL.to_hf_dict()
    raw["text_config"].update(text_changes)
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_vl_dict(rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2]}), r"mrope_section \(4, 2, 2\)"),
        (_vl_dict(rope_parameters={"rope_type": "default", "mrope_section": [3, 3, 3]}), r"head_dim // 2\s*= 8"),
        ({**TINY_VL.to_hf_dict(), "image_token_id": 384}, r"'image_token_id': 384"),
        (_vl_dict(mlp_layer_types=["dense", "sparse", "dense", "dense"]), None),
        (_vl_dict(mlp_layer_types=["sparse", "dense", "sparse", "sparse"]), "not every n-th layer"),
        (_vl_dict(moe_intermediate_size=[32]), r"\[text, vision\] widths"),
        (_vl_dict(moe_num_experts=[8, 4]), "text and vision experts must agree"),
        ({**TINY_VL.to_hf_dict(), "vision_config": {"hidden_size": 30, "num_heads": 2}}, "multiple of 4"),
    ],
)
def test_bad_vl_config_values_are_named(raw: dict, message: str | None) -> None:
    if message is None:  # a regular pattern (one MoE layer) is fine
        assert [ModelConfig.from_hf_dict(raw).is_moe_layer(i) for i in range(4)] == [False, True, False, False]
        return
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(raw)


def test_text_model_config_takes_no_vl_fields() -> None:
    with pytest.raises(ConfigError, match="takes no VL fields"):
        ModelConfig(image_token_id=5)


def test_vl_presets() -> None:
    tiny = load_model("tiny-vl")
    assert isinstance(tiny.model, Ernie4_5_VLMoeForConditionalGeneration)
    assert tiny.config.vocab_size == tiny.tokenizer.vocab_size == 384 and tiny.config.dtype == "float32"
    assert tiny.config.image_token_id == 380 and tiny.model_hash == load_model("tiny-vl").model_hash
    params = dict(tiny.model.named_parameters())
    assert torch.equal(params["model.vision_model.blocks.0.norm1.weight"], torch.ones(32))
    assert torch.equal(params["model.resampler_model.spatial_linear.3.weight"], torch.ones(128))
    big = PRESETS["ernie-4.5-vl-28b-a3b"]
    assert big.vision is not None and (big.vision.depth, big.vision.hidden_size, big.vision.num_heads) == (32, 1280, 16)
    assert (big.moe_intermediate_size, big.vision_moe_intermediate_size, big.moe_num_experts) == (1536, 512, 64)
    assert (big.hidden_size, big.num_hidden_layers, big.mrope_section, big.dtype) == (
        2560,
        28,
        (22, 22, 20),
        "bfloat16",
    )
    on_meta = build_model(big, "meta")
    assert abs(sum(p.numel() for p in on_meta.parameters()) - estimate_num_params(big)) < 1e-4 * estimate_num_params(
        big
    )
    assert 29.0e9 < estimate_num_params(big) < 29.8e9


def test_expert_parallelism_is_refused_for_the_vl_model(ours) -> None:
    with pytest.raises(ValueError, match=r"expert parallelism does not support the ERNIE-4\.5-VL model"):
        ours.model.set_moe_combine(lambda moe, x: x)
