"""Plain-torch reference for the routed-expert part of an ERNIE-4.5 MoE layer.

This is the definition the Triton kernels are tested against, and the engine's CPU default.
It follows transformers' `Ernie4_5_MoeTopKRouter` and `Ernie4_5_MoeExperts` exactly:

    probs   = softmax(x.float() @ gate_w.float().T)                  # [T, E] fp32
    ids     = topk(probs + e_score_correction_bias, k).indices        # bias steers selection only
    weights = probs.gather(ids) / clamp(sum, norm_min)                # unbiased, renormalised
    out[t]  = sum_j weights[t, j] * down[ids[t, j]] @ (silu(g) * u)   # (g, u) = chunk(gate_up @ x, 2)

Expert weights use the fused layout: `w13 [E, 2*I, H]` (gate rows first, then up) and
`w2 [E, H, I]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_ref(
    hidden: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H], kept in fp32
    correction_bias: torch.Tensor | None,  # [E] fp32, or None
    top_k: int,
    norm_min: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [T, k] in hidden's dtype, topk_ids [T, k] int64)."""
    logits = F.linear(hidden.float(), gate_weight.float())
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    scores = probs if correction_bias is None else probs + correction_bias.float().reshape(-1)
    _, topk_ids = torch.topk(scores, top_k, dim=-1)
    topk_weights = probs.gather(-1, topk_ids)
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True).clamp(min=norm_min)
    return topk_weights.to(hidden.dtype), topk_ids


def fused_moe_ref(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2*I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k], values in [0, E) select an expert; others are skipped
    expert_offset: int = 0,
) -> torch.Tensor:
    """Sum over each token's chosen experts of weight * expert(x). Returns [T, H] in hidden's dtype.

    `expert_offset` lets an expert-parallel rank hold experts [offset, offset + E) only: ids outside
    that range contribute nothing here (another rank adds them).
    """
    num_experts = w13.shape[0]
    out = torch.zeros_like(hidden)
    local_ids = topk_ids - expert_offset
    for expert in torch.unique(local_ids).tolist():
        if not 0 <= expert < num_experts:
            continue
        token_idx, slot = torch.where(local_ids == expert)
        x = hidden[token_idx]
        gate, up = F.linear(x, w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        y = y * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
