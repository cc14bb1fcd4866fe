"""Decode steps replayed from CUDA graphs; prefill and mixed steps stay eager but for their MoE
layers (`MoEGraphs`, below).

A decode step of a MoE model launches hundreds of small kernels (28 layers of norm, projections,
RoPE, KV write, attention, routing, the fused experts); at small batches the CPU launching them is
slower than the GPU running them. Capturing the step once per batch-size bucket and replaying it
removes that cost. What a graph needs, and how the runner gives it:

    static buffers   input_ids, positions, slot_mapping [max_batch]; block_tables
                     [max_batch, max_blocks_per_seq]; seq_lens [max_batch] int32; logits
                     [bucket, vocab] fp32 per bucket (the graph's output)
    buckets          1 2 4 8 16 24 32 ... (steps of 8 up to 64, of 16 up to 128, of 32 beyond),
                     up to `max_batch`; a step of n sequences replays the smallest bucket >= n
    padding rows     rows n .. bucket-1 feed token 0 at position 0, write their K/V into the
                     scratch block (a block the block manager never hands out: the KV pool has
                     one block more than it manages) and attend over that one slot only

          rows  0 .. n-1          n .. bucket-1
    input_ids   real tokens       0
    slot        real slots        scratch_block * block_size
    table row   real block ids    scratch_block everywhere
    seq_len     real lengths      1

A step is replayed only when every sequence brings exactly one new token and all of them sample
(a pure decode step), the batch fits the largest bucket and the block tables fit the static
width; anything else (prefill, chunked prefill, mixed batches) runs eagerly. The replayed
forward must not synchronise with the host: the attention backend's decode path reads only
`meta.block_tables` and `meta.seq_lens_tensor` (engine.kernels.paged_attention), the fused MoE
kernels size their buffers from shapes only. Captured graphs share one memory pool, captured
from the largest bucket down so the smaller ones reuse its memory.

Not thread-safe: the engine's step thread owns it, like the runner.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import AttentionMetadata


def bucket_sizes(max_batch: int) -> list[int]:
    """The captured batch sizes, ascending, ending exactly at `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 129, 16)) + list(range(160, max_batch + 1, 32))
    sizes = [size for size in sizes if size < max_batch]
    return sizes + [max_batch]


@dataclass(frozen=True)
class GraphStats:
    num_graphs: int
    buckets: tuple[int, ...]
    max_blocks_per_seq: int


class DecodeGraphs:
    """Captures `model` forward + logits per bucket over `kv_cache`, and replays decode steps."""

    def __init__(
        self,
        model: nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        scratch_block: int,
        max_batch: int,
        max_blocks_per_seq: int,
    ) -> None:
        device = kv_cache.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the KV cache on a CUDA device, got {device}")
        if not 0 <= scratch_block < kv_cache.shape[2]:
            raise ValueError(f"scratch block {scratch_block} is outside the KV pool of {kv_cache.shape[2]} blocks")
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_blocks_per_seq = max_blocks_per_seq
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = self.buckets[-1]
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(self.max_batch, **long)
        self.positions = torch.zeros(self.max_batch, **long)
        self.slot_mapping = torch.full((self.max_batch,), scratch_block * block_size, **long)
        self.block_tables = torch.full((self.max_batch, max_blocks_per_seq), scratch_block, **long)
        self.seq_lens = torch.ones(self.max_batch, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def stats(self) -> GraphStats:
        return GraphStats(len(self.graphs), tuple(self.buckets), self.max_blocks_per_seq)

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:batch],
            slot_mapping=self.slot_mapping[:batch],
            query_start_loc=list(range(batch + 1)),
            seq_lens=[1] * batch,  # host copy for the torch references only; the graph reads seq_lens_tensor
            block_tables=self.block_tables[:batch],
            block_size=self.block_size,
            seq_lens_tensor=self.seq_lens[:batch],
            max_query_len=1,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:batch], self._meta(batch), self.kv_cache)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (Triton compiles, tuned configs load) and capture every bucket, largest first.

        The padding rows of every capture write only the scratch block, so capturing leaves every
        managed KV block untouched."""
        stream = torch.cuda.Stream(device=self.kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
        with torch.cuda.stream(stream):
            for batch in reversed(self.buckets):
                self._forward(batch)
        torch.cuda.current_stream(self.kv_cache.device).wait_stream(stream)
        torch.cuda.synchronize(self.kv_cache.device)
        self.pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[batch] = self._forward(batch)
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.kv_cache.device)

    def can_run(self, meta: AttentionMetadata, num_sample_rows: int) -> bool:
        num_seqs = meta.num_seqs
        return (
            bool(self.graphs)
            and 0 < num_seqs <= self.max_batch
            and meta.max_query_len == 1
            and num_sample_rows == num_seqs
            and meta.block_tables.shape[1] <= self.max_blocks_per_seq
            and meta.seq_lens_tensor is not None
        )

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the decode step; returns fp32 logits [n, V] (a view of the graph's output buffer,
        valid until the next replay). Call only when `can_run` said yes."""
        num_seqs = meta.num_seqs
        batch = self.buckets[bisect.bisect_left(self.buckets, num_seqs)]
        width = meta.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(input_ids)
        self.positions[:num_seqs].copy_(meta.positions)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens_tensor)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables)
        if width < self.max_blocks_per_seq:
            self.block_tables[:num_seqs, width:].fill_(self.scratch_block)
        if num_seqs < batch:
            self.input_ids[num_seqs:batch].zero_()
            self.positions[num_seqs:batch].zero_()
            self.slot_mapping[num_seqs:batch].fill_(self.scratch_block * self.block_size)
            self.seq_lens[num_seqs:batch].fill_(1)
            self.block_tables[num_seqs:batch].fill_(self.scratch_block)
        self.graphs[batch].replay()
        return self.logits[batch][:num_seqs]


def moe_token_buckets(max_tokens: int) -> list[int]:
    """The token counts whose MoE forward is captured, ascending: 16 … 512 by powers of two, then
    steps of 1.5x / 4/3 (768, 1024, 1536, 2048, …) up to and ending exactly at `max_tokens`."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        size = size * 2 if size < 512 else (size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3)
    return sizes + [max_tokens]


class MoEGraphs:
    """Prefill and mixed steps stay eager, except for their MoE layers, replayed from CUDA graphs.

    Why: a prefill step of up to ~2048 tokens is host-bound (measured on an H100: 256 tokens 48.7
    ms wall for 18.2 ms of GPU work; `benchmarks/results/engine_h100_NOTES.md`), and each MoE layer
    is about fifteen of a layer's ~25 launches (router, expert alignment, grouped GEMMs, weighted
    sum, shared experts). A MoE layer treats tokens independently and sizes its buffers from
    shapes only, so it is captured per (layer, token bucket) on static buffers:

        input   [max_tokens, H]: rows 0 .. T-1 the step's tokens, the rest whatever came before
        output  [max_tokens, H]: written by every graph; a step's rows are copied out at once

    Padding rows compute garbage that no real row reads (routing, experts and the shared MLP are
    per token); they do add to the layers' routed-token counters, as decode graphs' padding does.
    Steps of more than `max_tokens` tokens, and the decode graphs' own capture, run the layer
    eagerly. Not thread-safe: the engine's step thread owns it.
    """

    def __init__(
        self, moes: list[nn.Module], hidden_size: int, dtype: torch.dtype, device: torch.device, max_tokens: int
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.moes = moes
        self.buckets = moe_token_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        self.input = torch.zeros(self.max_tokens, hidden_size, dtype=dtype, device=device)
        self.output = torch.zeros(self.max_tokens, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.device = device

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up every bucket once, then capture every (layer, bucket), largest bucket first, in
        one memory pool; afterwards each layer's forward replays its graph when it can."""
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for tokens in reversed(self.buckets):
                self.moes[0].forward_local(self.input[:tokens])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        for tokens in reversed(self.buckets):
            for index, moe in enumerate(self.moes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.output[:tokens].copy_(moe.forward_local(self.input[:tokens]))
                self.graphs[(index, tokens)] = graph
        torch.cuda.synchronize(self.device)
        for index, moe in enumerate(self.moes):
            moe.graphed = functools.partial(self.run, index)

    def run(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Layer `index`'s MoE output for `x` [T, H] from its graph (a new tensor), or None when
        this step cannot replay (too many tokens, or a graph is being captured)."""
        num_tokens = x.shape[0]
        if num_tokens > self.max_tokens or num_tokens == 0 or torch.cuda.is_current_stream_capturing():
            return None
        tokens = self.buckets[bisect.bisect_left(self.buckets, num_tokens)]
        self.input[:num_tokens].copy_(x)
        self.graphs[(index, tokens)].replay()
        return self.output[:num_tokens].clone()
