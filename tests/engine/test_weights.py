"""Checkpoint loading: both key layouts, shards, expert slices, and errors that name the bad key."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.loader import build_model, load_model
from engine.weights import ModelLoadError, load_checkpoint, plan_checkpoint
from tests.helpers import prefill_logits
from tests.helpers.hf_models import hf_logits, make_hf_model_dir

IDS = [1, 17, 250, 33, 90, 3, 311, 42, 42, 8, 120]
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    folder = make_hf_model_dir(tmp_path_factory.mktemp("per_expert"), seed=7)
    return folder, hf_logits(folder, IDS)


def _edit(folder: Path, change: Callable[[Tensors], None]) -> Path:
    """Rewrite a single-file checkpoint with `change` applied to its tensors."""
    path = folder / "model.safetensors"
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_layouts_and_shards_load_to_the_same_logits(layout: str, num_shards: int, reference, tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7, layout=layout, num_shards=num_shards)
    if num_shards > 1:
        assert len(list(folder.glob("*.safetensors"))) == num_shards
        assert (folder / "model.safetensors.index.json").is_file()
    _, expected = reference
    logits = prefill_logits(load_model(str(folder)).model, IDS)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_per_expert_and_fused_give_identical_weights(reference, tmp_path) -> None:
    fused = load_model(str(make_hf_model_dir(tmp_path, seed=7, layout="fused"))).model.state_dict()
    per_expert = load_model(str(reference[0])).model.state_dict()
    assert fused.keys() == per_expert.keys()
    for key, value in fused.items():
        assert torch.equal(value, per_expert[key]), key


def test_unknown_key_is_named(reference, tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7)
    _edit(folder, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(ModelLoadError, match=r"unexpected keys: model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_model(str(folder))


def test_missing_key_is_named(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7)
    _edit(folder, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing 1 keys: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(str(folder))


def test_shape_mismatch_names_key_and_shapes(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7)
    _edit(folder, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ModelLoadError, match=r"'model\.norm\.weight': expected \[64\], got \[63\]"):
        load_model(str(folder))


def test_fused_expert_shape_mismatch_is_named(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7, layout="fused")
    key = "model.layers.2.mlp.experts.down_proj"
    _edit(folder, lambda t: t.update({key: torch.zeros(7, 64, 32)}))
    with pytest.raises(ModelLoadError, match=rf"'{key}': expected \[8, 64, 32\], got \[7, 64, 32\]"):
        load_model(str(folder))


def test_mtp_keys_and_tied_lm_head_are_ignored(reference, tmp_path) -> None:
    def add_extras(tensors: Tensors) -> None:
        tensors["model.mtp_block.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
        tensors["model.mtp_emb_norm.0.weight"] = torch.ones(64)
        tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(64, 128)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    folder = _edit(make_hf_model_dir(tmp_path, seed=7), add_extras)
    logits = prefill_logits(load_model(str(folder)).model, IDS)
    torch.testing.assert_close(logits, reference[1], rtol=0, atol=1e-4 * reference[1].abs().max().item())


def test_untied_checkpoint_without_lm_head_is_missing_it(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7, tie_word_embeddings=False)
    _edit(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match=r"missing 1 keys: lm_head\.weight"):
        load_model(str(folder))


def test_both_layouts_at_once_is_an_error(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7)
    _edit(folder, lambda t: t.update({"model.layers.1.mlp.experts.down_proj": torch.zeros(8, 64, 32)}))
    with pytest.raises(ModelLoadError, match=r"twice: model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight"):
        load_model(str(folder))


def test_index_naming_a_missing_shard_is_an_error(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7, num_shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model-00009-of-00009\.safetensors"):
        load_model(str(folder))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_range_loads_only_that_slice(layout: str, reference, tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=7, layout=layout)
    full = load_model(str(reference[0])).model
    part = load_model(str(folder), expert_range=(2, 5)).model
    for whole, piece in zip(full.moe_layers(), part.moe_layers(), strict=True):
        assert (piece.expert_offset, piece.num_local_experts) == (2, 3)
        assert torch.equal(piece.w13, whole.w13[2:5]) and torch.equal(piece.w2, whole.w2[2:5])
        assert torch.equal(piece.gate_weight, whole.gate_weight)
    plan = plan_checkpoint(folder, part.config, (2, 5))
    read_experts = {key.split(".")[5] for c in plan for key in c.provides if ".experts." in key}
    assert read_experts == {"2", "3", "4"}


def test_bf16_load_keeps_router_in_fp32(reference) -> None:
    loaded = load_model(str(reference[0]), dtype="bfloat16")
    assert loaded.config.dtype == "bfloat16"
    for name, param in loaded.model.named_parameters():
        fp32 = name.endswith(("gate_weight", "e_score_correction_bias"))
        assert param.dtype == (torch.float32 if fp32 else torch.bfloat16), name


def test_load_checkpoint_rejects_a_model_of_another_shape(reference) -> None:
    config = load_model(str(reference[0])).config
    other = build_model(replace(config, moe_num_shared_experts=0), "cpu")
    with pytest.raises(ModelLoadError, match="shared_experts"):
        load_checkpoint(other, reference[0])
