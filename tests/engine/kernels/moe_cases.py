"""Test cases for the MoE kernels, shared by the CPU interpreter tests and the GPU tests.

Each `run_*_case` builds its inputs from a seed, runs the Triton op with every scratch buffer and
the output poisoned (NaN, or a huge int), with inputs laid out so that a stray read lands on NaN,
and returns plain numbers (JSON-friendly: the CPU tests call these in a `TRITON_INTERPRET=1`
subprocess, see `interpreter_worker.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.kernels.fused_moe import fused_moe
from engine.kernels.fused_moe_ref import fused_moe_ref, route_ref
from engine.kernels.moe_align import empty_scratch, moe_align
from engine.kernels.moe_route import route

INT_POISON = 0x3FFFFFFF


def poisoned_scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch allocator whose memory reads as NaN (floats) or a huge id (ints) until written."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, INT_POISON, dtype=dtype, device=device)


def nan_padded(values: torch.Tensor, pad_last: int = 8, pad_first: int = 1) -> torch.Tensor:
    """A view of `values` inside a NaN-filled buffer: NaN past the last dim and around the first."""
    shape = list(values.shape)
    shape[0] += 2 * pad_first
    shape[-1] += pad_last
    buffer = torch.full(shape, float("nan"), dtype=values.dtype, device=values.device)
    view = buffer[pad_first : pad_first + values.shape[0], ..., : values.shape[-1]]
    view.copy_(values)
    return view


def random_topk_ids(
    num_tokens: int, top_k: int, candidates: list[int], generator: torch.Generator, device: str
) -> torch.Tensor:
    """[T, K] int64: per token, K distinct experts drawn from `candidates`."""
    scores = torch.rand(num_tokens, len(candidates), generator=generator, device=device)
    picks = scores.topk(top_k, dim=1).indices
    return torch.tensor(candidates, device=device)[picks]


def make_moe_inputs(
    *,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    inter_size: int,
    dtype: torch.dtype,
    device: str,
    expert_offset: int = 0,
    num_global_experts: int | None = None,
    used_experts: list[int] | None = None,
    ids_dtype: torch.dtype = torch.int64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs (fp32 masters, cast to `dtype`) for one routed-expert layer, made on `device`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    num_global_experts = num_global_experts or num_experts + expert_offset
    candidates = used_experts if used_experts is not None else list(range(num_global_experts))
    hidden = torch.randn(num_tokens, hidden_size, generator=generator, device=device)
    w13 = torch.randn(num_experts, 2 * inter_size, hidden_size, generator=generator, device=device) / hidden_size**0.5
    w2 = torch.randn(num_experts, hidden_size, inter_size, generator=generator, device=device) / inter_size**0.5
    topk_ids = random_topk_ids(num_tokens, top_k, candidates, generator, device)
    topk_weights = torch.rand(num_tokens, top_k, generator=generator, device=device)
    local = (topk_ids >= expert_offset) & (topk_ids < expert_offset + num_experts)
    # Slots another rank owns must not be read at all: their weights are NaN.
    topk_weights = torch.where(local, topk_weights, torch.full_like(topk_weights, float("nan")))
    return {
        "hidden": hidden.to(dtype),
        "w13": w13.to(dtype),
        "w2": w2.to(dtype),
        "topk_weights": topk_weights.to(dtype),
        "topk_ids": topk_ids.to(ids_dtype).contiguous(),
    }


def run_fused_moe_case(
    *,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    inter_size: int,
    dtype: str = "float32",
    device: str = "cpu",
    config: dict[str, Any] | None = None,
    expert_offset: int = 0,
    num_global_experts: int | None = None,
    used_experts: list[int] | None = None,
    ids_dtype: str = "int64",
    poison: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """fused_moe vs fused_moe_ref (computed in float64 on CPU, float32 on GPU)."""
    inputs = make_moe_inputs(
        num_tokens=num_tokens,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden_size,
        inter_size=inter_size,
        dtype=getattr(torch, dtype),
        device=device,
        expert_offset=expert_offset,
        num_global_experts=num_global_experts,
        used_experts=used_experts,
        ids_dtype=getattr(torch, ids_dtype),
        seed=seed,
    )
    ref_dtype = torch.float64 if device == "cpu" else torch.float32
    reference = fused_moe_ref(
        inputs["hidden"].to(ref_dtype),
        inputs["w13"].to(ref_dtype),
        inputs["w2"].to(ref_dtype),
        inputs["topk_weights"].to(ref_dtype),
        inputs["topk_ids"],
        expert_offset=expert_offset,
    )
    hidden, w13, w2 = inputs["hidden"], inputs["w13"], inputs["w2"]
    if poison:
        hidden, w13, w2 = nan_padded(hidden, pad_first=0), nan_padded(w13), nan_padded(w2)
    out = fused_moe(
        hidden,
        w13,
        w2,
        inputs["topk_weights"],
        inputs["topk_ids"],
        expert_offset=expert_offset,
        config=config,
        scratch=poisoned_scratch if poison else empty_scratch,
    )
    out64 = out.to(ref_dtype)
    ref_norm = reference.norm().item()
    return {
        "shape": list(out.shape),
        "dtype": str(out.dtype),
        "finite": bool(torch.isfinite(out).all().item()),
        "rel_err": (out64 - reference).norm().item() / max(ref_norm, 1e-30),
        "ref_norm": ref_norm,
    }


def run_align_case(
    *,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    block_m: int,
    expert_offset: int = 0,
    num_global_experts: int | None = None,
    used_experts: list[int] | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """moe_align's layout, checked against a recount on the host; returns the block count used."""
    generator = torch.Generator(device=device).manual_seed(seed)
    num_global_experts = num_global_experts or num_experts + expert_offset
    candidates = used_experts if used_experts is not None else list(range(num_global_experts))
    topk_ids = random_topk_ids(num_tokens, top_k, candidates, generator, device)
    align = moe_align(topk_ids, num_experts, block_m, expert_offset=expert_offset, scratch=poisoned_scratch)
    num_pairs = topk_ids.numel()
    local = (topk_ids.flatten() - expert_offset).tolist()
    sorted_pairs = align.sorted_pairs.cpu().tolist()
    block_expert = align.block_expert.cpu().tolist()

    pairs_of = [[p for p in range(num_pairs) if local[p] == e] for e in range(num_experts)]  # in pair order
    used_blocks = sum(-(-len(pairs) // block_m) for pairs in pairs_of)
    assert block_expert[:used_blocks] == sorted(block_expert[:used_blocks]), block_expert
    assert all(b == -1 for b in block_expert[used_blocks:]), block_expert
    rows_of: list[list[int]] = [[] for _ in range(num_experts)]
    for b in range(used_blocks):
        assert 0 <= block_expert[b] < num_experts, (b, block_expert[b])
        rows_of[block_expert[b]] += sorted_pairs[b * block_m : (b + 1) * block_m]
    for e, pairs in enumerate(pairs_of):
        # the expert's pairs in their original order (a stable sort), then padding
        assert rows_of[e] == pairs + [num_pairs] * (len(rows_of[e]) - len(pairs)), (e, rows_of[e], pairs)
    return {"used_blocks": used_blocks, "num_blocks": align.num_blocks}


def run_route_case(
    *,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    with_bias: bool,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    splits: int | None = None,
) -> dict[str, Any]:
    """route vs route_ref: ids must match wherever the k-th and (k+1)-th scores are not a near tie."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator, device=device).to(getattr(torch, dtype))
    gate = torch.randn(num_experts, hidden_size, generator=generator, device=device) / hidden_size**0.25
    bias = torch.rand(num_experts, generator=generator, device=device) * 0.1 if with_bias else None
    weights, ids = route(hidden, gate, bias, top_k, splits=splits)
    ref_weights, ref_ids = route_ref(hidden, gate, bias, top_k)
    # near ties may legitimately pick differently: compare those tokens' sets of scores only
    scores = torch.softmax(hidden.float() @ gate.float().T, dim=-1) + (0 if bias is None else bias)
    sorted_scores = scores.sort(dim=-1, descending=True).values
    gap = (sorted_scores[:, top_k - 1] - sorted_scores[:, top_k]) if top_k < num_experts else None
    clear = torch.ones(num_tokens, dtype=torch.bool, device=device) if gap is None else gap > 1e-5
    return {
        "ids_dtype": str(ids.dtype),
        "ids_equal": bool((ids == ref_ids)[clear].all().item()),
        "num_clear": int(clear.sum().item()),
        "max_weight_err": (weights.float() - ref_weights.float())[clear].abs().max().item() if clear.any() else 0.0,
    }
