"""Triton kernels of the fused residual-add RMSNorm and the fused RoPE + KV write (only
`@triton.jit` code; see `norm_rope.py`).

Names used in the shape comments:

    T  tokens    H  hidden size    Hq query heads    Hkv KV heads    D head dim
    N  KV blocks B  tokens per block

`_fused_add_rms_norm_kernel`: one program per token row; the whole row [next_pow2(H)] sits in
registers, so x and the residual are read once and the sum is written once.

`_rope_write_kv_kernel`: one program per (token, run of HEADS head slots of the qkv row). A qkv
row holds Hq + 2 Hkv head slots of D; a slot's D values are D/2 interleaved pairs, loaded as an
even and an odd [HEADS, D/2] tile:

    qkv row   | q0 q1 ... q(Hq-1) | k0 ... k(Hkv-1) | v0 ... v(Hkv-1) |
    slot h    | rotated -> q_out  | rotated -> kv[0] | copied -> kv[1] |   at (slot // B, slot % B, h')

Every multiply and add is its own fp32 operation in the reference's order; the wrapper launches
with fp fusion off, so no FMA contracts them and the results carry the reference's bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,  # [T, H] (row stride stride_x, unit column stride)
    residual_ptr,  # HAS_RESIDUAL: [T, H] (row stride stride_r, unit column stride); else unused
    weight_ptr,  # [H]
    out_ptr,  # [T, H] contiguous: weight * rmsnorm(x + residual)
    residual_out_ptr,  # HAS_RESIDUAL: [T, H] contiguous, x + residual; else unused
    hidden_size,  # H
    eps,  # fp32
    mean_scale,  # fp32: H when MEAN_BY_DIVISION, else round(1 / H)
    stride_x,
    stride_r,
    HAS_RESIDUAL: tl.constexpr,
    MEAN_BY_DIVISION: tl.constexpr,  # mean = sum / H (torch on CPU), else sum * round(1 / H) (torch on CUDA)
    BLOCK_H: tl.constexpr,  # next_pow2(H)
):
    # grid: (T,)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    col_valid = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=col_valid, other=0.0)  # [BLOCK_H] model dtype
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=col_valid, other=0.0)
        # the sum is rounded to the model dtype (it is the next residual) before it is normalised
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden_size + cols, x, mask=col_valid)
    x32 = x.to(tl.float32)
    sum_sq = tl.sum(x32 * x32, axis=0)  # padding lanes hold 0
    if MEAN_BY_DIVISION:
        mean_sq = tl.div_rn(sum_sq, mean_scale)
    else:
        mean_sq = sum_sq * mean_scale
    normed = (x32 * tl.math.rsqrt(mean_sq + eps)).to(out_ptr.dtype.element_ty)  # cast back, then scale
    weight = tl.load(weight_ptr + cols, mask=col_valid, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)  # exact in fp32 for 16-bit operands: one rounding
    tl.store(out_ptr + row * hidden_size + cols, out.to(out_ptr.dtype.element_ty), mask=col_valid)


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr,  # [T, (Hq + 2 Hkv) D] (row stride stride_qkv, unit column stride): q | k | v head slots
    cos_ptr,  # [T, D/2] fp32 (strides stride_ct, stride_cj)
    sin_ptr,  # [T, D/2] fp32 (strides stride_st, stride_sj)
    slot_mapping_ptr,  # [T] int32/int64: flat slot block * B + offset of each token
    q_out_ptr,  # [T, Hq, D] contiguous
    kv_ptr,  # [2, N, B, Hkv, D] (strides stride_kv, stride_kb, stride_ko, stride_kh, 1)
    block_size,  # B
    stride_qkv,
    stride_ct,
    stride_cj,
    stride_st,
    stride_sj,
    stride_kv,
    stride_kb,
    stride_ko,
    stride_kh,
    NUM_Q_HEADS: tl.constexpr,  # Hq
    NUM_KV_HEADS: tl.constexpr,  # Hkv
    HALF_DIM: tl.constexpr,  # D / 2, a power of two
    HEADS: tl.constexpr,  # head slots per program, a power of two
):
    # grid: (T, cdiv(Hq + 2 Hkv, HEADS))
    token = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # [HEADS] head slots of the qkv row
    pairs = tl.arange(0, HALF_DIM)  # [D/2]
    slot_valid = slots < NUM_Q_HEADS + 2 * NUM_KV_HEADS
    is_q = slots < NUM_Q_HEADS
    is_k = (slots >= NUM_Q_HEADS) & (slots < NUM_Q_HEADS + NUM_KV_HEADS)
    is_v = slots >= NUM_Q_HEADS + NUM_KV_HEADS

    even_ptrs = qkv_ptr + token * stride_qkv + slots[:, None] * (2 * HALF_DIM) + 2 * pairs[None, :]  # [HEADS, D/2]
    even = tl.load(even_ptrs, mask=slot_valid[:, None], other=0.0).to(tl.float32)
    odd = tl.load(even_ptrs + 1, mask=slot_valid[:, None], other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * stride_ct + pairs * stride_cj)[None, :]  # [1, D/2]
    sin = tl.load(sin_ptr + token * stride_st + pairs * stride_sj)[None, :]
    rotate = (is_q | is_k)[:, None]
    even_out = tl.where(rotate, even * cos - odd * sin, even).to(q_out_ptr.dtype.element_ty)
    odd_out = tl.where(rotate, odd * cos + even * sin, odd).to(q_out_ptr.dtype.element_ty)

    q_ptrs = q_out_ptr + (token * NUM_Q_HEADS + slots[:, None]) * (2 * HALF_DIM) + 2 * pairs[None, :]
    q_mask = (slot_valid & is_q)[:, None]
    tl.store(q_ptrs, even_out, mask=q_mask)
    tl.store(q_ptrs + 1, odd_out, mask=q_mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    kv_head = tl.where(is_v, slots - NUM_Q_HEADS - NUM_KV_HEADS, slots - NUM_Q_HEADS).to(tl.int64)  # [HEADS]
    cache_rows = (
        is_v.to(tl.int64) * stride_kv
        + (slot // block_size) * stride_kb
        + (slot % block_size) * stride_ko
        + kv_head * stride_kh
    )  # [HEADS]; q slots' rows are never stored to
    kv_ptrs = kv_ptr + cache_rows[:, None] + 2 * pairs[None, :]
    kv_mask = (slot_valid & ~is_q)[:, None]
    tl.store(kv_ptrs, even_out, mask=kv_mask)
    tl.store(kv_ptrs + 1, odd_out, mask=kv_mask)
