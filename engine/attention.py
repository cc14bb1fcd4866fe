"""Paged attention: the per-step batch layout and the plain-torch reference backend.

KV cache layout (one tensor for the whole model, owned by `engine.kv_cache.KVCache`):

    kv[layer, 0 = K | 1 = V, block_id, offset_in_block, kv_head, head_dim]

A token at position p of a sequence lives at block `block_table[p // block_size]`, offset
`p % block_size`; its flat slot is `block_id * block_size + offset`. The KV transport gathers
`kv[:, :, block_ids]` (or `kv[layer, :, block_ids]` layer by layer) and scatters on the receiver.

One step's tokens are flattened across sequences:

    input_ids       t0 t1 t2 | t3 | t4 t5      (3 sequences; query_lens = [3, 1, 2])
    query_start_loc 0        3    4     6
    seq_lens        context_len + query_len per sequence (keys each query may see, causally)

Backends pick the plain-torch `paged_attention_ref` (here) or `engine.kernels.paged_attention`
(Triton decode kernel + SDPA for prefill); see `engine.backends`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and which cached keys each sequence attends to."""

    positions: torch.Tensor  # [T] int64, absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot for each new token
    query_start_loc: list[int]  # [S + 1] offsets of each sequence's tokens in the flat batch
    seq_lens: list[int]  # [S] keys visible to the last query of each sequence
    block_tables: torch.Tensor  # [S, max_blocks] int64, padded with 0
    block_size: int
    # seq_lens as an [S] int32 tensor on the model's device: what kernels read without host syncs
    seq_lens_tensor: torch.Tensor | None = None
    max_query_len: int = 0  # longest query of the step; 0 = not given (derived from query_start_loc)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence brings exactly one new token (a pure decode step)."""
        if self.max_query_len:
            return self.max_query_len == 1
        return self.query_start_loc[-1] == self.num_seqs


def write_kv(kv_layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new tokens' K and V ([T, Hkv, D]) into one layer's paged cache ([2, N, B, Hkv, D])."""
    flat = kv_layer.flatten(1, 2)  # [2, N*B, Hkv, D]
    flat[0].index_copy_(0, slot_mapping, key.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(flat.dtype))


def gather_kv(
    kv_layer: torch.Tensor, block_table: torch.Tensor, seq_len: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `seq_len` keys and values ([L, Hkv, D] each) from its blocks."""
    blocks = block_table[: -(-seq_len // block_size)]
    keys, values = kv_layer[:, blocks].flatten(1, 2)[:, :seq_len].unbind(0)
    return keys, values


def paged_attention_ref(
    query: torch.Tensor,  # [T, Hq, D]
    kv_layer: torch.Tensor,  # [2, N, B, Hkv, D], already holding this step's keys
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys. Returns [T, Hq, D]."""
    num_kv_heads = kv_layer.shape[3]
    group = query.shape[1] // num_kv_heads
    out = torch.empty_like(query)
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        seq_len = meta.seq_lens[i]
        keys, values = gather_kv(kv_layer, meta.block_tables[i], seq_len, meta.block_size)  # [L, Hkv, D]
        q = query[start:end].transpose(0, 1)  # [Hq, Tq, D]
        k = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, L, D]
        v = values.transpose(0, 1).repeat_interleave(group, dim=0)
        num_q = end - start
        # Query j sits at position seq_len - num_q + j and sees keys 0 .. that position.
        q_pos = torch.arange(seq_len - num_q, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        scores = torch.matmul(q.float(), k.float().transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out[start:end] = torch.matmul(probs, v.to(query.dtype)).transpose(0, 1)
    return out
