"""The model runner: the only place that turns a step's schedule into tensors, once per step.

SchedulerOutput ──▶ input_ids, positions, slot_mapping, block tables (AttentionMetadata)
                ──▶ model.forward ──▶ logits of the rows that sample ──▶ sampler
                ──▶ {request_id: SampledToken}
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.sampler import SamplingRow, sample
from engine.scheduler import SampledToken, SchedulerOutput


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # indices into the flat batch whose logits are sampled
    sample_request_ids: tuple[str, ...]
    sampling: tuple[SamplingRow, ...]


class ModelRunner:
    """Runs the model over the paged KV cache. Not thread-safe (the engine's step thread owns it)."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int, seed: int = 0) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.generator = torch.Generator().manual_seed(seed)
        # Called after each forward pass with the step's inputs (the prefill role hooks KV sends here).
        self.after_forward: list[Callable[[StepInputs], None]] = []

    def prepare(self, output: SchedulerOutput) -> StepInputs:
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
            tokens.extend(
                itertools.islice(itertools.chain(request.prompt_token_ids, request.output_token_ids), start, end)
            )
            block_ids = request.block_ids
            for pos in range(start, end):
                positions.append(pos)
                slots.append(block_ids[pos // bs] * bs + pos % bs)
            starts.append(starts[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                sample_rows.append(starts[-1] - 1)
                sample_ids.append(request.request_id)
                sampling.append(SamplingRow(request.sampling_params, request.num_output_tokens))
        max_blocks = max(-(-n // bs) for n in seq_lens)
        table = [item.request.block_ids[:max_blocks] for item in output.scheduled]
        table = [row + [0] * (max_blocks - len(row)) for row in table]
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=starts,
            seq_lens=seq_lens,
            block_tables=torch.tensor(table, dtype=torch.long, device=dev),
            block_size=bs,
        )
        return StepInputs(
            input_ids=torch.tensor(tokens, dtype=torch.long, device=dev),
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            sample_request_ids=tuple(sample_ids),
            sampling=tuple(sampling),
        )

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, SampledToken]:
        inputs = self.prepare(output)
        hidden = self.model(inputs.input_ids, inputs.meta, self.kv_cache)
        for hook in self.after_forward:
            hook(inputs)
        if not inputs.sample_request_ids:
            return {}
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        token_ids, logprobs = sample(logits, inputs.sampling, self.generator)
        return {
            rid: SampledToken(tok, lp)
            for rid, tok, lp in zip(inputs.sample_request_ids, token_ids, logprobs, strict=True)
        }
