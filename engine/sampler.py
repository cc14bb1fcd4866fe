"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds and top-N logprobs.

Seeded requests draw their n-th token from a generator seeded by (seed, n), so a request sampled
by a prefill worker (token 0) and continued by a decode worker (tokens 1..) gets the same tokens
as on a single engine. Unseeded requests share the engine's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.request import TokenLogprobs
from engine.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class SamplingRow:
    """One row of logits to sample: its parameters and the index of the token being drawn."""

    params: SamplingParams
    output_index: int


def sample(
    logits: torch.Tensor, rows: Sequence[SamplingRow], generator: torch.Generator | None = None
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Sample one token per row of `logits` [n, V] (float32). Returns token ids and logprobs."""
    token_ids = _pick(logits, rows, generator)
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if wanted:
        log_probs = torch.log_softmax(logits[wanted].float(), dim=-1)
        for j, i in enumerate(wanted):
            logprobs[i] = _token_logprobs(log_probs[j], token_ids[i], rows[i].params.logprobs or 0)
    return token_ids, logprobs


def _pick(logits: torch.Tensor, rows: Sequence[SamplingRow], generator: torch.Generator | None) -> list[int]:
    greedy = logits.argmax(dim=-1).tolist()
    result = list(greedy)
    for i, row in enumerate(rows):
        params = row.params
        if params.is_greedy:
            continue
        probs = _filtered_probs(logits[i].float(), params).cpu()
        if params.seed is not None:
            gen = torch.Generator().manual_seed((params.seed * _SEED_STRIDE + row.output_index) % (2**63))
        else:
            gen = generator
        result[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    return result


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def _token_logprobs(log_probs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprobs:
    top: tuple[tuple[int, float], ...] = ()
    if num_top > 0:
        values, ids = torch.topk(log_probs, num_top)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(token_id=token_id, logprob=float(log_probs[token_id]), top=top)
