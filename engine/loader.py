"""`load_model`: a preset name or a Hugging Face folder -> a ready model, its config and tokenizer.

dtype rule: the `dtype` argument when given, else the config's dtype: `float32` for `tiny` and
`tiny-vl`, `bfloat16` for the real shapes, and for a folder whatever its `config.json` says (bf16
for the real checkpoints, also on CPU: pass `dtype="float32"` to trade memory for CPU speed).

A VL config (`ernie4_5_vl_moe`) builds `Ernie4_5_VLMoeForConditionalGeneration`; its folder's
`preprocessor_config.json` (the image processor's settings) is read into
`LoadedModel.preprocessor_config` (a VL preset reads its assets' file, `engine/assets/tiny-vl`;
a text model has none).

Parameters are allocated directly on the target device in the target dtype (the router weight
and correction bias stay fp32) and filled in place, tensor by tensor: preset weights from seeded
generators (`engine.presets.init_random_weights`), folder weights from safetensors
(`engine.weights.load_checkpoint`). Peak memory is the model plus one tensor.

`model_hash` identifies architecture + weights, so two processes loading the same source agree:
presets hash (config, seed, where the random numbers were drawn), folders hash (config.json, the
safetensors index, every safetensors file's name, size, header and last 64 KiB: no full read);
both include the dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError, ModelConfig
from engine.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from engine.models.ernie4_5_vl_moe import Ernie4_5_VLMoeForConditionalGeneration
from engine.presets import PRESETS, init_random_weights, rng_device_type
from engine.tokenizer import Tokenizer, TokenizerError, model_dir
from engine.weights import INDEX_FILE, ModelLoadError, load_checkpoint

__all__ = ["LoadedModel", "ModelLoadError", "build_model", "load_config", "load_model"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: eval mode, on its device, no parameter requires grad."""

    model: Ernie4_5_MoeForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    model_id: str  # what the caller passed: a preset name or a folder path
    model_hash: str  # sha256 hex of architecture + weights identity (see the module doc)
    preprocessor_config: dict[str, Any] = field(default_factory=dict)  # a VL folder's image processor settings


def load_model(
    source: str,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    seed: int = 0,
    expert_range: tuple[int, int] | None = None,
) -> LoadedModel:
    """Load a preset (`tiny`, `ernie-4.5-21b-a3b`, `tiny-vl`, `ernie-4.5-vl-28b-a3b`) or a Hugging Face model folder.

    `seed` only matters for presets. `expert_range=(start, end)` keeps only those experts in
    each MoE layer (expert parallelism). Raises ModelLoadError for an unknown source, a bad
    config, tokenizer or checkpoint; the message names the bad value.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if source in PRESETS:
        return _load_preset(source, device, dtype, seed, expert_range)
    if Path(source).is_dir():
        return _load_folder(source, device, dtype, expert_range)
    raise ModelLoadError(
        f"model {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing model folder"
    )


def load_config(source: str, *, dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` `load_model(source, dtype=dtype)` would build, without loading weights
    (a worker sizes its expert-parallel group from it). Raises ModelLoadError like `load_model`."""
    if dtype is not None and dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if source in PRESETS:
        return replace(PRESETS[source], dtype=dtype or PRESETS[source].dtype)
    if Path(source).is_dir():
        try:
            return ModelConfig.from_model_dir(source, dtype=dtype)
        except ConfigError as exc:
            raise ModelLoadError(f"cannot load model folder {source!r}: {exc}") from exc
    raise ModelLoadError(
        f"model {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing model folder"
    )


def build_model(
    config: ModelConfig, device: str | torch.device, expert_range: tuple[int, int] | None = None
) -> Ernie4_5_MoeForCausalLM:
    """An uninitialised model in `config.dtype`, allocated directly on `device` (the VL model for a VL config)."""
    model_cls = Ernie4_5_VLMoeForConditionalGeneration if config.is_multimodal else Ernie4_5_MoeForCausalLM
    with _default_dtype(_DTYPES[config.dtype]), torch.device(device):
        return model_cls(config, expert_range=expert_range)


def _load_preset(
    name: str, device: str, dtype: str | None, seed: int, expert_range: tuple[int, int] | None
) -> LoadedModel:
    config = replace(PRESETS[name], dtype=dtype or PRESETS[name].dtype)
    model = build_model(config, device, expert_range)
    init_random_weights(model, seed)
    identity = {"preset": config.to_hf_dict(), "seed": seed, "rng": rng_device_type(config, device)}
    preprocessor = _preprocessor_config(model_dir(name)) if config.is_multimodal else {}
    return _finish(model, config, Tokenizer.for_model(name), name, _sha256_json(identity), preprocessor)


def _load_folder(path: str, device: str, dtype: str | None, expert_range: tuple[int, int] | None) -> LoadedModel:
    folder = Path(path)
    try:
        config = ModelConfig.from_model_dir(folder, dtype=dtype)
        tokenizer = Tokenizer.from_dir(folder)
    except (ConfigError, TokenizerError) as exc:
        raise ModelLoadError(f"cannot load model folder {path!r}: {exc}") from exc
    preprocessor = _preprocessor_config(folder) if config.is_multimodal else {}
    model = build_model(config, device, expert_range)
    load_checkpoint(model, folder)
    return _finish(model, config, tokenizer, path, _folder_hash(folder, config.dtype), preprocessor)


def _preprocessor_config(folder: Path) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"malformed {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _finish(
    model: Ernie4_5_MoeForCausalLM,
    config: ModelConfig,
    tokenizer: Tokenizer,
    model_id: str,
    model_hash: str,
    preprocessor_config: dict[str, Any] | None = None,
) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, config, tokenizer, model_id, model_hash, preprocessor_config or {})


def _folder_hash(folder: Path, dtype: str) -> str:
    files = sorted(folder.glob("*.safetensors"))
    index = folder / INDEX_FILE
    identity = {
        "config": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        "index": hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else None,
        "files": [(file.name, file.stat().st_size, _file_fingerprint(file)) for file in files],
        "dtype": dtype,
    }
    return _sha256_json(identity)


def _file_fingerprint(path: Path, sample_bytes: int = 1 << 16) -> str:
    """sha256 of a safetensors file's header (names, dtypes, shapes) and last bytes: cheap at any
    size, and it tells apart checkpoints of one architecture whose files have equal sizes."""
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        digest = hashlib.sha256(handle.read(min(header_len, 1 << 24)))
        handle.seek(max(0, path.stat().st_size - sample_bytes))
        digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


def _sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
