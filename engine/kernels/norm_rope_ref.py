"""Plain-torch references of the attention block's small ops: the contracts `norm_rope` meets.

These are the model's own arithmetic (`engine.models.ernie4_5_moe` calls them on the torch
backend, the CPU default), following transformers' `Ernie4_5_MoeRMSNorm` and
`apply_rotary_pos_emb`:

    fused_add_rms_norm_ref   residual' = x + residual (model dtype)
                             normed    = weight * (residual'.float() * rsqrt(mean(residual'.float()^2) + eps)).to(dtype)
    rope_and_write_kv_ref    q, k of a fused qkv row rotated pairwise (2j, 2j+1) by angle j in fp32,
                             cast back; k and v stored into the paged cache at each token's slot
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.attention import write_kv


def fused_add_rms_norm_ref(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(normed [T, H], new residual [T, H]) of x [T, H] plus residual (x alone when None).

    The sum is rounded to the model dtype before it is normalised (it is the next residual);
    the normalisation runs in fp32, is cast back, and only then is scaled by the weight.
    """
    summed = x if residual is None else x + residual
    x32 = summed.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(summed.dtype), summed


def apply_interleaved_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-J style RoPE on x [T, heads, D]: the pair (2j, 2j+1) rotates by angle j; cos and sin
    are fp32 [T, 1, D/2] (`rope_cos_sin`).

    Computed in fp32 and cast back to x's dtype, like transformers' `apply_rotary_pos_emb`.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def rope_and_write_kv_ref(
    qkv: Tensor,  # [T, (Hq + 2 Hkv) D]: q heads | k heads | v heads
    cos: Tensor,  # [T, 1, D/2] fp32
    sin: Tensor,  # [T, 1, D/2] fp32
    kv_layer: Tensor,  # [2, N, B, Hkv, D]
    slot_mapping: Tensor,  # [T] int64
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> Tensor:
    """Rotate q and k, store k and v into `kv_layer` at `slot_mapping` (side effect, as `write_kv`);
    returns the rotated q [T, Hq, D]."""
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q = apply_interleaved_rope(q.unflatten(-1, (num_q_heads, head_dim)), cos, sin)
    k = apply_interleaved_rope(k.unflatten(-1, (num_kv_heads, head_dim)), cos, sin)
    write_kv(kv_layer, k, v.unflatten(-1, (num_kv_heads, head_dim)), slot_mapping)
    return q
