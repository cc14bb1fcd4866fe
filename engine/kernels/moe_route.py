"""MoE router on Triton: the one-launch twin of `route_ref` (fp32 gate GEMM, softmax, top-k on the
bias-corrected scores, unbiased weights renormalised). One kernel instead of ~8 torch launches.
"""

from __future__ import annotations

import torch
import triton

from engine.kernels._moe_route import _route_kernel
from engine.kernels.fused_moe import IS_INTERPRETED, SUPPORTED_DTYPES


def route(
    hidden: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H], fp32 preferred
    correction_bias: torch.Tensor | None,  # [E] or None
    top_k: int,
    norm_min: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [T, K] in hidden's dtype, topk_ids [T, K] int64), like `route_ref`.

    Ties between equal scores go to the lower expert id; otherwise the choice equals the
    reference's up to fp32 rounding of the logits (accumulation order differs).
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
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        hidden,
        gate_weight,
        correction_bias if correction_bias is not None else weights,
        weights,
        ids,
        num_tokens,
        num_experts,
        hidden_size,
        hidden.stride(0),
        gate_weight.stride(0),
        norm_min,
        TOP_K=top_k,
        K_POW2=triton.next_power_of_2(top_k),
        HAS_BIAS=correction_bias is not None,
        BLOCK_T=block_t,
        E_POW2=max(16, triton.next_power_of_2(num_experts)),
        BLOCK_K=64,
        num_warps=4,
    )
    return weights, ids
