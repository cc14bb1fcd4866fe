"""ERNIE-4.5-VL MoE: the ERNIE-4.5 text model (`engine.models.ernie4_5_moe`) extended with sight.

The arithmetic follows transformers' `Ernie4_5_VLMoeForConditionalGeneration`; what it adds to
the text model, and nothing else:

* a vision tower: patches (`[P, C * patch^2]`, as the image processor flattens them) -> linear
  patch embedding -> ViT blocks (LayerNorm, bidirectional attention within each frame, 2D RoPE,
  quick-GELU MLP) -> LayerNorm;
* a resampler: each spatial_merge^2 window of patches is concatenated and projected (MLP +
  LayerNorm), an image's frame is paired with itself (a video's frames with the next one) and
  projected again, then mapped to the text width and RMS-normalised: one embedding per
  placeholder token of the prompt;
* 3D RoPE in the decoder: rotary pair j of a head turns with the token's h position (j < h + w,
  j even), w position (j < h + w, j odd) or t position (j >= h + w) for `mrope_section = (h, w, t)`.
  transformers pre-permutes its inverse frequencies and recomposes cos / sin so that pair j keeps
  frequency `inv_freq[j]`; only the position each pair reads changes. So the interleaved rotation
  of the text model (its RoPE + KV-write backend too) is reused unchanged on these cos / sin
  tables, and a text token (equal positions on all axes) rotates exactly as in the text model;
* MoE layers with two routed pools (`MultiModalMoE`): text experts and vision experts, each a
  `SparseMoE` with its own gate and correction bias (so both run the same routing and fused-expert
  backends); a token goes to the vision pool when it is an image / video placeholder or a start /
  end marker of the prompt (transformers' `moe_mm_token_type_ids`); shared experts are common.

A step's multimodal inputs come as one `MultiModalBatch` (built by `engine.mm_inputs`); without it
(`mm=None`) every token is text at `meta.positions` on all three axes, which is what every decode
step is (a generated token at index i sits at i + mrope_delta), so decode runs the text path and
can be replayed from CUDA graphs.

Parameter names beyond the text model's (`engine.models.ernie4_5_moe`), as the checkpoint keys:

    model.layers.{i}.mlp.{text_moe,vision_moe}.{gate_weight [E, H], e_score_correction_bias [E],
        w13 [E_local, 2 I, H], w2 [E_local, H, I]}   (I: moe_intermediate_size / vision_moe_intermediate_size)
    model.layers.{i}.mlp.shared_experts.{gate_up_proj, down_proj}.weight
    model.vision_model.patch_embed.proj.weight [Dv, C p^2]
    model.vision_model.blocks.{b}.{norm1, norm2}.{weight, bias}, .attn.qkv.{weight [3 Dv, Dv], bias},
        .attn.proj.{weight, bias}, .mlp.{fc1, fc2}.{weight, bias};   model.vision_model.ln.{weight, bias}
    model.resampler_model.{spatial_linear, temporal_linear}.{0 (fc1), 2 (fc2), 3 (LayerNorm)}.{weight, bias},
        .mlp.{weight, bias} [H, 4 Dv], .after_norm.weight [H]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig, VisionConfig
from engine.models.ernie4_5_moe import (
    MLP,
    DecoderLayer,
    Ernie4_5_MoeForCausalLM,
    Ernie4_5_MoeModel,
    Linear,
    ModelBackends,
    MoECombine,
    RMSNorm,
    SparseMoE,
    rope_cos_sin,
    rope_inv_freq,
)

Grid = tuple[int, int, int]  # (t, h, w) patches of one image or video, as the image processor reports it


@dataclass(frozen=True)
class MultiModalBatch:
    """What a step with prompt images needs beyond the text model's inputs (flat batch of T tokens)."""

    positions: Tensor  # [3, T] int64: (t, h, w) rotary positions of every token
    vision_mask: Tensor  # [T] bool: tokens for the vision experts
    image_rows: Tensor  # [N] int64: rows of the flat batch that take an image embedding
    image_embeds: Tensor  # [N, H]: those embeddings (resampler outputs), in row order


# ---------------------------------------------------------------------------------------------
# 3D RoPE of the decoder
# ---------------------------------------------------------------------------------------------

AXIS_T, AXIS_H, AXIS_W = 0, 1, 2  # rows of MultiModalBatch.positions


def mrope_pair_axes(mrope_section: Sequence[int]) -> Tensor:
    """[head_dim / 2] int64: which position axis rotary pair j reads (see the module doc)."""
    num_h, num_w, num_t = mrope_section
    spatial = [AXIS_H if j % 2 == 0 else AXIS_W for j in range(num_h + num_w)]
    return torch.tensor(spatial + [AXIS_T] * num_t, dtype=torch.long)


def mrope_cos_sin(positions: Tensor, inv_freq: Tensor, pair_axes: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 (cos, sin) [T, 1, D/2] for positions [3, T]: pair j turns by `positions[axis_j] * inv_freq[j]`."""
    pair_positions = positions.index_select(0, pair_axes).T  # [T, D/2]
    angles = pair_positions.float() * inv_freq
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


# ---------------------------------------------------------------------------------------------
# Decoder: two expert pools per MoE layer
# ---------------------------------------------------------------------------------------------


class MultiModalMoE(nn.Module):
    """Text experts for text tokens, vision experts for vision tokens, shared experts for all.

    Each pool is a `SparseMoE` without shared experts of its own (same routing and expert
    backends as the text model; an expert-parallel range slices both pools alike).
    """

    def __init__(self, config: ModelConfig, backends: ModelBackends, expert_range: tuple[int, int] | None) -> None:
        super().__init__()
        self.text_moe = SparseMoE(config, backends, expert_range, num_shared_experts=0)
        self.vision_moe = SparseMoE(
            config,
            backends,
            expert_range,
            intermediate_size=config.vision_moe_intermediate_size,
            num_shared_experts=0,
        )
        width = config.moe_intermediate_size * config.moe_num_shared_experts
        self.shared_experts = MLP(config.hidden_size, width, config.use_bias) if width > 0 else None

    def forward(self, x: Tensor, vision_mask: Tensor | None) -> Tensor:
        if vision_mask is None:
            out = self.text_moe.routed(x)
        else:
            out = torch.empty_like(x)
            for pool, rows in ((self.text_moe, (~vision_mask).nonzero()), (self.vision_moe, vision_mask.nonzero())):
                rows = rows.squeeze(1)
                if rows.numel():
                    out.index_copy_(0, rows, pool.routed(x.index_select(0, rows)))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class VLDecoderLayer(DecoderLayer):
    """The text model's layer whose MoE block splits tokens between the two pools."""

    def make_mlp(
        self, config: ModelConfig, layer_idx: int, backends: ModelBackends, expert_range: tuple[int, int] | None
    ) -> nn.Module:
        if config.is_moe_layer(layer_idx):
            return MultiModalMoE(config, backends, expert_range)
        return super().make_mlp(config, layer_idx, backends, expert_range)

    def feed_forward(self, normed: Tensor, vision_mask: Tensor | None = None) -> Tensor:
        if isinstance(self.mlp, MultiModalMoE):
            return self.mlp(normed, vision_mask)
        return self.mlp(normed)


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


def apply_half_split_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX-style RoPE on x [N, heads, D]: element i < D/2 pairs with i + D/2, turning by angle i.

    Computed in fp32 and cast back, like transformers' `apply_rotary_pos_emb_vision`.
    """
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(x.dtype)


def vision_patch_positions(grid: Grid, merge_size: int) -> tuple[Tensor, Tensor]:
    """(row, column) [t*h*w] of each patch in the processor's order: merge windows row-major,
    patches row-major inside a window, frames one after another."""
    t, h, w = grid
    shape = (h // merge_size, w // merge_size, merge_size, merge_size)
    rows = torch.arange(h).view(h // merge_size, 1, merge_size, 1).expand(shape).flatten()
    cols = torch.arange(w).view(1, w // merge_size, 1, merge_size).expand(shape).flatten()
    return rows.repeat(t), cols.repeat(t)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention within each frame, with 2D RoPE."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = vision.num_heads, vision.head_dim
        self.qkv = Linear(vision.hidden_size, 3 * vision.hidden_size, bias=True)
        self.proj = Linear(vision.hidden_size, vision.hidden_size, bias=True)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], frame_lens: list[int]) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(1)  # [N, heads, Dh] each
        q, k = apply_half_split_rope(q, *rope), apply_half_split_rope(k, *rope)
        frames = [
            F.scaled_dot_product_attention(qf.transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1)).transpose(0, 1)
            for qf, kf, vf in zip(q.split(frame_lens), k.split(frame_lens), v.split(frame_lens), strict=True)
        ]
        return self.proj(torch.cat(frames).flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(vision.hidden_size, vision.intermediate_size, bias=True)
        self.fc2 = Linear(vision.intermediate_size, vision.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick GELU


class VisionBlock(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(vision.hidden_size, eps=vision.rms_norm_eps)
        self.norm2 = nn.LayerNorm(vision.hidden_size, eps=vision.rms_norm_eps)
        self.attn = VisionAttention(vision)
        self.mlp = VisionMLP(vision)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], frame_lens: list[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, frame_lens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.proj = Linear(vision.patch_dim, vision.hidden_size, bias=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class VisionTransformer(nn.Module):
    """Patches [P, C p^2] of images with patch grids `grids` -> patch features [P, Dv]."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.merge_size = vision.spatial_merge_size
        self.patch_embed = PatchEmbed(vision)
        self.blocks = nn.ModuleList(VisionBlock(vision) for _ in range(vision.depth))
        self.ln = nn.LayerNorm(vision.hidden_size, eps=vision.rms_norm_eps)
        # h and w each take half of a head's rotary frequencies
        self.register_buffer("inv_freq", rope_inv_freq(vision.head_dim // 2, vision.rope_theta), persistent=False)

    def forward(self, pixel_values: Tensor, grids: Sequence[Grid]) -> Tensor:
        x = self.patch_embed(pixel_values)
        rope = self._rope(grids, x.device)
        frame_lens = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, rope, frame_lens)
        return self.ln(x)

    def _rope(self, grids: Sequence[Grid], device: torch.device) -> tuple[Tensor, Tensor]:
        rows, cols = zip(*(vision_patch_positions(grid, self.merge_size) for grid in grids), strict=True)
        row_angles = torch.cat(rows).to(device).float()[:, None] * self.inv_freq
        col_angles = torch.cat(cols).to(device).float()[:, None] * self.inv_freq
        angles = torch.cat((row_angles, col_angles), dim=-1)  # [P, Dh/2]
        return angles.cos()[:, None, :], angles.sin()[:, None, :]


def _projector(in_dim: int, out_dim: int, eps: float) -> nn.Sequential:
    """Linear -> GELU -> Linear -> LayerNorm (indices 0, 2, 3: the checkpoint's key names)."""
    return nn.Sequential(
        Linear(in_dim, out_dim, True), nn.GELU(), Linear(out_dim, out_dim, True), nn.LayerNorm(out_dim, eps)
    )


class Resampler(nn.Module):
    """Patch features [P, Dv] -> one text-width embedding per placeholder token.

    Each merge window's spatial_merge^2 patches (consecutive rows) are concatenated and projected;
    then frame pairs are concatenated (an image's single frame with itself) and projected again.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        vision = config.vision
        if vision is None:
            raise ValueError("the resampler needs a VL config (with a vision config)")
        self.merge_size = vision.spatial_merge_size
        window_dim = vision.hidden_size * self.merge_size**2
        self.spatial_linear = _projector(window_dim, window_dim, vision.rms_norm_eps)
        self.temporal_linear = _projector(vision.temporal_merge_size * window_dim, window_dim, vision.rms_norm_eps)
        self.mlp = Linear(window_dim, config.hidden_size, bias=True)
        self.after_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, features: Tensor, grids: Sequence[Grid]) -> Tensor:
        windows = self.spatial_linear(features.reshape(-1, features.shape[-1] * self.merge_size**2))
        first, second = self._frame_pairs(grids, windows.device)
        paired = torch.cat((windows.index_select(0, first), windows.index_select(0, second)), dim=-1)
        return self.after_norm(self.mlp(self.temporal_linear(paired)))

    def _frame_pairs(self, grids: Sequence[Grid], device: torch.device) -> tuple[Tensor, Tensor]:
        """Window rows of each pair's first and second frame (an image pairs frame 0 with itself)."""
        first: list[Tensor] = []
        second: list[Tensor] = []
        offset = 0
        for t, h, w in grids:
            per_frame = h * w // self.merge_size**2
            pairs = [(0, 0)] if t == 1 else [(f, f + 1) for f in range(0, t - 1, 2)]
            for a, b in pairs:
                first.append(torch.arange(offset + a * per_frame, offset + (a + 1) * per_frame))
                second.append(torch.arange(offset + b * per_frame, offset + (b + 1) * per_frame))
            offset += t * per_frame
        return torch.cat(first).to(device), torch.cat(second).to(device)


def num_image_embeddings(grid: Grid, merge_size: int) -> int:
    """Embeddings the resampler makes of one image's (or video's) grid."""
    t, h, w = grid
    return max(1, t // 2) * h * w // merge_size**2


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Ernie4_5_VLMoeModel(Ernie4_5_MoeModel):
    """The text model's embedding, VL layers and norm, plus the vision tower and resampler."""

    decoder_layer_cls = VLDecoderLayer

    def __init__(
        self, config: ModelConfig, backends: ModelBackends, expert_range: tuple[int, int] | None = None
    ) -> None:
        super().__init__(config, backends, expert_range)
        if config.vision is None or config.mrope_section is None:
            raise ValueError(f"a VL model needs a config with a vision config and mrope_section, got {config}")
        self.vision_model = VisionTransformer(config.vision)
        self.resampler_model = Resampler(config)
        self.register_buffer("rope_pair_axes", mrope_pair_axes(config.mrope_section), persistent=False)

    def forward(
        self, input_ids: Tensor, meta: AttentionMetadata, kv_cache: Tensor, mm: MultiModalBatch | None = None
    ) -> Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if mm is None:
            rope, vision_mask = rope_cos_sin(meta.positions, self.inv_freq), None
        else:
            hidden = hidden.index_copy(0, mm.image_rows, mm.image_embeds.to(hidden.dtype))
            rope, vision_mask = mrope_cos_sin(mm.positions, self.inv_freq, self.rope_pair_axes), mm.vision_mask
        for layer_idx, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, meta, kv_cache[layer_idx], rope, vision_mask)
        return self.norm.add_and_norm(hidden, residual)[0]


class Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_MoeForCausalLM):
    """ERNIE-4.5-VL over a flat token batch and a paged KV cache.

    `forward(input_ids, meta, kv_cache, mm)` is the text model's step plus the step's images
    (`MultiModalBatch`, None for a step of text tokens only); `encode_images` turns processed
    pixels into the embeddings that `mm.image_embeds` carries. Expert parallelism is not
    supported yet (`set_moe_combine` refuses it).
    """

    model_cls: ClassVar[type[Ernie4_5_MoeModel]] = Ernie4_5_VLMoeModel
    model: Ernie4_5_VLMoeModel

    def forward(
        self, input_ids: Tensor, meta: AttentionMetadata, kv_cache: Tensor, mm: MultiModalBatch | None = None
    ) -> Tensor:
        """Run one step (see `Ernie4_5_MoeForCausalLM.forward`); `mm` carries the step's images."""
        self.check_kv_cache(kv_cache)
        return self.model(input_ids, meta, kv_cache, mm)

    def encode_images(self, pixel_values: Tensor, grids: Sequence[Grid]) -> list[Tensor]:
        """Processed patches [P, C p^2] of images with patch grids `grids` (in order) -> each image's
        placeholder embeddings [num_tokens_i, H] in the model dtype."""
        features = self.model.vision_model(pixel_values, grids)
        embeds = self.model.resampler_model(features, grids)
        merge = self.model.vision_model.merge_size
        return list(embeds.split([num_image_embeddings(grid, merge) for grid in grids]))

    def set_moe_combine(self, combine: MoECombine | None) -> None:
        if combine is not None:
            raise ValueError(
                "expert parallelism does not support the ERNIE-4.5-VL model yet: run it on one device per worker"
            )
        super().set_moe_combine(None)


__all__ = [
    "Ernie4_5_VLMoeForConditionalGeneration",
    "MultiModalBatch",
    "MultiModalMoE",
    "mrope_cos_sin",
    "mrope_pair_axes",
    "num_image_embeddings",
]
