"""The model runner: the only place that turns a step's schedule into tensors, once per step.

SchedulerOutput ──▶ input_ids, positions, slot_mapping, block tables (AttentionMetadata)
                ──▶ model.forward ──▶ logits of the rows that sample ──▶ sampler
                ──▶ {request_id: SampledToken}

A VL model's runner also holds `engine.mm_inputs.MultiModalInputs`, which gives each step its
positions (3D RoPE: a generated token at i + mrope_delta) and, for steps with prompt images or
vision markers, the `MultiModalBatch` (3D positions, vision-expert mask, image embeddings from the
vision tower) passed to the model as a fourth argument. Such steps always run eagerly.

Under expert parallelism (`engine.parallel`) the runner of rank 0 also broadcasts each step's
inputs to the other ranks before its forward pass, and they run the same pass in `follower_loop`:

    rank 0:     prepare ─▶ send_step ─▶ forward ─▶ logits, sample (rank 0 only)
    rank 1..:   receive_step ─▶ forward                 (MoE layers all-reduce inside the forward)

One step on the wire, over the EP group (int64 tensors on the group's device):

    header   [op (1 = step, 0 = stop), T tokens, S sequences, max_blocks, R sampled rows, block_size]
    payload  input_ids[T] | positions[T] | slot_mapping[T] | query_start_loc[S + 1] | seq_lens[S]
             | block_tables[S * max_blocks] | sample_rows[R]
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention import AttentionMetadata
from engine.sampler import SamplingRow, sample
from engine.scheduler import SampledToken, SchedulerOutput

if TYPE_CHECKING:
    from engine.cuda_graph import DecodeGraphs
    from engine.mm_inputs import MultiModalInputs
    from engine.models.ernie4_5_vl_moe import MultiModalBatch
    from engine.parallel import ExpertParallel

_OP_STOP, _OP_STEP = 0, 1
_HEADER_LEN = 6


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # indices into the flat batch whose logits are sampled
    sample_request_ids: tuple[str, ...]
    sampling: tuple[SamplingRow, ...]
    mm: MultiModalBatch | None = None  # a VL model's step with prompt images or vision markers


class ModelRunner:
    """Runs the model over the paged KV cache. Not thread-safe (the engine's step thread owns it).

    With `expert_parallel`, rank 0's `execute` mirrors each step to the other ranks, which run
    `follower_loop(runner)` instead of `execute`; `stop_followers()` ends their loops.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        seed: int = 0,
        expert_parallel: ExpertParallel | None = None,
        multimodal: MultiModalInputs | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.generator = torch.Generator().manual_seed(seed)
        # Called after each forward pass with the step's inputs (the prefill role hooks KV sends here).
        self.after_forward: list[Callable[[StepInputs], None]] = []
        if expert_parallel is not None and expert_parallel.device != self.device:
            raise ValueError(
                f"the expert-parallel group runs on {expert_parallel.device} but the KV cache is on {self.device}"
            )
        if expert_parallel is not None and multimodal is not None:
            raise ValueError("expert parallelism does not support the VL model yet: run it on one device per worker")
        self.expert_parallel = expert_parallel
        self.followers_stopped = False
        self.multimodal = multimodal  # a VL model's per-step inputs (engine.mm_inputs); None: text only
        # Set by the engine when decode runs under CUDA graphs (engine.cuda_graph); None: all eager.
        self.decode_graphs: DecodeGraphs | None = None

    def prepare(self, output: SchedulerOutput) -> StepInputs:
        """The step's tensors, built on the host as one int64 buffer and copied to the device in
        one transfer (separate `torch.tensor(..., device=cuda)` calls cost a synchronous copy
        each). Per request the host work is O(new tokens + blocks), never O(context):

            host   tokens[T] | positions[T] | slots[T] | seq_lens[S] | sample_rows[R] | table[S*M]
        """
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        sampling: list[SamplingRow] = []
        bs = self.block_size
        for item in output.scheduled:
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            tokens += _token_range(request.prompt_token_ids, request.output_token_ids, start, end)
            positions += range(start, end)
            slots += _slot_range(request.block_ids, bs, start, end)
            starts.append(starts[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                sample_rows.append(starts[-1] - 1)
                sample_ids.append(request.request_id)
                sampling.append(SamplingRow(request.sampling_params, request.num_output_tokens))
        num_seqs = len(seq_lens)
        max_blocks = max(-(-n // bs) for n in seq_lens)
        host = array("q", tokens)
        host += array("q", positions)
        host += array("q", slots)
        host += array("q", seq_lens)
        host += array("q", sample_rows)
        table_at = len(host)
        host += array("q", bytes(8 * num_seqs * max_blocks))  # zeros: the padding of short rows
        for row, item in enumerate(output.scheduled):
            ids = item.request.block_ids[:max_blocks]
            at = table_at + row * max_blocks
            host[at : at + len(ids)] = array("q", ids)
        flat = torch.frombuffer(host, dtype=torch.long).to(self.device)
        num_tokens = len(tokens)
        input_ids, positions_t, slots_t, lens_t, rows_t, table_t = flat.split(
            [num_tokens, num_tokens, num_tokens, num_seqs, len(sample_rows), num_seqs * max_blocks]
        )
        vl = self.multimodal.prepare(output.scheduled) if self.multimodal is not None else None
        meta = AttentionMetadata(
            positions=positions_t if vl is None else vl.positions,
            slot_mapping=slots_t,
            query_start_loc=starts,
            seq_lens=seq_lens,
            block_tables=table_t.view(num_seqs, max_blocks),
            block_size=bs,
            seq_lens_tensor=lens_t.to(torch.int32),
            max_query_len=max(item.num_new_tokens for item in output.scheduled),
        )
        return StepInputs(
            input_ids=input_ids,
            meta=meta,
            sample_rows=rows_t,
            sample_request_ids=tuple(sample_ids),
            sampling=tuple(sampling),
            mm=None if vl is None else vl.batch,
        )

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, SampledToken]:
        inputs = self.prepare(output)
        if self.expert_parallel is not None:
            self._send_step(inputs)
        graphs = self.decode_graphs
        if graphs is not None and inputs.mm is None and graphs.can_run(inputs.meta, len(inputs.sample_request_ids)):
            # A pure decode step: every row samples, in row order, so the graph's logits are the rows'.
            logits = graphs.run(inputs.input_ids, inputs.meta)
        else:
            hidden = self._forward(inputs)
            logits = None
        for hook in self.after_forward:
            hook(inputs)
        if not inputs.sample_request_ids:
            return {}
        if logits is None:
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
        token_ids, logprobs = sample(logits, inputs.sampling, self.generator)
        return {
            rid: SampledToken(tok, lp)
            for rid, tok, lp in zip(inputs.sample_request_ids, token_ids, logprobs, strict=True)
        }

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.mm is None:
            return self.model(inputs.input_ids, inputs.meta, self.kv_cache)
        return self.model(inputs.input_ids, inputs.meta, self.kv_cache, inputs.mm)

    @torch.inference_mode()
    def warm_up(self, token_counts: Sequence[int], scratch_block: int) -> None:
        """One eager forward per token count, so every Triton kernel variant a prefill or mixed step
        can pick is compiled before the first request: a variant first met while serving stalls that
        step for the length of a compile (~1-2 s with the fused MoE kernel). Each forward is one
        sequence whose keys and values all go to `scratch_block`, a block no request ever holds."""
        dev, bs = self.device, self.block_size
        for num_tokens in token_counts:
            positions = torch.arange(num_tokens, device=dev)
            meta = AttentionMetadata(
                positions=positions,
                slot_mapping=scratch_block * bs + positions % bs,
                query_start_loc=[0, num_tokens],
                seq_lens=[num_tokens],
                block_tables=torch.full((1, -(-num_tokens // bs)), scratch_block, dtype=torch.long, device=dev),
                block_size=bs,
                seq_lens_tensor=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
                max_query_len=num_tokens,
            )
            hidden = self.model(torch.zeros(num_tokens, dtype=torch.long, device=dev), meta, self.kv_cache)
            self.model.compute_logits(hidden[-1:])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def stop_followers(self) -> None:
        """Rank 0: end every follower's `follower_loop` (idempotent). No step may run afterwards."""
        ep = self._leader_group()
        if not self.followers_stopped:
            ep.broadcast(torch.tensor([_OP_STOP] + [0] * (_HEADER_LEN - 1), dtype=torch.long, device=ep.device))
            self.followers_stopped = True

    def _send_step(self, inputs: StepInputs) -> None:
        ep = self._leader_group()
        if self.followers_stopped:
            raise RuntimeError("the followers were stopped; this expert-parallel runner cannot run more steps")
        meta = inputs.meta
        num_seqs, max_blocks = meta.block_tables.shape
        header = [_OP_STEP, inputs.input_ids.numel(), num_seqs, max_blocks, inputs.sample_rows.numel(), meta.block_size]
        lengths = torch.tensor(meta.query_start_loc + meta.seq_lens, dtype=torch.long, device=ep.device)
        parts = (inputs.input_ids, meta.positions, meta.slot_mapping, lengths, meta.block_tables.flatten())
        ep.broadcast(torch.tensor(header, dtype=torch.long, device=ep.device))
        ep.broadcast(torch.cat([*parts, inputs.sample_rows]))

    def _leader_group(self) -> ExpertParallel:
        ep = self.expert_parallel
        if ep is None or not ep.is_leader:
            raise RuntimeError("only rank 0 of an expert-parallel group runs steps; other ranks run follower_loop")
        return ep


def _token_range(prompt: list[int], output: list[int], start: int, end: int) -> list[int]:
    """Tokens start..end-1 of prompt + output, without walking the tokens before `start`."""
    num_prompt = len(prompt)
    if end <= num_prompt:
        return prompt[start:end]
    if start >= num_prompt:
        return output[start - num_prompt : end - num_prompt]
    return prompt[start:] + output[: end - num_prompt]


def _slot_range(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """The KV slots of positions start..end-1: one `range` per block the positions cross."""
    slots: list[int] = []
    pos = start
    while pos < end:
        index = pos // block_size
        stop = min(end, (index + 1) * block_size)
        offset = (block_ids[index] - index) * block_size  # slot = block_ids[pos // B] * B + pos % B
        slots += range(offset + pos, offset + stop)
        pos = stop
    return slots


def warm_up_token_counts(max_num_batched_tokens: int) -> list[int]:
    """Token counts whose forwards meet every kernel variant a step of at most
    `max_num_batched_tokens` tokens can pick: each power of two (tuned MoE configs are keyed by
    the token count's log2, the default ones by its size), a count 3 above each (Triton
    specialises integer arguments on divisibility by 16), and the budget itself."""
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    counts = {max_num_batched_tokens}
    power = 1
    while power <= max_num_batched_tokens:
        counts.update((power, min(power + 3, max_num_batched_tokens)))
        power *= 2
    return sorted(counts)


def receive_step(ep: ExpertParallel, block_size: int) -> StepInputs | None:
    """A follower's side of `ModelRunner._send_step`: the next step's inputs, or None on stop."""
    header = ep.broadcast(torch.empty(_HEADER_LEN, dtype=torch.long, device=ep.device))
    op, num_tokens, num_seqs, max_blocks, num_rows, sent_block_size = header.tolist()
    if op == _OP_STOP:
        return None
    if sent_block_size != block_size:
        raise RuntimeError(f"rank 0 runs KV blocks of {sent_block_size} tokens, this rank {block_size}")
    sizes = [num_tokens, num_tokens, num_tokens, 2 * num_seqs + 1, num_seqs * max_blocks, num_rows]
    payload = ep.broadcast(torch.empty(sum(sizes), dtype=torch.long, device=ep.device))
    input_ids, positions, slots, length_tensor, table, sample_rows = payload.split(sizes)
    lengths = length_tensor.tolist()
    starts = lengths[: num_seqs + 1]
    meta = AttentionMetadata(
        positions=positions,
        slot_mapping=slots,
        query_start_loc=starts,
        seq_lens=lengths[num_seqs + 1 :],
        block_tables=table.view(num_seqs, max_blocks),
        block_size=block_size,
        seq_lens_tensor=length_tensor[num_seqs + 1 :].to(torch.int32),
        max_query_len=max(end - start for start, end in itertools.pairwise(starts)),
    )
    return StepInputs(input_ids=input_ids, meta=meta, sample_rows=sample_rows, sample_request_ids=(), sampling=())


@torch.inference_mode()
def follower_loop(runner: ModelRunner) -> int:
    """Ranks 1..N-1 of an expert-parallel group: run each step rank 0 broadcasts, until it stops
    the followers. Returns the number of steps run. Nothing is sampled here (rank 0 samples)."""
    ep = runner.expert_parallel
    if ep is None or ep.is_leader:
        raise RuntimeError("follower_loop runs on ranks 1..N-1 of an expert-parallel group")
    num_steps = 0
    while (inputs := receive_step(ep, runner.block_size)) is not None:
        runner.model(inputs.input_ids, inputs.meta, runner.kv_cache)
        num_steps += 1
    return num_steps
