"""load_model: deterministic presets, model hashes, and clear errors for bad sources."""

from __future__ import annotations

import json

import pytest
import torch

from engine.loader import LoadedModel, ModelLoadError, load_model
from engine.presets import ERNIE_4_5_21B_A3B, PRESETS, estimate_num_params
from engine.tokenizer import Tokenizer
from tests.helpers.hf_models import make_hf_model_dir


def _same_weights(a: LoadedModel, b: LoadedModel) -> bool:
    left, right = a.model.state_dict(), b.model.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_preset_is_deterministic_per_seed() -> None:
    first, again, other = load_model("tiny", seed=1), load_model("tiny", seed=1), load_model("tiny", seed=2)
    assert _same_weights(first, again) and first.model_hash == again.model_hash
    assert not _same_weights(first, other) and first.model_hash != other.model_hash
    assert first.model_hash != load_model("tiny", seed=1, dtype="bfloat16").model_hash


def test_tiny_preset_is_ready_to_serve() -> None:
    loaded = load_model("tiny")
    assert loaded.model_id == "tiny" and loaded.config.dtype == "float32"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size == 384
    assert set(loaded.config.eos_token_ids) == set(loaded.tokenizer.eos_token_ids) == {2, 4}
    params = dict(loaded.model.named_parameters())
    assert torch.equal(params["model.norm.weight"], torch.ones(64))
    bias = params["model.layers.1.mlp.e_score_correction_bias"]
    assert bias.abs().min() > 0 and bias.abs().max() < 0.2


def test_preset_expert_slice_equals_full_model_slice() -> None:
    full = load_model("tiny", seed=3).model.moe_layers()
    part = load_model("tiny", seed=3, expert_range=(5, 8)).model.moe_layers()
    for whole, piece in zip(full, part, strict=True):
        assert torch.equal(piece.w13, whole.w13[5:8]) and torch.equal(piece.w2, whole.w2[5:8])


def test_big_preset_has_the_real_shape() -> None:
    config = PRESETS["ernie-4.5-21b-a3b"]
    assert config is ERNIE_4_5_21B_A3B and config.dtype == "bfloat16"
    assert [config.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert 21.5e9 < estimate_num_params(config) < 22.0e9  # ~43.7 GB in bf16


def test_folder_loads_with_its_tokenizer_and_a_stable_hash(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path / "a", seed=1)
    first, again = load_model(str(folder)), load_model(str(folder))
    assert first.model_id == str(folder) and first.config.dtype == "float32"
    assert first.model_hash == again.model_hash
    assert isinstance(first.tokenizer, Tokenizer) and first.tokenizer.eos_token_ids == {2, 4}
    other = load_model(str(make_hf_model_dir(tmp_path / "b", seed=2)))
    assert other.model_hash != first.model_hash


@pytest.mark.parametrize("source", ["no-such-preset", "/nonexistent/model/folder"])
def test_unknown_source_lists_the_presets(source: str) -> None:
    with pytest.raises(ModelLoadError, match=r"ernie-4\.5-21b-a3b, ernie-4\.5-vl-28b-a3b, tiny, tiny-vl"):
        load_model(source)


def test_bad_dtype_is_named() -> None:
    with pytest.raises(ModelLoadError, match="'float8'"):
        load_model("tiny", dtype="float8")


def test_malformed_config_json(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=0)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"malformed config\.json"):
        load_model(str(folder))


def test_wrong_value_type_in_config_json(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=0)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        load_model(str(folder))


def test_unsupported_model_type(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=0)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        load_model(str(folder))


def test_folder_without_weights_or_tokenizer(tmp_path) -> None:
    folder = make_hf_model_dir(tmp_path, seed=0)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_model(str(folder))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.json or tokenizer\.model"):
        load_model(str(folder))
