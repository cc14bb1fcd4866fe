"""Token-to-expert alignment for the grouped MoE GEMMs: sort (token, slot) pairs by expert, pad
each expert's group to a multiple of the GEMM's block size. A stable counting sort in one Triton
launch (up to CHUNK pairs) or two, with no atomics and no host sync.

The output buffers are sized for the worst case (every expert's group padded), known on the host
from T, K, E and the block size alone, so the GEMMs can be launched (and CUDA-graph captured)
without reading anything back; M-blocks past the last used one are marked -1 and exit at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from engine.kernels._moe_align import _moe_count_kernel, _moe_place_kernel

ScratchAllocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def empty_scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised scratch memory (tests pass an allocator that fills it with poison instead)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class MoeAlignment:
    """Pairs sorted by local expert, in M-blocks of `block_m` rows.

    `sorted_pairs[r]` is the pair id (t * K + j) on row r, or `num_pairs` on a padding row;
    `block_expert[b]` is the local expert of rows [b * block_m, (b + 1) * block_m), or -1 when
    block b is unused. Only the used blocks' rows are meaningful.
    """

    sorted_pairs: torch.Tensor  # [num_blocks * block_m] int32
    block_expert: torch.Tensor  # [num_blocks] int32
    block_m: int
    num_pairs: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def max_num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(c_e / block_m) over counts c_e that add up to at most num_pairs."""
    # Each non-empty expert wastes under one block; and no expert has more blocks than pairs.
    return max(1, min(triton.cdiv(num_pairs, block_m) + num_experts, num_pairs))


def moe_align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    expert_offset: int = 0,
    scratch: ScratchAllocator = empty_scratch,
) -> MoeAlignment:
    """Sorts the pairs of `topk_ids` [T, K] (int32/int64, contiguous) whose expert lies in
    [expert_offset, expert_offset + num_experts) by local expert, padded to `block_m` rows.
    """
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64) or not topk_ids.is_contiguous():
        raise ValueError(
            f"topk_ids must be a contiguous 2-D int32/int64 tensor, got shape {tuple(topk_ids.shape)}, "
            f"dtype {topk_ids.dtype}, strides {topk_ids.stride()}"
        )
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    num_pairs = topk_ids.numel()
    num_blocks = max_num_blocks(num_pairs, num_experts, block_m)
    device = topk_ids.device
    e_pow2 = max(16, triton.next_power_of_2(num_experts))
    # A chunk's one-hot [CHUNK, E_POW2] and its running count live in registers: keep them ~64 a thread.
    chunk = max(16, min(256, 8192 // e_pow2))
    num_subchunks = max(1, triton.cdiv(num_pairs, chunk))
    subchunks_per_chunk = triton.cdiv(num_subchunks, 128)  # at most 128 programs: each reads all counts
    num_chunks = triton.cdiv(num_subchunks, subchunks_per_chunk)
    sorted_pairs = scratch((num_blocks * block_m,), torch.int32, device)
    block_expert = scratch((num_blocks,), torch.int32, device)
    chunk_counts = scratch((num_chunks, e_pow2), torch.int32, device)
    if num_chunks > 1:
        _moe_count_kernel[(num_chunks,)](
            topk_ids,
            chunk_counts,
            num_pairs,
            num_experts,
            expert_offset,
            subchunks_per_chunk,
            E_POW2=e_pow2,
            CHUNK=chunk,
            num_warps=4,
        )
    _moe_place_kernel[(num_chunks,)](
        topk_ids,
        chunk_counts,
        sorted_pairs,
        block_expert,
        num_pairs,
        num_chunks,
        subchunks_per_chunk,
        num_experts,
        expert_offset,
        num_blocks,
        BLOCK_M=block_m,
        E_POW2=e_pow2,
        CHUNK=chunk,
        COUNT_ROWS=max(1, min(64, 4096 // e_pow2)),
        BLOCK_CHUNK=max(16, min(128, 8192 // e_pow2)),
        SINGLE_CHUNK=num_chunks == 1,
        num_warps=8,
    )
    return MoeAlignment(sorted_pairs=sorted_pairs, block_expert=block_expert, block_m=block_m, num_pairs=num_pairs)
