"""Triton kernels that sort (token, slot) pairs by expert for the grouped MoE GEMMs (see `moe_align.py`).

Names: P = T * K pairs (p = t * K + j), E local experts, BLOCK_M rows per M-block. Program g handles
chunk g: S sub-chunks of CHUNK pairs (S grows with P so that there are at most ~128 programs, each
of which reads all G chunks' counts); G chunks in all.

Result, for local experts e = 0..E-1 with c_e pairs each (ids outside [offset, offset + E) dropped):

    sorted_pairs  | e0 pairs | pad | e1 pairs .. | pad | e3 ... |  (rows past the used blocks: unwritten)
                  ^ 0        ^ c_0 ^ BLOCK_M * ceil(c_0 / BLOCK_M)
    block_expert  | 0 | 0 | 1 | 3 | 3 | 3 | -1 | -1 ...      one entry per M-block

Padding rows hold P (one past the last pair id). Within an expert, pairs keep their order (a stable
counting sort), so the layout is the same on every run. Two launches: `_moe_count_kernel` writes
each chunk's per-expert counts, `_moe_place_kernel` turns them into offsets and scatters; when the
pairs fit one chunk, `_moe_place_kernel` counts for itself (SINGLE_CHUNK) and is the only launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chunk_one_hot(
    topk_ids_ptr, subchunk, num_pairs, num_experts, expert_offset, E_POW2: tl.constexpr, CHUNK: tl.constexpr
):
    """(pairs [CHUNK], is_local [CHUNK], one_hot [CHUNK, E_POW2] int32) of one sub-chunk of pairs."""
    pairs = subchunk * CHUNK + tl.arange(0, CHUNK)
    in_range = pairs < num_pairs
    expert = tl.load(topk_ids_ptr + pairs, mask=in_range, other=-1).to(tl.int32) - expert_offset
    is_local = in_range & (expert >= 0) & (expert < num_experts)
    experts = tl.arange(0, E_POW2)
    one_hot = ((expert[:, None] == experts[None, :]) & is_local[:, None]).to(tl.int32)
    return pairs, is_local, one_hot


@triton.jit(do_not_specialize=["num_pairs", "subchunks_per_chunk"])
def _moe_count_kernel(
    topk_ids_ptr,  # [P] int32/int64 (= [T, K] contiguous)
    chunk_counts_ptr,  # [G, E_POW2] int32 out: pairs of chunk g for local expert e
    num_pairs,
    num_experts,
    expert_offset,
    subchunks_per_chunk,  # S
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # grid: (G,)
    chunk = tl.program_id(0)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for sub in range(chunk * subchunks_per_chunk, (chunk + 1) * subchunks_per_chunk):
        _, _, one_hot = _chunk_one_hot(topk_ids_ptr, sub, num_pairs, num_experts, expert_offset, E_POW2, CHUNK)
        counts += tl.sum(one_hot, axis=0)
    tl.store(chunk_counts_ptr + chunk * E_POW2 + tl.arange(0, E_POW2), counts)


@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "subchunks_per_chunk", "num_blocks"])
def _moe_place_kernel(
    topk_ids_ptr,  # [P]
    chunk_counts_ptr,  # [G, E_POW2] from _moe_count_kernel (unused when SINGLE_CHUNK)
    sorted_pairs_ptr,  # [num_blocks * BLOCK_M] int32 out
    block_expert_ptr,  # [num_blocks] int32 out
    num_pairs,
    num_chunks,  # G
    subchunks_per_chunk,  # S
    num_experts,
    expert_offset,
    num_blocks,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
    COUNT_ROWS: tl.constexpr,  # rows of chunk_counts read per step
    BLOCK_CHUNK: tl.constexpr,  # M-blocks mapped per step
    SINGLE_CHUNK: tl.constexpr,  # P <= CHUNK: one program counts for itself, no _moe_count_kernel
):
    # grid: (G,)
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_POW2)

    # 1. every expert's total, and how many of its pairs sit in earlier chunks
    if SINGLE_CHUNK:
        _, _, one_hot = _chunk_one_hot(topk_ids_ptr, 0, num_pairs, num_experts, expert_offset, E_POW2, CHUNK)
        counts = tl.sum(one_hot, axis=0)  # [E_POW2]
        earlier = tl.zeros((E_POW2,), dtype=tl.int32)
    else:
        counts = tl.zeros((E_POW2,), dtype=tl.int32)
        earlier = tl.zeros((E_POW2,), dtype=tl.int32)
        for row0 in range(0, num_chunks, COUNT_ROWS):
            rows = row0 + tl.arange(0, COUNT_ROWS)
            part = tl.load(
                chunk_counts_ptr + rows[:, None] * E_POW2 + experts[None, :], mask=rows[:, None] < num_chunks, other=0
            )  # [COUNT_ROWS, E_POW2]
            counts += tl.sum(part, axis=0)
            earlier += tl.sum(tl.where(rows[:, None] < chunk, part, 0), axis=0)
    num_expert_blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(num_expert_blocks, axis=0)  # [E_POW2] inclusive
    block_start = block_end - num_expert_blocks

    # 2. scatter: row = the expert's first row + its pairs before this one (in earlier chunks, in
    #    earlier sub-chunks of this chunk, earlier in this sub-chunk)
    next_row = block_start * BLOCK_M + earlier  # [E_POW2]
    for sub in range(chunk * subchunks_per_chunk, (chunk + 1) * subchunks_per_chunk):
        pairs, is_local, one_hot = _chunk_one_hot(
            topk_ids_ptr, sub, num_pairs, num_experts, expert_offset, E_POW2, CHUNK
        )
        rank = tl.cumsum(one_hot, axis=0) - 1  # [CHUNK, E_POW2]: earlier same-expert pairs here
        row = tl.sum(one_hot * (rank + next_row[None, :]), axis=1)  # [CHUNK]
        tl.store(sorted_pairs_ptr + row, pairs, mask=is_local)
        next_row += tl.sum(one_hot, axis=0)

    # 3. padding rows after each expert's pairs (disjoint from the rows scattered above)
    if chunk == 0:
        offs_pad = tl.arange(0, BLOCK_M)
        pad_rows = (block_start * BLOCK_M + counts)[:, None] + offs_pad[None, :]  # [E_POW2, BLOCK_M]
        is_pad = counts[:, None] + offs_pad[None, :] < (num_expert_blocks * BLOCK_M)[:, None]
        tl.store(sorted_pairs_ptr + pad_rows, tl.zeros_like(pad_rows) + num_pairs, mask=is_pad)

    # 4. M-block -> expert map, chunks of M-blocks spread over the programs
    for block0 in range(chunk * BLOCK_CHUNK, num_blocks, num_chunks * BLOCK_CHUNK):
        blocks = block0 + tl.arange(0, BLOCK_CHUNK)
        # experts whose blocks all end at or before `blocks` = the expert that owns it
        owner = tl.sum((block_end[None, :] <= blocks[:, None]).to(tl.int32), axis=1)  # [BLOCK_CHUNK]
        owner = tl.where(owner < num_experts, owner, -1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks)
