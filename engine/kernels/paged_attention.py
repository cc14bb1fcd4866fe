"""Paged attention on Triton: split-KV decode kernel, and the model's attention backend around it.

`paged_decode_attention` is the fast twin of `paged_decode_attention_ref` (one query token per
sequence over its paged keys; kernels in `_paged_attention.py`):

* grid (S, Hkv, num_splits) -- flash-decoding: each program streams a contiguous run of one
  sequence's KV blocks for one KV head and keeps an fp32 online softmax for all Hq / Hkv query
  heads of that KV head at once (GQA: every K/V byte is read once); a second small kernel merges
  the splits by log-sum-exp. With one split the first kernel writes the output itself.
* CUDA-graph safe: nothing reads a tensor back to the host. The split count comes from static
  shapes only (S, Hkv, the block table's width, the block size, the SM count); the partial
  buffers' shapes likewise; a sequence's keys are divided among the splits on the device.

`paged_attention` has the model's attention signature (`paged_attention_ref`'s): decode-only steps
are one kernel launch driven by tensors alone (`meta.block_tables`, `meta.seq_lens_tensor`), so it
can be captured in a CUDA graph; a mixed step sends its decode rows through the kernel and each
prefill or chunked-prefill sequence through `F.scaled_dot_product_attention` over its gathered
blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.bias import causal_lower_right

from engine.attention import AttentionMetadata, gather_kv
from engine.kernels._paged_attention import _decode_split_kernel, _merge_splits_kernel
from engine.kernels.fused_moe import IS_INTERPRETED, SUPPORTED_DTYPES, num_sms
from engine.kernels.moe_align import ScratchAllocator, empty_scratch

LOG2_E = 1.4426950408889634
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 64  # below this the merge costs more than the parallelism gains
PROGRAMS_PER_SM = 2  # split until the grid fills every SM this many times over


def default_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int, num_sms: int) -> int:
    """Splits per sequence from static shapes only: enough programs to fill the GPU
    PROGRAMS_PER_SM times, no split shorter than MIN_KEYS_PER_SPLIT keys of the longest possible
    sequence (max_blocks * block_size), at most MAX_SPLITS."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, max(num_seqs * num_kv_heads, 1))
    longest = triton.cdiv(max_blocks * block_size, MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, longest, MAX_SPLITS))


def _check_inputs(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_splits: int | None,
    out: torch.Tensor | None,
) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [S, Hq, D], got shape {tuple(query.shape)}")
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(f"kv_layer must be [2, N, B, Hkv, D], got shape {tuple(kv_layer.shape)}")
    num_seqs, num_q_heads, head_dim = query.shape
    num_kv_heads = kv_layer.shape[3]
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"query dtype must be one of {SUPPORTED_DTYPES}, got {query.dtype}")
    if kv_layer.dtype != query.dtype:
        raise TypeError(f"kv_layer dtype {kv_layer.dtype} must equal query dtype {query.dtype}")
    if kv_layer.shape[4] != head_dim:
        raise ValueError(f"kv_layer head_dim {kv_layer.shape[4]} must equal query head_dim {head_dim}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads {num_q_heads} must be a multiple of KV heads {num_kv_heads}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [S={num_seqs}, M], got shape {tuple(block_tables.shape)}")
    if block_tables.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_tables dtype must be int32 or int64, got {block_tables.dtype}")
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be [S={num_seqs}], got shape {tuple(seq_lens.shape)}")
    if seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_lens dtype must be int32 or int64, got {seq_lens.dtype}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise ValueError(
            f"out must be {tuple(query.shape)} {query.dtype} like query, got {tuple(out.shape)} {out.dtype}"
        )
    named = [("query", query), ("kv_layer", kv_layer)] + ([("out", out)] if out is not None else [])
    for name, tensor in named:
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables rows must be contiguous, got strides {block_tables.stride()}")
    tensors = [query, kv_layer, block_tables, seq_lens] + ([out] if out is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if query.device.type != "cuda" and not (IS_INTERPRETED and query.device.type == "cpu"):
        raise ValueError(
            f"paged_decode_attention runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got {query.device}"
        )


def paged_decode_attention(
    query: torch.Tensor,  # [S, Hq, D]: one query token per sequence
    kv_layer: torch.Tensor,  # [2, N, B, Hkv, D], already holding this step's keys
    block_tables: torch.Tensor,  # [S, M] int32/int64
    seq_lens: torch.Tensor,  # [S] int32/int64 on the device: keys of each sequence
    scale: float,
    num_splits: int | None = None,
    *,
    out: torch.Tensor | None = None,
    scratch: ScratchAllocator = empty_scratch,
) -> torch.Tensor:
    """softmax(q k^T * scale) v of each sequence's query over its first seq_lens[s] cached keys
    (contract of `paged_decode_attention_ref`); returns [S, Hq, D] in query's dtype (into `out`
    when given). Accumulates in fp32.

    The caller guarantees seq_lens[s] <= M * B and that the first ceil(seq_lens[s] / B) entries of
    block_tables[s] are valid blocks (not checked: that would read the tensors back). Table entries
    past them are never read; a sequence with seq_lens[s] == 0 gets zeros. `num_splits` overrides
    `default_num_splits`; `scratch` allocates the partial buffers (tests poison them).
    """
    _check_inputs(query, kv_layer, block_tables, seq_lens, num_splits, out)
    num_seqs, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(
            num_seqs, num_kv_heads, block_tables.shape[1], block_size, num_sms(query.device)
        )
    group = num_q_heads // num_kv_heads
    write_out = num_splits == 1
    if write_out:
        part_out = part_lse = out  # unused by the kernel
    else:
        part_out = scratch((num_seqs, num_q_heads, num_splits, head_dim), torch.float32, query.device)
        part_lse = scratch((num_seqs, num_q_heads, num_splits), torch.float32, query.device)
    block_n = 64 if head_dim <= 128 else 32
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        kv_layer,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * LOG2_E,
        num_splits,
        num_q_heads,
        block_size,
        query.stride(0),
        query.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        WRITE_OUT=write_out,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2,
    )
    if not write_out:
        splits_pad = triton.next_power_of_2(num_splits)
        _merge_splits_kernel[(num_seqs, num_q_heads)](
            part_out,
            part_lse,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            SPLITS_PAD=splits_pad,
            BLOCK_S=min(splits_pad, 16),
            num_warps=4 if head_dim <= 128 else 8,
        )
    return out


def warm_up_decode_attention(
    kv_layer: torch.Tensor, num_q_heads: int, max_blocks: int, scratch_block: int, scale: float = 1.0
) -> None:
    """Compile the decode kernels' variants an eager step can pick before serving (a CUDA-graph
    replay picks only the captured ones). They differ by the split count (1 writes the output
    itself; the merge kernel is built per power of two of it; Triton specialises integer arguments
    equal to 1 and multiples of 16) and by the block table's row stride, which in a mixed step is
    the step's widest table (1, a multiple of 16, or neither). Reads only `scratch_block`."""
    device, block_size = kv_layer.device, kv_layer.shape[2]
    splits = sorted({n for k in range(7) for n in (1 << k, (1 << k) + 1)} & set(range(1, MAX_SPLITS + 1)))
    query = torch.zeros(1, num_q_heads, kv_layer.shape[4], dtype=kv_layer.dtype, device=device)
    for width in sorted({1, 2, 16, 17} & set(range(1, max_blocks + 1))):
        table = torch.full((1, width), scratch_block, dtype=torch.long, device=device)
        seq_lens = torch.tensor([width * block_size], dtype=torch.int32, device=device)
        for num_splits in splits:
            paged_decode_attention(query, kv_layer, table, seq_lens, scale, num_splits)


# ----------------------------------------------------------------------------------------------
# the attention backend (the model's AttentionFn)
# ----------------------------------------------------------------------------------------------


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv_layer: torch.Tensor,  # [2, N, B, Hkv, D], already holding this step's keys
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys (contract of
    `engine.attention.paged_attention_ref`); returns [T, Hq, D].

    Decode-only steps (`meta.is_decode_only`) read no Python list: one kernel launch over
    `meta.block_tables` and `meta.seq_lens_tensor`, capturable in a CUDA graph. Otherwise the
    sequences with one new token go through the kernel together and every longer query through
    SDPA, one sequence at a time.
    """
    seq_lens = meta.seq_lens_tensor
    if seq_lens is None:  # metadata built without it (tests, older callers): one host-to-device copy
        seq_lens = torch.tensor(meta.seq_lens, dtype=torch.int32, device=query.device)
    if meta.is_decode_only:
        return paged_decode_attention(query, kv_layer, meta.block_tables, seq_lens, scale)

    out = torch.empty_like(query)
    starts = meta.query_start_loc
    decode = [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] == 1]
    if decode:
        seqs = torch.tensor(decode, device=query.device)
        rows = torch.tensor([starts[i] for i in decode], device=query.device)
        out[rows] = paged_decode_attention(query[rows], kv_layer, meta.block_tables[seqs], seq_lens[seqs], scale)
    for i in range(meta.num_seqs):
        start, end = starts[i], starts[i + 1]
        if end - start > 1:
            out[start:end] = prefill_attention(
                query[start:end], kv_layer, meta.block_tables[i], meta.seq_lens[i], meta.block_size, scale
            )
    return out


def prefill_attention(
    query: torch.Tensor,  # [Tq, Hq, D]: the sequence's new tokens, the last Tq of its seq_len keys
    kv_layer: torch.Tensor,  # [2, N, B, Hkv, D]
    block_table: torch.Tensor,  # [M] this sequence's blocks
    seq_len: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One sequence's causal attention through SDPA over its gathered blocks; returns [Tq, Hq, D].

    Query j sits at position context + j (context = seq_len - Tq) and sees keys 0 .. context + j:
    plain `is_causal` when there is no cached context, else a bottom-right-aligned causal mask.
    """
    num_q, num_q_heads, _ = query.shape
    context = seq_len - num_q
    group = num_q_heads // kv_layer.shape[3]
    # [1, Hq, L, D]: heads expanded so every SDPA backend (flash, memory-efficient) can take them
    keys, values = (
        t.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        for t in gather_kv(kv_layer, block_table, seq_len, block_size)
    )
    # With context, a lower-right-aligned causal bias: the flash and memory-efficient kernels take
    # it without materialising a [Tq, L] mask (a 8k-token chunk over 32k keys would need 20 GB).
    mask = causal_lower_right(num_q, seq_len) if context else None
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], keys, values, attn_mask=mask, is_causal=not context, scale=scale
    )
    return out[0].transpose(0, 1)
