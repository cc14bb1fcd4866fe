"""Plain-torch reference of paged decode attention: the contract `paged_decode_attention` meets.

It is `engine.attention.paged_attention_ref` (the model's definition of correctness) on a batch
of one query token per sequence, so it reads the same tensors the kernel takes.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, paged_attention_ref


def decode_metadata(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> AttentionMetadata:
    """The metadata of a decode-only step (one new token per sequence), lists and tensors both.
    Reads seq_lens back to the host."""
    num_seqs = block_tables.shape[0]
    empty = torch.empty(0, dtype=torch.long, device=block_tables.device)
    return AttentionMetadata(
        positions=empty,
        slot_mapping=empty,
        query_start_loc=list(range(num_seqs + 1)),
        seq_lens=[int(n) for n in seq_lens.tolist()],
        block_tables=block_tables,
        block_size=block_size,
        seq_lens_tensor=seq_lens,
        max_query_len=1,
    )


def paged_decode_attention_ref(
    query: torch.Tensor,  # [S, Hq, D]: one query token per sequence
    kv_layer: torch.Tensor,  # [2, N, B, Hkv, D]
    block_tables: torch.Tensor,  # [S, M] int32/int64
    seq_lens: torch.Tensor,  # [S]: keys of each sequence
    scale: float,
    num_splits: int | None = None,  # the kernel's work split; the result does not depend on it
) -> torch.Tensor:
    """Each sequence's query attends to its first seq_lens[s] keys; returns [S, Hq, D] (zeros
    where seq_lens[s] == 0). Reads seq_lens back to the host."""
    return paged_attention_ref(query, kv_layer, decode_metadata(block_tables, seq_lens, kv_layer.shape[2]), scale)
