"""Triton kernels of the fused routed-expert MoE (only `@triton.jit` code; see `fused_moe.py`).

Names used in the shape comments:

    T  tokens            H  hidden size          E  experts held here (a slice under EP)
    K  top-k             I  expert intermediate  P  = T * K  (token, slot) pairs, p = t * K + j
    R  rows of the expert-sorted, block-padded layout (`moe_align`), R = num_blocks * BLOCK_M

Two paths compute the same function:

* pairs path (decode-sized T): no sort. `_gate_up_pairs_kernel` runs one program per (pair, N-tile)
  as a GEMV on CUDA cores; then either `_down_pairs_kernel`, one program per (token, N-tile) that
  loops over the token's K slots so the top-k sum happens in registers (deterministic, no atomics,
  no memset), or `_down_pair_rows_kernel` per (pair, N-tile) -- K times the programs, for when the
  token grid is too small to keep every SM streaming -- followed by `_sum_topk_kernel`.
* grouped path: `moe_align` (kernels in `_moe_align.py`) sorts pairs by expert into blocks of
  BLOCK_M rows; `_gate_up_grouped_kernel` and `_down_grouped_kernel` are grouped GEMMs on tensor
  cores (wgmma on Hopper, weights optionally through TMA) over those blocks; `_sum_topk_kernel`
  adds each token's K rows (or the down GEMM adds them with fp32 atomics when the config asks).

Every kernel accumulates in fp32. Expert ids outside [expert_offset, expert_offset + E) are skipped
(another expert-parallel rank owns them): their rows are never read, written or counted.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _silu_mul(gate, up):
    # silu(g) * u in fp32
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _grouped_pid(pid, num_blocks_m, num_tiles_n, group_m):
    """Maps a 1-D program id to (M-block, N-tile), group_m M-blocks at a time.

    Programs that run together share weight tiles (same expert, same N-tile) and activation rows
    (same M-block), so repeated reads of both hit L2:

        pid:   0  1  2  3 | 4  5  6  7 | ...        (group_m = 2, num_tiles_n = 4)
        m:     0  1  0  1 | 0  1  0  1 | ... then M-blocks 2, 3
        n:     0  0  1  1 | 2  2  3  3 |
    """
    programs_per_group = group_m * num_tiles_n
    group = pid // programs_per_group
    first_m = group * group_m
    group_size = min(num_blocks_m - first_m, group_m)
    pid_in_group = pid % programs_per_group
    pid_m = first_m + pid_in_group % group_size
    pid_n = pid_in_group // group_size
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------
# pairs path (small T)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_pairs_kernel(
    hidden_ptr,  # [T, H] (row stride stride_hm)
    w13_ptr,  # [E, 2I, H] gate rows [0, I), up rows [I, 2I)
    topk_ids_ptr,  # [P] int32/int64 (= [T, K] contiguous)
    act_ptr,  # [P, I] out: silu(x @ gate.T) * (x @ up.T); rows of skipped pairs stay unwritten
    num_pairs,
    top_k,
    num_experts,
    expert_offset,
    inter_size,  # I
    hidden_size,  # H
    stride_hm,
    stride_we,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # I % BLOCK_N == 0
    EVEN_K: tl.constexpr,  # H % BLOCK_K == 0
):
    # grid: (P, cdiv(I, BLOCK_N)); pairs vary fastest so pairs that share an expert stream the
    # same weight tile at the same time (one HBM read, the rest from L2).
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int32) - expert_offset
    if (expert < 0) | (expert >= num_experts):
        return
    token = pair // top_k

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    x_ptrs = hidden_ptr + token.to(tl.int64) * stride_hm + offs_k  # [BLOCK_K]
    w_gate_ptrs = (
        w13_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    )  # [BLOCK_N, BLOCK_K]
    w_up_ptrs = w_gate_ptrs + inter_size * stride_wn
    n_mask = offs_n[:, None] < inter_size

    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs).to(tl.float32)
            if EVEN_N:
                w_gate = tl.load(w_gate_ptrs)
                w_up = tl.load(w_up_ptrs)
            else:
                w_gate = tl.load(w_gate_ptrs, mask=n_mask, other=0.0)
                w_up = tl.load(w_up_ptrs, mask=n_mask, other=0.0)
        else:
            k_mask = offs_k < hidden_size - k0
            x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            w_gate = tl.load(w_gate_ptrs, mask=n_mask & k_mask[None, :], other=0.0)
            w_up = tl.load(w_up_ptrs, mask=n_mask & k_mask[None, :], other=0.0)
        acc_gate += w_gate.to(tl.float32) * x[None, :]
        acc_up += w_up.to(tl.float32) * x[None, :]
        x_ptrs += BLOCK_K
        w_gate_ptrs += BLOCK_K
        w_up_ptrs += BLOCK_K

    act = _silu_mul(tl.sum(acc_gate, axis=1), tl.sum(acc_up, axis=1))  # [BLOCK_N]
    act_ptrs = act_ptr + pair.to(tl.int64) * inter_size + offs_n
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=offs_n < inter_size)


@triton.jit(do_not_specialize=["num_tokens"])
def _down_pairs_kernel(
    act_ptr,  # [P, I] from _gate_up_pairs_kernel
    w2_ptr,  # [E, H, I]
    topk_ids_ptr,  # [P]
    topk_weights_ptr,  # [P]
    out_ptr,  # [T, H] out (row stride stride_om): sum_j w[t, j] * act[t*K + j] @ w2[e_j].T
    num_tokens,
    top_k,
    num_experts,
    expert_offset,
    hidden_size,  # H
    inter_size,  # I
    stride_we,
    stride_wn,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # H % BLOCK_N == 0
    EVEN_K: tl.constexpr,  # I % BLOCK_K == 0
):
    # grid: (T, cdiv(H, BLOCK_N)); tokens vary fastest (shared experts' tiles hit L2).
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    n_mask = offs_n[:, None] < hidden_size

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for slot in range(0, top_k):
        pair = token * top_k + slot
        expert = tl.load(topk_ids_ptr + pair).to(tl.int32) - expert_offset
        is_local = (expert >= 0) & (expert < num_experts)
        # A skipped pair's loads are fully masked: no memory traffic, its act row is never read.
        expert = tl.where(is_local, expert, 0)
        weight = tl.load(topk_weights_ptr + pair, mask=is_local, other=0.0).to(tl.float32)
        a_ptrs = act_ptr + pair.to(tl.int64) * inter_size + offs_k  # [BLOCK_K]
        w_ptrs = (
            w2_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        )  # [BLOCK_N, BLOCK_K]
        # is_local as a [BLOCK_K] mask (vector & scalar-bool trips the interpreter)
        local_k = tl.where(is_local, offs_k >= 0, False)
        for k0 in range(0, inter_size, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=local_k, other=0.0).to(tl.float32)
                if EVEN_N:
                    w = tl.load(w_ptrs, mask=local_k[None, :], other=0.0)
                else:
                    w = tl.load(w_ptrs, mask=local_k[None, :] & n_mask, other=0.0)
            else:
                k_mask = local_k & (offs_k < inter_size - k0)
                a = tl.load(a_ptrs, mask=k_mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=n_mask & k_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * (a * weight)[None, :]
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    out_ptrs = out_ptr + token.to(tl.int64) * stride_om + offs_n
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_n < hidden_size)


@triton.jit(do_not_specialize=["num_pairs"])
def _down_pair_rows_kernel(
    act_ptr,  # [P, I] from _gate_up_pairs_kernel
    w2_ptr,  # [E, H, I]
    topk_ids_ptr,  # [P]
    topk_weights_ptr,  # [P]
    pair_out_ptr,  # [P, H] out: w[p] * act[p] @ w2[e_p].T; rows of skipped pairs stay unwritten
    num_pairs,
    num_experts,
    expert_offset,
    hidden_size,  # H
    inter_size,  # I
    stride_we,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # H % BLOCK_N == 0
    EVEN_K: tl.constexpr,  # I % BLOCK_K == 0
):
    # grid: (P, cdiv(H, BLOCK_N)): K times the programs of _down_pairs_kernel, for tiny T where
    # one program per token cannot keep every SM streaming; _sum_topk_kernel adds the rows after.
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int32) - expert_offset
    if (expert < 0) | (expert >= num_experts):
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    n_mask = offs_n[:, None] < hidden_size
    a_ptrs = act_ptr + pair.to(tl.int64) * inter_size + offs_k  # [BLOCK_K]
    w_ptrs = (
        w2_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    )  # [BLOCK_N, BLOCK_K]

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs).to(tl.float32)
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=n_mask, other=0.0)
        else:
            k_mask = offs_k < inter_size - k0
            a = tl.load(a_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=n_mask & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * a[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    weight = tl.load(topk_weights_ptr + pair).to(tl.float32)
    out = tl.sum(acc, axis=1) * weight  # [BLOCK_N]
    out_ptrs = pair_out_ptr + pair.to(tl.int64) * hidden_size + offs_n
    tl.store(out_ptrs, out.to(pair_out_ptr.dtype.element_ty), mask=offs_n < hidden_size)


# ----------------------------------------------------------------------------------------------
# grouped path
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_pairs", "num_blocks", "group_m"])
def _gate_up_grouped_kernel(
    hidden_ptr,  # [T, H] (row stride stride_hm)
    w13_ptr,  # [E, 2I, H]
    w13_desc,  # USE_TMA: TMA descriptor of w13 as [E * 2I, H], block [BLOCK_N, BLOCK_K]; else None
    sorted_pairs_ptr,  # [R] int32: pair id per row, num_pairs for padding rows
    block_expert_ptr,  # [num_blocks] int32: local expert of each M-block, -1 for unused blocks
    act_ptr,  # [R, I] out: silu * up per sorted row; padding rows stay unwritten
    num_pairs,
    num_blocks,
    group_m,  # M-blocks per group of the launch order (L2 reuse)
    top_k,
    inter_size,  # I
    hidden_size,  # H
    stride_hm,
    stride_we,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # H % BLOCK_K == 0
    USE_TMA: tl.constexpr,  # weights through the tensor-memory accelerator (Hopper+)
):
    # grid: (num_blocks * cdiv(I, BLOCK_N),)
    num_tiles_n = tl.cdiv(inter_size, BLOCK_N)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), num_blocks, num_tiles_n, group_m)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted rows
    pair = tl.load(sorted_pairs_ptr + offs_m)
    row_valid = pair < num_pairs
    token = pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    # Columns past I (a partial last N-tile) read the next rows of w13; their results are dropped.
    offs_n_safe = tl.where(offs_n < inter_size, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = hidden_ptr + token[:, None].to(tl.int64) * stride_hm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    if USE_TMA:
        # rows of the [E * 2I, H] view; a partial last N-tile reads on into the next rows (dropped)
        w_gate_row = expert * (2 * inter_size) + pid_n * BLOCK_N
    else:
        w_gate_ptrs = (
            w13_ptr + expert.to(tl.int64) * stride_we + offs_n_safe[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        )  # [BLOCK_K, BLOCK_N]
        w_up_ptrs = w_gate_ptrs + inter_size * stride_wn

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
        else:
            k_mask = offs_k < hidden_size - k0
            a = tl.load(a_ptrs, mask=row_valid[:, None] & k_mask[None, :], other=0.0)
        if USE_TMA:  # [BLOCK_N, BLOCK_K] tiles, zero-filled past H
            w_gate = w13_desc.load([w_gate_row, k0]).T
            w_up = w13_desc.load([w_gate_row + inter_size, k0]).T
        elif EVEN_K:
            w_gate = tl.load(w_gate_ptrs)
            w_up = tl.load(w_up_ptrs)
        else:
            w_gate = tl.load(w_gate_ptrs, mask=k_mask[:, None], other=0.0)
            w_up = tl.load(w_up_ptrs, mask=k_mask[:, None], other=0.0)
        acc_gate = tl.dot(a, w_gate, acc_gate)
        acc_up = tl.dot(a, w_up, acc_up)
        a_ptrs += BLOCK_K
        if not USE_TMA:
            w_gate_ptrs += BLOCK_K
            w_up_ptrs += BLOCK_K

    act = _silu_mul(acc_gate, acc_up).to(act_ptr.dtype.element_ty)
    act_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * inter_size + offs_n[None, :]
    tl.store(act_ptrs, act, mask=row_valid[:, None] & (offs_n[None, :] < inter_size))


@triton.jit(do_not_specialize=["num_pairs", "num_blocks", "group_m"])
def _down_grouped_kernel(
    act_ptr,  # [R, I] from _gate_up_grouped_kernel
    w2_ptr,  # [E, H, I]
    act_desc,  # USE_TMA: TMA descriptor of act, block [BLOCK_M, BLOCK_K]; else None
    w2_desc,  # USE_TMA: TMA descriptor of w2 as [E * H, I], block [BLOCK_N, BLOCK_K]; else None
    sorted_pairs_ptr,  # [R] int32
    block_expert_ptr,  # [num_blocks] int32
    topk_weights_ptr,  # [P]
    out_ptr,  # ATOMIC: [T, H] fp32, zeroed, += w * y;  else: [P, H] w * y per pair row
    num_pairs,
    num_blocks,
    group_m,
    top_k,
    hidden_size,  # H
    inter_size,  # I
    stride_we,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # I % BLOCK_K == 0
    ATOMIC: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    # grid: (num_blocks * cdiv(H, BLOCK_N),)
    num_tiles_n = tl.cdiv(hidden_size, BLOCK_N)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), num_blocks, num_tiles_n, group_m)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_n_safe = tl.where(offs_n < hidden_size, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)

    # Padding rows of act are unwritten; a row of A only reaches the same row of the product,
    # which the store below drops, so A needs no row mask.
    if USE_TMA:
        w_row = expert * hidden_size + pid_n * BLOCK_N  # row of the [E * H, I] view
    else:
        a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * inter_size + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = (
            w2_ptr + expert.to(tl.int64) * stride_we + offs_n_safe[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        )  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        if USE_TMA:  # zero-filled past I
            a = act_desc.load([pid_m * BLOCK_M, k0])
            w = w2_desc.load([w_row, k0]).T
        elif EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < inter_size - k0
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        if not USE_TMA:
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

    pair = tl.load(sorted_pairs_ptr + offs_m)
    row_valid = pair < num_pairs
    weight = tl.load(topk_weights_ptr + pair, mask=row_valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    mask = row_valid[:, None] & (offs_n[None, :] < hidden_size)
    if ATOMIC:
        token = pair // top_k
        out_ptrs = out_ptr + token[:, None].to(tl.int64) * hidden_size + offs_n[None, :]
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        out_ptrs = out_ptr + pair[:, None].to(tl.int64) * hidden_size + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _sum_topk_kernel(
    pair_out_ptr,  # [P, H] weighted expert outputs; rows of skipped pairs are unwritten
    topk_ids_ptr,  # [P]
    out_ptr,  # [T, H] out (row stride stride_om)
    num_tokens,
    num_experts,
    expert_offset,
    hidden_size,
    stride_om,
    TOP_K: tl.constexpr,  # unrolled, so that all K row loads are in flight at once
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)); the K rows are added in slot order: deterministic.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    t_mask = offs_t < num_tokens
    h_mask = offs_h < hidden_size
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = offs_t * TOP_K + slot
        expert = tl.load(topk_ids_ptr + pair, mask=t_mask, other=-1).to(tl.int32) - expert_offset
        is_local = t_mask & (expert >= 0) & (expert < num_experts)
        row_ptrs = pair_out_ptr + pair[:, None].to(tl.int64) * hidden_size + offs_h[None, :]
        acc += tl.load(row_ptrs, mask=is_local[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_t[:, None].to(tl.int64) * stride_om + offs_h[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])
