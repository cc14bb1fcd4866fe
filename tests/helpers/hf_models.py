"""Tiny transformers ERNIE-4.5 MoE checkpoints on disk, and transformers' logits for them.

`make_hf_model_dir` is the fixture engine tests build model folders with; `hf_logits` is the
reference they compare against (transformers' own model, eager attention, fp32).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM
from transformers.utils import logging as hf_logging

from engine.tokenizer import TINY_DIR

hf_logging.disable_progress_bar()

TINY_HF_CONFIG: dict[str, Any] = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "moe_intermediate_size": 32,
    "moe_k": 2,
    "moe_num_experts": 8,
    "moe_num_shared_experts": 1,
    "moe_layer_start_index": 1,
    "moe_layer_interval": 1,
    "bos_token_id": 1,
    "eos_token_id": [2, 4],
    "pad_token_id": 0,
    "tie_word_embeddings": True,
    "use_bias": False,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_hf_model(seed: int = 0, **config_overrides: Any) -> Ernie4_5_MoeForCausalLM:
    """A transformers model of the tiny shape (overrides applied) with seeded, non-trivial weights."""
    config = Ernie4_5_MoeConfig(**{**TINY_HF_CONFIG, **config_overrides})
    model = Ernie4_5_MoeForCausalLM(config).eval()
    randomise(model, seed, config.moe_num_experts)
    return model


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int, num_experts: int, embed_scale: float = 1.0) -> None:
    """Weights that exercise everything: non-unit norms (RMS or Layer), non-zero biases, peaked
    routing with a correction bias large enough to change which experts are picked."""
    generator = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, module in model.named_modules() if "Norm" in type(module).__name__}
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name in norms:
            value = 1.0 + 0.1 * noise
        elif name.endswith("e_score_correction_bias"):
            value = 0.5 / num_experts * noise
        elif name.endswith(".bias"):
            value = 0.05 * noise
        elif name.endswith("embed_tokens.weight"):
            value = embed_scale * noise
        elif name.endswith("gate.weight"):
            value = 2.0 * noise / math.sqrt(param.shape[-1])
        else:
            value = noise / math.sqrt(param.shape[-1])  # fan-in scaling keeps activations O(1)
        param.copy_(value)


def make_hf_model_dir(
    path: str | Path, *, seed: int = 0, layout: str = "per_expert", num_shards: int = 1, **config_overrides: Any
) -> Path:
    """Save a tiny transformers ERNIE-4.5 MoE model to `path` and return the folder.

    layout "per_expert": transformers' `save_pretrained` (per-expert keys, as real checkpoints);
    layout "fused": the in-memory state dict (`experts.gate_up_proj` [E, 2I, H], ...) via safetensors.
    `num_shards` > 1 splits the weights into that many files plus `model.safetensors.index.json`.
    The tiny tokenizer's files are copied in.
    """
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model = make_hf_model(seed, **config_overrides)
    if layout == "per_expert":
        model.save_pretrained(folder)
    else:
        _save_fused(model, folder)
    if num_shards > 1:
        _reshard(folder, num_shards)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_DIR / name, folder / name)
    return folder


def _save_fused(model: Ernie4_5_MoeForCausalLM, folder: Path) -> None:
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.dtype = torch.float32  # save_pretrained of the model records this; config alone does not
    model.config.save_pretrained(folder)


def _reshard(folder: Path, num_shards: int) -> None:
    """Split model.safetensors into `num_shards` files with an index, as sharded checkpoints are."""
    single = folder / "model.safetensors"
    with safe_open(single, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    keys = sorted(tensors)
    weight_map: dict[str, str] = {}
    for shard in range(num_shards):
        name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        shard_keys = keys[shard::num_shards]
        save_file({key: tensors[key] for key in shard_keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    single.unlink()


def load_hf_model(path: str | Path) -> Ernie4_5_MoeForCausalLM:
    """transformers' model from a folder, fp32, eager attention."""
    model = Ernie4_5_MoeForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def hf_logits(path: str | Path | Ernie4_5_MoeForCausalLM, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """transformers' logits [T, V] (float32) for one sequence; `path` may be a folder or a loaded model."""
    model = path if isinstance(path, Ernie4_5_MoeForCausalLM) else load_hf_model(path)
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    return model(input_ids=ids, use_cache=False).logits[0].float()
