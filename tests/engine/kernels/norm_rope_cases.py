"""Test cases for the fused norm and RoPE + KV-write kernels, shared by the CPU interpreter tests
and the GPU tests.

Each `run_*_case` builds its inputs from a seed inside NaN-filled buffers (row padding, columns
past the last, the cache's unused slots and head padding), runs the Triton op and its torch
reference on copies, and returns plain JSON-friendly facts: whether the results are bitwise
equal, how far apart they are in units in the last place, whether the cache outside the written
slots is untouched (the CPU tests call these in a `TRITON_INTERPRET=1` subprocess, see
`interpreter_worker.py`).

The norm's sum of squares is reduced in another order than torch's, so on arbitrary rows its
mean may round differently (a last-place difference). `exact_sum=True` draws rows of multiples
of 1/8 in [-2, 2] (x and residual alike), whose squares and sums are exact in fp32 in any order
up to H = 8192: there every bit must match.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.kernels.norm_rope import fused_add_rms_norm, rope_and_write_kv
from engine.kernels.norm_rope_ref import fused_add_rms_norm_ref, rope_and_write_kv_ref
from engine.models.ernie4_5_moe import rope_cos_sin, rope_inv_freq
from engine.models.ernie4_5_vl_moe import mrope_cos_sin, mrope_pair_axes
from tests.engine.kernels.moe_cases import nan_padded

ROPE_THETA = 500000.0
KV_HEAD_PADDING = 8  # NaN columns past head_dim in every cache row
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def max_ulps(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Largest distance between the two in representable values of their dtype (same-sign values;
    values of opposite signs count as far apart). NaN-free inputs."""
    if actual.numel() == 0:
        return 0
    bits_a = actual.contiguous().view(_INT_VIEW[actual.dtype]).long()
    bits_e = expected.contiguous().view(_INT_VIEW[expected.dtype]).long()
    sign_bit = 1 << (actual.element_size() * 8 - 1)
    # map sign-magnitude bit patterns onto a monotone integer line
    line_a = torch.where(bits_a < 0, -(bits_a + sign_bit), bits_a)
    line_e = torch.where(bits_e < 0, -(bits_e + sign_bit), bits_e)
    return int((line_a - line_e).abs().max().item())


def _norm_rows(num_tokens: int, hidden_size: int, exact_sum: bool, generator: torch.Generator, device: str):
    if exact_sum:
        return torch.randint(-16, 17, (num_tokens, hidden_size), generator=generator, device=device) / 8
    return torch.randn(num_tokens, hidden_size, generator=generator, device=device) * 3


def run_norm_case(
    *,
    num_tokens: int,
    hidden_size: int,
    dtype: str = "float32",
    device: str = "cpu",
    with_residual: bool = True,
    exact_sum: bool = False,
    eps: float = 1e-5,
    seed: int = 0,
) -> dict[str, Any]:
    """fused_add_rms_norm vs fused_add_rms_norm_ref; inputs are views into NaN-filled buffers."""
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = _norm_rows(num_tokens, hidden_size, exact_sum, generator, device).to(torch_dtype)
    residual = _norm_rows(num_tokens, hidden_size, exact_sum, generator, device).to(torch_dtype)
    weight = (1 + 0.5 * torch.randn(hidden_size, generator=generator, device=device)).to(torch_dtype)
    residual = residual if with_residual else None
    want_normed, want_residual = fused_add_rms_norm_ref(x, residual, weight, eps)

    padded_residual = nan_padded(residual) if residual is not None else None
    padded_weight = nan_padded(weight[None], pad_first=0)[0]
    padded_x = nan_padded(x)
    normed, new_residual = fused_add_rms_norm(padded_x, padded_residual, padded_weight, eps)
    return {
        "shape": list(normed.shape),
        "dtype": str(normed.dtype),
        "finite": bool(torch.isfinite(normed).all().item() and torch.isfinite(new_residual).all().item()),
        "residual_is_x": new_residual is padded_x,
        "residual_equal": torch.equal(new_residual, want_residual),
        "normed_equal": torch.equal(normed, want_normed),
        "normed_mismatches": int((normed != want_normed).sum().item()),
        "normed_max_ulps": max_ulps(normed, want_normed),
    }


def _rope_tables(positions: torch.Tensor, head_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(head_dim, ROPE_THETA).to(positions.device)
    if layout == "text":
        return rope_cos_sin(positions, inv_freq)
    # the VL model's 3D tables: pairs read the t, h or w row of [3, T] positions (other strides)
    positions_3d = torch.stack((positions, positions // 7, positions % 13))
    quarter = head_dim // 8
    section = (quarter, quarter, head_dim // 2 - 2 * quarter)
    return mrope_cos_sin(positions_3d, inv_freq, mrope_pair_axes(section).to(positions.device))


def make_rope_inputs(
    num_tokens: int,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    generator: torch.Generator,
    layout: str = "text",
    slot_dtype: torch.dtype = torch.int64,
) -> dict[str, Any]:
    """qkv [T, (Hq + 2 Hkv) D] (a view with NaN row padding), its cos / sin, and a NaN cache pool
    [2, N, B, Hkv, D] (a view: NaN columns past D) with T distinct shuffled slots for the tokens,
    the pool at least twice as large as needed."""
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = nan_padded(torch.randn(num_tokens, width, generator=generator, device=device).to(dtype))
    positions = torch.randint(0, 131072, (num_tokens,), generator=generator, device=device)
    cos, sin = _rope_tables(positions, head_dim, layout)
    num_blocks = 2 * -(-num_tokens // block_size) + 1
    pool = torch.full(
        (2, num_blocks, block_size, num_kv_heads, head_dim + KV_HEAD_PADDING), float("nan"), dtype=dtype, device=device
    )
    slots = torch.randperm(num_blocks * block_size, generator=generator, device=device)[:num_tokens]
    return {"qkv": qkv, "cos": cos, "sin": sin, "pool": pool, "slot_mapping": slots.to(slot_dtype)}


def _same_with_nans(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.nan_to_num(0), expected.nan_to_num(0))


def run_rope_case(
    *,
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: str = "float32",
    device: str = "cpu",
    layout: str = "text",
    slot_dtype: str = "int64",
    seed: int = 0,
) -> dict[str, Any]:
    """rope_and_write_kv vs rope_and_write_kv_ref on copies of one NaN cache pool."""
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs = make_rope_inputs(
        num_tokens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=getattr(torch, dtype),
        device=device,
        generator=generator,
        layout=layout,
        slot_dtype=getattr(torch, slot_dtype),
    )
    heads = (num_q_heads, num_kv_heads, head_dim)
    qkv, cos, sin, slots = inputs["qkv"], inputs["cos"], inputs["sin"], inputs["slot_mapping"]
    want_pool = inputs["pool"].clone()
    want_q = rope_and_write_kv_ref(qkv, cos, sin, want_pool[..., :head_dim], slots.long(), *heads)
    pool = inputs["pool"]
    q = rope_and_write_kv(qkv, cos, sin, pool[..., :head_dim], slots, *heads)
    written = pool.flatten(1, 2)[:, slots.long()][..., :head_dim]  # [2, T, Hkv, D]
    return {
        "shape": list(q.shape),
        "dtype": str(q.dtype),
        "q_finite": bool(torch.isfinite(q).all().item()),
        "written_finite": bool(torch.isfinite(written).all().item()),
        "q_equal": torch.equal(q, want_q),
        "cache_equal": _same_with_nans(pool, want_pool),  # written slots equal, every other byte still NaN
        "num_nan_left": int(pool.isnan().sum().item()),
        "num_nan_expected": int(pool.numel() - 2 * num_tokens * num_kv_heads * head_dim),
    }
