"""Shared test helpers: hand-built paged-attention batches for driving the model directly.

Sequence i owns blocks `1 + i * blocks_per_seq, ...` of the cache; block 0 is never used, so a
stray read or write through a zero-padded block table lands somewhere a test can see.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.attention import AttentionMetadata
from engine.config import ModelConfig


def make_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A zeroed cache [L, 2, N, B, Hkv, D]."""
    shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return torch.zeros(shape, dtype=dtype)


def make_meta(
    chunks: Sequence[tuple[int, int]], block_size: int, blocks_per_seq: int, device: str | torch.device = "cpu"
) -> AttentionMetadata:
    """Metadata for one step: `chunks[i] = (num_cached_tokens, num_new_tokens)` of sequence i."""
    positions, slots, starts, seq_lens, tables = [], [], [0], [], []
    for seq, (num_cached, num_new) in enumerate(chunks):
        table = [1 + seq * blocks_per_seq + b for b in range(blocks_per_seq)]
        if num_cached + num_new > blocks_per_seq * block_size:
            raise ValueError(f"sequence {seq} needs {num_cached + num_new} slots, has {blocks_per_seq * block_size}")
        for pos in range(num_cached, num_cached + num_new):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + num_new)
        seq_lens.append(num_cached + num_new)
        tables.append(table)
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start_loc=starts,
        seq_lens=seq_lens,
        block_tables=torch.tensor(tables, dtype=torch.long, device=device),
        block_size=block_size,
    )


def num_blocks_for(num_seqs: int, blocks_per_seq: int) -> int:
    """Cache blocks needed by `make_meta`'s layout (block 0 is left unused)."""
    return 1 + num_seqs * blocks_per_seq


@torch.no_grad()
def prefill_logits(model: torch.nn.Module, token_ids: Sequence[int], block_size: int = 4) -> torch.Tensor:
    """Logits [T, V] of one sequence run in a single step over a fresh cache."""
    blocks_per_seq = -(-len(token_ids) // block_size)
    cache = make_kv_cache(model.config, num_blocks_for(1, blocks_per_seq), block_size, _param_dtype(model))
    meta = make_meta([(0, len(token_ids))], block_size, blocks_per_seq)
    hidden = model(torch.tensor(list(token_ids), dtype=torch.long), meta, cache)
    return model.compute_logits(hidden)


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype
