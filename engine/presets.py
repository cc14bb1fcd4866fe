"""Named model shapes with random weights, for tests and benchmarks.

* `tiny`: CPU-fast (hidden 64, 4 layers, 8 experts), float32, vocabulary = the committed tiny
  byte-level tokenizer (`engine/assets/tiny`, 384 ids); eos = `</s>` and `<|end_of_sentence|>`.
* `ernie-4.5-21b-a3b`: the real ERNIE-4.5-21B-A3B shape, bfloat16 (~43.7 GB of weights). It is
  served with the tiny tokenizer too (no real vocabulary ships offline): text encodes into ids
  below 384, and sampled ids above the tokenizer's range decode to nothing.
* `tiny-vl`: `tiny` with sight (ERNIE-4.5-VL): a 2-block vision tower, vision experts, 3D RoPE;
  float32, the same 384 ids, with the image / video tokens of the tiny-vl tokenizer
  (`engine/assets/tiny-vl`): `TINY_VL_TOKEN_IDS`.
* `ernie-4.5-vl-28b-a3b`: the real ERNIE-4.5-VL-28B-A3B shape (transformers' defaults for
  `baidu/ERNIE-4.5-VL-28B-A3B-PT`), bfloat16, served with the tiny-vl tokenizer and its image /
  video token ids (`TINY_VL_TOKEN_IDS`), as the 21B preset is served with the tiny tokenizer.

`init_random_weights` fills a built model deterministically from a seed: every tensor (every
expert, separately) draws from its own generator seeded by `(seed, parameter name, expert id)`,
so the result does not depend on construction order, and an expert-parallel rank holding experts
[s, e) gets exactly the full model's slice. Tensors are filled in place on their device: no
second copy of the weights is ever made.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from engine.config import PRESET_NAMES, ModelConfig, VisionConfig
from engine.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM, RMSNorm, SparseMoE

TINY = ModelConfig(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    moe_intermediate_size=32,
    moe_k=2,
    moe_num_experts=8,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    bos_token_id=1,
    eos_token_ids=(2, 4),  # </s>, <|end_of_sentence|> in the tiny tokenizer
    pad_token_id=0,
    dtype="float32",
)

ERNIE_4_5_21B_A3B = ModelConfig(
    vocab_size=103424,
    hidden_size=2560,
    intermediate_size=12288,
    num_hidden_layers=28,
    num_attention_heads=20,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    moe_intermediate_size=1536,
    moe_k=6,
    moe_num_experts=64,
    moe_num_shared_experts=2,
    moe_layer_start_index=1,
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=0,
    dtype="bfloat16",
)

# The media tokens of the tiny-vl tokenizer (engine/assets/tiny-vl/make_tokenizer.py): its last six ids.
TINY_VL_TOKEN_IDS = {
    "image_start_token_id": 378,
    "image_end_token_id": 379,
    "image_token_id": 380,
    "video_start_token_id": 381,
    "video_end_token_id": 382,
    "video_token_id": 383,
}

TINY_VL = replace(
    TINY,
    model_type="ernie4_5_vl_moe",
    vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2),
    vision_moe_intermediate_size=16,
    mrope_section=(3, 3, 2),  # head_dim 16: 8 rotary pairs
    **TINY_VL_TOKEN_IDS,
)

ERNIE_4_5_VL_28B_A3B = replace(
    ERNIE_4_5_21B_A3B,
    model_type="ernie4_5_vl_moe",
    vision=VisionConfig(),  # depth 32, hidden 1280, 16 heads, MLP 5120, patch 14, merge 2
    moe_intermediate_size=1536,
    vision_moe_intermediate_size=512,
    mrope_section=(22, 22, 20),
    # Served with the tiny-vl tokenizer (no real vocabulary ships offline), so its media tokens are
    # that tokenizer's; a real checkpoint's config.json brings the real ids (100295 ...).
    **TINY_VL_TOKEN_IDS,
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": TINY,
    "ernie-4.5-21b-a3b": ERNIE_4_5_21B_A3B,
    "tiny-vl": TINY_VL,
    "ernie-4.5-vl-28b-a3b": ERNIE_4_5_VL_28B_A3B,
}
if tuple(PRESETS) != PRESET_NAMES:
    raise RuntimeError(f"engine.config.PRESET_NAMES {PRESET_NAMES} must list the presets {tuple(PRESETS)}")

MATRIX_STD = 0.02
# Below this many parameters the random numbers are drawn on the CPU and copied, so a small preset
# has the same weights on every device; above it they are drawn on the target device (fast, no
# host copy) and therefore differ between CPU and CUDA (the model hash records which).
CPU_RNG_MAX_PARAMS = 1 << 28


def rng_device_type(config: ModelConfig, device: torch.device | str) -> str:
    """Where `init_random_weights` draws numbers for this config on this device: 'cpu' or the device's type."""
    return "cpu" if estimate_num_params(config) <= CPU_RNG_MAX_PARAMS else torch.device(device).type


def estimate_num_params(config: ModelConfig) -> int:
    """Parameter count of the full model (all experts), without building it."""
    h, d = config.hidden_size, config.head_dim
    attn = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    dense = 3 * h * config.intermediate_size
    moe = config.moe_num_experts * (3 * h * config.moe_intermediate_size + h)
    moe += 3 * h * config.moe_intermediate_size * config.moe_num_shared_experts
    moe += config.moe_num_experts * (3 * h * config.vision_moe_intermediate_size + h)  # VL: the vision pool
    layers = sum(attn + (moe if config.is_moe_layer(i) else dense) for i in range(config.num_hidden_layers))
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return layers + config.vocab_size * h + head + _vision_num_params(config)


def _vision_num_params(config: ModelConfig) -> int:
    """Matrices and biases of a VL model's vision tower and resampler (0 for a text model)."""
    vision = config.vision
    if vision is None:
        return 0
    d, window = vision.hidden_size, vision.hidden_size * vision.spatial_merge_size**2
    block = 4 * d * d + 2 * d * vision.intermediate_size
    resampler = 2 * window * window + 2 * window * window + window * window + window * config.hidden_size
    return vision.patch_dim * d + vision.depth * block + resampler


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _fill_normal(tensor: Tensor, std: float, seed: int, name: str, rng_device: str) -> None:
    generator = torch.Generator(device=rng_device).manual_seed(_tensor_seed(seed, name))
    if tensor.device.type == rng_device:
        tensor.normal_(0.0, std, generator=generator)
    else:
        values = torch.empty(tensor.shape, dtype=tensor.dtype, device=rng_device).normal_(0.0, std, generator=generator)
        tensor.copy_(values)


def _init_std(name: str, config: ModelConfig) -> float | None:
    """Std of a parameter's normal init; None means 'ones' (norm weights) or 'zeros' (biases)."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return None
    if name.endswith("gate_weight"):
        return 1.0 / math.sqrt(config.hidden_size)  # router logits ~N(0, 1): a peaked, non-trivial softmax
    if name.endswith("e_score_correction_bias"):
        return 0.25 / config.moe_num_experts  # comparable to gaps between probabilities: it changes selections
    if name.endswith(("o_proj.weight", "down_proj.weight", "w2")):
        return MATRIX_STD / math.sqrt(2 * config.num_hidden_layers)  # residual branches: keep the stream sane
    return MATRIX_STD


@torch.no_grad()
def init_random_weights(model: Ernie4_5_MoeForCausalLM, seed: int) -> None:
    """Fill every parameter of `model` in place, deterministically from `seed` (see the module doc)."""
    config = model.config
    rng_device = rng_device_type(config, model.model.embed_tokens.weight.device)
    offsets = {
        f"{name}.{p}": m.expert_offset
        for name, m in model.named_modules()
        if isinstance(m, SparseMoE)
        for p in ("w13", "w2")
    }
    norm_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (RMSNorm, nn.LayerNorm))}
    for name, param in model.named_parameters():
        std = _init_std(name, config)
        if name in norm_weights:
            param.fill_(1.0)
        elif std is None:
            param.fill_(0.0)
        elif name in offsets:
            for local, expert in enumerate(param):
                _fill_normal(expert, std, seed, f"{name}[{offsets[name] + local}]", rng_device)
        else:
            _fill_normal(param, std, seed, name, rng_device)
