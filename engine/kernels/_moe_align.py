"""Triton kernel that sorts (token, slot) pairs by expert for the grouped MoE GEMMs (see `moe_align.py`).

Names: P = T * K pairs (p = t * K + j), E local experts, BLOCK_M rows per M-block.

Result, for local experts e = 0..E-1 with c_e pairs each (ids outside [offset, offset + E) dropped):

    sorted_pairs  | e0 pairs | pad | e1 pairs .. | pad | e3 ... |  pad up to the buffer's end
                  ^ 0        ^ c_0 ^ BLOCK_M * ceil(c_0 / BLOCK_M)
    block_expert  | 0 | 0 | 1 | 3 | 3 | 3 | -1 | -1 ...      one entry per M-block

Padding rows hold P (one past the last pair id). Within an expert, pairs land in the order their
atomics win; the GEMMs compute each row independently of its position, so results do not depend on it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_pairs", "num_rows", "num_blocks"])
def _moe_align_kernel(
    topk_ids_ptr,  # [P] int32/int64 (= [T, K] contiguous)
    sorted_pairs_ptr,  # [num_rows] int32 out
    block_expert_ptr,  # [num_blocks] int32 out
    cursor_ptr,  # [E_POW2] int32 scratch: counts, then each expert's next free row
    num_pairs,
    num_experts,
    expert_offset,
    num_rows,  # num_blocks * BLOCK_M
    num_blocks,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,  # >= num_experts
    CHUNK: tl.constexpr,  # pairs (and rows) handled per loop step
    BLOCK_CHUNK: tl.constexpr,  # M-blocks handled per loop step
):
    # grid: (1,) -- one program; tl.debug_barrier() orders its phases.
    experts = tl.arange(0, E_POW2)
    offs = tl.arange(0, CHUNK)

    # 1. zero the counters; mark every row as padding.
    tl.store(cursor_ptr + experts, tl.zeros((E_POW2,), dtype=tl.int32))
    for start in range(0, num_rows, CHUNK):
        rows = start + offs
        tl.store(sorted_pairs_ptr + rows, tl.zeros((CHUNK,), dtype=tl.int32) + num_pairs, mask=rows < num_rows)
    tl.debug_barrier()

    # 2. count pairs per local expert.
    for start in range(0, num_pairs, CHUNK):
        pairs = start + offs
        in_range = pairs < num_pairs
        expert = tl.load(topk_ids_ptr + pairs, mask=in_range, other=-1).to(tl.int32) - expert_offset
        is_local = in_range & (expert >= 0) & (expert < num_experts)
        tl.atomic_add(cursor_ptr + expert, tl.full((CHUNK,), 1, tl.int32), mask=is_local, sem="relaxed")
    tl.debug_barrier()

    # 3. each expert's first M-block, and the M-block -> expert map.
    counts = tl.load(cursor_ptr + experts, volatile=True)  # [E_POW2], 0 past num_experts
    num_expert_blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(num_expert_blocks, axis=0)  # [E_POW2] inclusive
    block_start = block_end - num_expert_blocks
    for start in range(0, num_blocks, BLOCK_CHUNK):
        blocks = start + tl.arange(0, BLOCK_CHUNK)
        # experts whose blocks all end at or before `blocks` = the expert that owns it
        owner = tl.sum((block_end[None, :] <= blocks[:, None]).to(tl.int32), axis=1)  # [BLOCK_CHUNK]
        owner = tl.where(owner < num_experts, owner, -1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks)
    tl.debug_barrier()  # every thread has read `counts` before the counters are overwritten

    # 4. scatter each pair to its expert's next free row.
    tl.store(cursor_ptr + experts, block_start * BLOCK_M)
    tl.debug_barrier()
    for start in range(0, num_pairs, CHUNK):
        pairs = start + offs
        in_range = pairs < num_pairs
        expert = tl.load(topk_ids_ptr + pairs, mask=in_range, other=-1).to(tl.int32) - expert_offset
        is_local = in_range & (expert >= 0) & (expert < num_experts)
        row = tl.atomic_add(cursor_ptr + expert, tl.full((CHUNK,), 1, tl.int32), mask=is_local, sem="relaxed")
        tl.store(sorted_pairs_ptr + row, pairs, mask=is_local)
