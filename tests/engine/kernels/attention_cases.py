"""Test cases for paged attention, shared by the CPU interpreter tests and the GPU tests.

Each `run_*_case` builds a paged KV cache from a seed with the sequences' blocks shuffled across
the pool, and poisons everything the kernel must not read with NaN: the blocks no sequence owns,
the slots past each sequence's last key, the block-table entries past each sequence's blocks
(they name a NaN block), the query's row padding, the output and the partial buffers. It returns
plain numbers (JSON-friendly: the CPU tests call these in a `TRITON_INTERPRET=1` subprocess, see
`interpreter_worker.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.attention import AttentionMetadata, paged_attention_ref
from engine.kernels.paged_attention import paged_attention, paged_decode_attention
from engine.kernels.paged_attention_ref import paged_decode_attention_ref
from tests.engine.kernels.moe_cases import nan_padded, poisoned_scratch

NUM_UNUSED_BLOCKS = 3  # NaN blocks besides the sequences' own (>= 2: block 0 and the table padding's)
TABLE_PADDING = 2  # block-table columns past the longest sequence


def make_paged_inputs(
    seq_lens: list[int],
    num_queries: int,
    *,
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    generator: torch.Generator,
    table_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query [num_queries, Hq, D], kv_layer [2, N, B, Hkv, D], block_tables [S, M]) with each
    sequence's blocks drawn from a shuffled pool; every slot no sequence owns up to its length is
    NaN, block 0 included."""
    blocks_of = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_of) + NUM_UNUSED_BLOCKS
    # block 0 stays unused: a load whose masked table entry fell back to 0 reads NaN
    order = [b for b in torch.randperm(num_blocks, generator=generator, device=device).tolist() if b] + [0]
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=generator, device=device)
    width = max(blocks_of, default=0) + TABLE_PADDING
    nan_block = order[-2]  # another unused block
    table = torch.full((len(seq_lens), width), nan_block, dtype=table_dtype, device=device)
    next_block = 0
    for s, count in enumerate(blocks_of):
        table[s, :count] = torch.tensor(order[next_block : next_block + count], dtype=table_dtype, device=device)
        next_block += count
    # keys held by each table entry: B for full blocks, fewer in a sequence's last, 0 past it
    first_key = torch.arange(width, device=device)[None, :] * block_size
    lens = torch.tensor(seq_lens, device=device, dtype=torch.long)[:, None]
    num_keys = (lens - first_key).clamp(0, block_size)  # [S, M]
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
    used = num_keys > 0
    owned[table[used].long()] = torch.arange(block_size, device=device)[None, :] < num_keys[used][:, None]
    kv[:, ~owned] = float("nan")
    query = torch.randn(num_queries, num_q_heads, head_dim, generator=generator, device=device)
    return query.to(dtype), kv.to(dtype), table


def _errors(out: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    out = out.to(reference.dtype)
    ref_norm = reference.norm().item()
    return {
        "shape": list(out.shape),
        "finite": bool(torch.isfinite(out).all().item()),
        "rel_err": (out - reference).norm().item() / max(ref_norm, 1e-30),
        "max_abs_err": (out - reference).abs().max().item() if out.numel() else 0.0,
        "ref_norm": ref_norm,
    }


def run_decode_case(
    *,
    seq_lens: list[int],
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_splits: int | None = None,
    scale: float | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    table_dtype: str = "int64",
    with_out: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """paged_decode_attention vs paged_decode_attention_ref (float64 on CPU, float32 on GPU)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    query, kv, table = make_paged_inputs(
        seq_lens,
        len(seq_lens),
        block_size=block_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=getattr(torch, dtype),
        device=device,
        generator=generator,
        table_dtype=getattr(torch, table_dtype),
    )
    seq_lens_tensor = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5 if scale is None else scale
    ref_dtype = torch.float64 if device == "cpu" else torch.float32
    reference = paged_decode_attention_ref(query.to(ref_dtype), kv.to(ref_dtype), table, seq_lens_tensor, scale)

    out = nan_padded(torch.zeros_like(query), pad_first=0).fill_(float("nan")) if with_out else None
    result = paged_decode_attention(
        nan_padded(query, pad_first=0),
        kv,
        table,
        seq_lens_tensor,
        scale,
        num_splits,
        out=out,
        scratch=poisoned_scratch,
    )
    if with_out:
        assert result is out, "the output must go into `out`"
    return {"dtype": str(result.dtype), **_errors(result, reference)}


def run_backend_case(
    *,
    query_lens: list[int],
    context_lens: list[int],
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str = "float32",
    device: str = "cpu",
    lists_lie: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """The model's attention backend `paged_attention` vs `paged_attention_ref` on one step:
    sequence i brings query_lens[i] new tokens after context_lens[i] cached ones (all of them
    already in the cache, as after write_kv).

    `lists_lie` (decode-only steps): after the reference ran, the metadata's Python lists claim one
    key per sequence, as a CUDA graph's placeholder metadata does; the backend must not read them.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    query, kv, table = make_paged_inputs(
        seq_lens,
        sum(query_lens),
        block_size=block_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=getattr(torch, dtype),
        device=device,
        generator=generator,
    )
    empty = torch.empty(0, dtype=torch.long, device=device)
    meta = AttentionMetadata(
        positions=empty,
        slot_mapping=empty,
        query_start_loc=[sum(query_lens[:i]) for i in range(len(query_lens) + 1)],
        seq_lens=seq_lens,
        block_tables=table,
        block_size=block_size,
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
    )
    scale = head_dim**-0.5
    ref_dtype = torch.float64 if device == "cpu" else torch.float32
    reference = paged_attention_ref(query.to(ref_dtype), kv.to(ref_dtype), meta, scale)
    if lists_lie:
        assert meta.is_decode_only, "only a decode-only step promises not to read the lists"
        meta.seq_lens = [1] * meta.num_seqs
    return _errors(paged_attention(query, kv, meta, scale), reference)
