"""Triton kernels of split-KV paged decode attention (only `@triton.jit` code; see `paged_attention.py`).

Names used in the shape comments:

    S  sequences (one query token each)    Hq query heads    Hkv KV heads    G = Hq // Hkv
    D  head dim                            N  KV blocks      B   tokens per block
    M  block-table width (blocks)          P  splits of each sequence's keys (num_splits)

One program of `_decode_split_kernel` owns (sequence s, KV head h, split p). The sequence's
ceil(seq_len / B) blocks are cut into P contiguous runs of ceil(blocks / P) blocks; the program
reads its run's K and V once for all G query heads of h (rows of a [G_PAD, D] tile, G_PAD a power
of two >= 16 so tl.dot can take it; rows >= G load zeros and are never stored):

    keys of s   |  split 0   |  split 1   |  split 2   | split 3 (empty) |
    blocks      | b7 b2 b9   | b4 b0 b5   | b1 b8 .    |                 |   (block_tables[s])
                                           ^ seq_len: later keys masked, never loaded

Scores live in log2 units (scale * log2 e folded into the query), so exp2 replaces exp. A split
writes its weighted V normalised by its own sum and its log2-sum-exp2; an empty split (past the
sequence's last block) writes zeros and -inf, which the merge weighs by exp2(-inf) = 0.
`_merge_splits_kernel` combines the P partials of each (s, head) with those weights. A sequence
with seq_len 0 (a padding row of a CUDA-graph batch) gets an output of zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    query_ptr,  # [S, Hq, D] (strides stride_qs, stride_qh, 1)
    kv_ptr,  # [2, N, B, Hkv, D] one layer's cache (strides stride_kv, stride_kb, stride_ko, stride_kh, 1)
    block_tables_ptr,  # [S, M] int32/int64 (row stride stride_bt); entries past the sequence never read
    seq_lens_ptr,  # [S] int32/int64: keys of each sequence, at most M * B
    out_ptr,  # WRITE_OUT: [S, Hq, D] (strides stride_os, stride_oh, 1); else unused
    part_out_ptr,  # not WRITE_OUT: [S, Hq, P, D] fp32, each split's V weighted by its own softmax
    part_lse_ptr,  # not WRITE_OUT: [S, Hq, P] fp32, each split's log2-sum-exp2 (-inf when empty)
    qk_scale,  # softmax scale * log2(e)
    num_splits,  # P
    num_q_heads,  # Hq
    block_size,  # B
    stride_qs,
    stride_qh,
    stride_kv,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_bt,
    stride_os,
    stride_oh,
    GROUP: tl.constexpr,  # G
    GROUP_PAD: tl.constexpr,  # max(16, next_pow2(G))
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_N: tl.constexpr,  # keys per iteration
    WRITE_OUT: tl.constexpr,  # P == 1: normalise and store the output, no partials
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else the default
):
    # grid: (S, Hkv, P)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    blocks_per_split = tl.cdiv(tl.cdiv(seq_len, block_size), num_splits)
    key_start = split * blocks_per_split * block_size
    key_end = tl.minimum(key_start + blocks_per_split * block_size, seq_len)

    rows = tl.arange(0, GROUP_PAD)  # [G_PAD]
    row_valid = rows < GROUP
    heads = kv_head * GROUP + rows  # [G_PAD] query heads of this KV head
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    q_ptrs = query_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)  # [G_PAD, D]

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = kv_ptr + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = k_head_ptr + stride_kv
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)  # running sum of exp2(score - m_i) * v
    for key0 in range(key_start, key_end, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions in the sequence
        key_valid = keys < key_end
        block = tl.load(table_row + keys // block_size, mask=key_valid, other=0).to(tl.int64)
        slot = block * stride_kb + (keys % block_size).to(tl.int64) * stride_ko  # [BLOCK_N]
        kv_offs = slot[:, None] + offs_d[None, :]  # [BLOCK_N, D]
        k = tl.load(k_head_ptr + kv_offs, mask=key_valid[:, None], other=0.0)  # [BLOCK_N, D]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G_PAD, BLOCK_N]
        scores = tl.where(key_valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every tile holds a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])  # [G_PAD, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head_ptr + kv_offs, mask=key_valid[:, None], other=0.0)  # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # [G_PAD, D]; zeros where no key was seen
    if WRITE_OUT:
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        part = (seq.to(tl.int64) * num_q_heads + heads) * num_splits + split  # [G_PAD] rows of [S*Hq*P]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_valid[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr,  # [S, Hq, P, D] fp32 from _decode_split_kernel
    part_lse_ptr,  # [S, Hq, P] fp32
    out_ptr,  # [S, Hq, D] (strides stride_os, stride_oh, 1)
    num_splits,  # P
    stride_os,
    stride_oh,
    HEAD_DIM: tl.constexpr,  # D
    SPLITS_PAD: tl.constexpr,  # next_pow2(P)
    BLOCK_S: tl.constexpr,  # splits per iteration of the weighted sum
):
    # grid: (S, Hq)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits  # first split of (seq, head)

    offs_p = tl.arange(0, SPLITS_PAD)
    lse = tl.load(part_lse_ptr + row + offs_p, mask=offs_p < num_splits, other=float("-inf"))  # [SPLITS_PAD]
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no keys at all: every weight is 0
    total = tl.sum(tl.exp2(lse - lse_max), axis=0)

    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    for split0 in range(0, num_splits, BLOCK_S):
        splits = split0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        split_valid = splits < num_splits
        weight = tl.exp2(tl.load(part_lse_ptr + row + splits, mask=split_valid, other=float("-inf")) - lse_max)
        part_ptrs = part_out_ptr + (row + splits)[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_S, D]
        part = tl.load(part_ptrs, mask=split_valid[:, None], other=0.0)
        acc += tl.sum(part * weight[:, None], axis=0)

    out = acc / tl.where(total > 0, total, 1.0)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))
