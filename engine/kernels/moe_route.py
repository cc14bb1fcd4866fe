"""MoE router on Triton: the two-launch twin of `route_ref` (fp32 gate GEMM, softmax, top-k on the
bias-corrected scores, unbiased weights renormalised), instead of ~8 torch launches.

The gate GEMM is split over the hidden size (`_moe_route.py` has the map) so that a decode step's
few tokens still occupy the whole GPU: with one program per 16 tokens, a token's 40 chunks of H ran
on one SM, ~115 us a layer at one token on an H100, half of the decode step's GPU time.
"""

from __future__ import annotations

import torch
import triton

from engine.kernels._moe_route import _route_logits_kernel, _route_select_kernel
from engine.kernels.fused_moe import IS_INTERPRETED, SUPPORTED_DTYPES, num_sms

BLOCK_K = 64  # hidden-size chunk of one dot
PROGRAMS_PER_SM = 2  # split H until the logits grid fills every SM this many times over


def num_splits(num_token_blocks: int, hidden_size: int, max_programs: int) -> tuple[int, int]:
    """(splits of H, BLOCK_K chunks per split): about `max_programs` programs in all, each split a
    whole number of chunks, none empty, at least one. From shapes only (CUDA graphs)."""
    num_chunks = triton.cdiv(hidden_size, BLOCK_K)
    wanted = max(1, min(num_chunks, max_programs // max(num_token_blocks, 1)))
    chunks_per_split = triton.cdiv(num_chunks, wanted)
    return triton.cdiv(num_chunks, chunks_per_split), chunks_per_split


def route(
    hidden: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H], fp32 preferred
    correction_bias: torch.Tensor | None,  # [E] or None
    top_k: int,
    norm_min: float = 1e-12,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [T, K] in hidden's dtype, topk_ids [T, K] int64), like `route_ref`.

    Ties between equal scores go to the lower expert id; otherwise the choice equals the
    reference's up to fp32 rounding of the logits (accumulation order differs). `splits` caps the
    splits of H (tests and benchmarks; default: from the GPU's size).
    """
    if hidden.dim() != 2 or hidden.dtype not in SUPPORTED_DTYPES or hidden.stride(-1) != 1:
        raise ValueError(
            f"hidden must be [T, H] of {SUPPORTED_DTYPES}, contiguous in H; got shape {tuple(hidden.shape)}, "
            f"dtype {hidden.dtype}, strides {hidden.stride()}"
        )
    num_tokens, hidden_size = hidden.shape
    if gate_weight.dim() != 2 or gate_weight.shape[1] != hidden_size or gate_weight.stride(-1) != 1:
        raise ValueError(
            f"gate_weight must be [E, H={hidden_size}], contiguous in H; got shape {tuple(gate_weight.shape)}, "
            f"strides {gate_weight.stride()}"
        )
    if gate_weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gate_weight dtype must be one of {SUPPORTED_DTYPES}, got {gate_weight.dtype}")
    num_experts = gate_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}], got {top_k}")
    if correction_bias is not None:
        correction_bias = correction_bias.reshape(-1)
        if correction_bias.numel() != num_experts:
            raise ValueError(f"correction_bias must have E={num_experts} values, got {correction_bias.numel()}")
        correction_bias = correction_bias.float().contiguous()
    if hidden.device.type != "cuda" and not (IS_INTERPRETED and hidden.device.type == "cpu"):
        raise ValueError(f"route runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got {hidden.device}")
    if gate_weight.device != hidden.device:
        raise ValueError(f"gate_weight is on {gate_weight.device}, hidden on {hidden.device}")

    weights = torch.empty((num_tokens, top_k), dtype=hidden.dtype, device=hidden.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=hidden.device)
    if num_tokens == 0:
        return weights, ids
    block_t = 16 if num_tokens <= 16 or IS_INTERPRETED else 32
    num_token_blocks = triton.cdiv(num_tokens, block_t)
    if splits is None:
        max_programs = PROGRAMS_PER_SM * num_sms(hidden.device)
    elif isinstance(splits, int) and not isinstance(splits, bool) and splits >= 1:
        max_programs = splits * num_token_blocks
    else:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    split_count, chunks_per_split = num_splits(num_token_blocks, hidden_size, max_programs)
    e_pow2 = max(16, triton.next_power_of_2(num_experts))
    partial = torch.empty((split_count, num_tokens, e_pow2), dtype=torch.float32, device=hidden.device)
    _route_logits_kernel[(num_token_blocks, split_count)](
        hidden,
        gate_weight,
        partial,
        num_tokens,
        num_experts,
        hidden_size,
        hidden.stride(0),
        gate_weight.stride(0),
        chunks_per_split,
        BLOCK_T=block_t,
        E_POW2=e_pow2,
        BLOCK_K=BLOCK_K,
        BF16X3=hidden.dtype == torch.bfloat16 and not IS_INTERPRETED,
        num_warps=4,
    )
    _route_select_kernel[(num_token_blocks,)](
        partial,
        correction_bias if correction_bias is not None else partial,
        weights,
        ids,
        num_tokens,
        num_experts,
        split_count,
        norm_min,
        TOP_K=top_k,
        K_POW2=triton.next_power_of_2(top_k),
        HAS_BIAS=correction_bias is not None,
        BLOCK_T=block_t,
        E_POW2=e_pow2,
        num_warps=4,
    )
    return weights, ids
