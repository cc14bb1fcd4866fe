"""Triton kernels of the MoE router (see `moe_route.py`; reference `route_ref`).

Names: T tokens, H hidden size, E experts (E_POW2 padded), K top-k, S splits of the hidden size.

Two launches. `_route_logits_kernel` owns (token block, split s) and writes the partial logits of
its slice of H; `_route_select_kernel` owns a token block, sums the S partials in split order (so
the result does not depend on which program finished first), and does softmax and top-k:

    H        |  split 0  |  split 1  |  ...  | split S-1 |      each split: whole BLOCK_K chunks
    partial  [S, T, E_POW2] fp32 ──sum over s──▶ logits [T, E] ──softmax, top-k──▶ weights, ids

At decode sizes (T of 1..64) one token block would leave all but one SM idle through ~40 chunks of
H; the splits spread those chunks over the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens", "chunks_per_split"])
def _route_logits_kernel(
    hidden_ptr,  # [T, H] (row stride stride_hm)
    gate_ptr,  # [E, H] fp32 (row stride stride_ge)
    partial_ptr,  # [S, T, E_POW2] fp32 out
    num_tokens,
    num_experts,
    hidden_size,
    stride_hm,
    stride_ge,
    chunks_per_split,
    BLOCK_T: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BF16X3: tl.constexpr,
):
    # grid: (cdiv(T, BLOCK_T), S)
    pid_s = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    offs_e = tl.arange(0, E_POW2)  # [E_POW2]
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < num_tokens
    e_mask = offs_e < num_experts
    k_begin = pid_s * chunks_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + chunks_per_split * BLOCK_K, hidden_size)

    # logits = x @ gate.T with fp32-grade accuracy: the top-k choice must match the reference's.
    logits = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k0
        x = tl.load(
            hidden_ptr + offs_t[:, None].to(tl.int64) * stride_hm + (k0 + offs_k)[None, :],
            mask=t_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # [BLOCK_T, BLOCK_K]
        g = tl.load(
            gate_ptr + offs_e[None, :] * stride_ge + (k0 + offs_k)[:, None],
            mask=e_mask[None, :] & k_mask[:, None],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_K, E_POW2]
        if BF16X3:
            # bf16 x: the fp32 gate is exactly hi + mid + lo (three bf16 pieces of 8 bits each), and
            # a bf16 product is exact in fp32, so three tensor-core dots give fp32 products with
            # fp32 accumulation, where one fp32 "ieee" dot runs on the FMA units ~10x slower.
            hi = g.to(tl.bfloat16)
            rest = g - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            logits = tl.dot(x, hi, logits)
            logits = tl.dot(x, mid, logits)
            logits = tl.dot(x, lo, logits)
        else:
            logits = tl.dot(x.to(tl.float32), g, logits, input_precision="ieee")

    out_offs = (pid_s * num_tokens + offs_t[:, None]).to(tl.int64) * E_POW2 + offs_e[None, :]
    tl.store(partial_ptr + out_offs, logits, mask=t_mask[:, None])


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _route_select_kernel(
    partial_ptr,  # [S, T, E_POW2] fp32
    bias_ptr,  # [E] fp32 (unused unless HAS_BIAS)
    weights_ptr,  # [T, K] out, hidden's dtype: chosen probs renormalised
    ids_ptr,  # [T, K] out, int64
    num_tokens,
    num_experts,
    num_splits,
    norm_min,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    E_POW2: tl.constexpr,
):
    # grid: (cdiv(T, BLOCK_T),)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    offs_e = tl.arange(0, E_POW2)  # [E_POW2]
    t_mask = offs_t < num_tokens
    e_mask = offs_e < num_experts

    logits = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
    for s in range(num_splits):  # in split order: deterministic
        offs = (s * num_tokens + offs_t[:, None]).to(tl.int64) * E_POW2 + offs_e[None, :]
        logits += tl.load(partial_ptr + offs, mask=t_mask[:, None], other=0.0)

    # softmax over the real experts
    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]  # [BLOCK_T, E_POW2]
    scores = probs
    if HAS_BIAS:
        scores = probs + tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    scores = tl.where(e_mask[None, :], scores, float("-inf"))

    # top-k by repeated argmax (first index wins a tie); keep the unbiased probs of the chosen
    slots = tl.arange(0, K_POW2)  # [K_POW2]
    chosen_ids = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int32)
    chosen_probs = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        best = tl.argmax(scores, axis=1)  # [BLOCK_T]
        is_best = offs_e[None, :] == best[:, None]  # [BLOCK_T, E_POW2]
        prob = tl.sum(tl.where(is_best, probs, 0.0), axis=1)
        scores = tl.where(is_best, float("-inf"), scores)
        chosen_ids = tl.where(slots[None, :] == slot, best[:, None], chosen_ids)
        chosen_probs = tl.where(slots[None, :] == slot, prob[:, None], chosen_probs)
    total = tl.maximum(tl.sum(chosen_probs, axis=1), norm_min)
    weights = chosen_probs / total[:, None]

    out_offs = offs_t[:, None].to(tl.int64) * TOP_K + slots[None, :]
    out_mask = t_mask[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out_offs, weights.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offs, chosen_ids.to(tl.int64), mask=out_mask)
