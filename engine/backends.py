"""Which compute functions the model runs: the torch references or the Triton kernels.

auto    Triton kernels on CUDA, the torch references elsewhere (the CPU default)
torch   the references (`engine.kernels.fused_moe_ref`, `engine.attention.paged_attention_ref`,
        `engine.kernels.norm_rope_ref`), any device
triton  the Triton kernels: routing (`engine.kernels.moe_route`), experts (`engine.kernels.fused_moe`),
        attention (`engine.kernels.paged_attention`: the split-KV decode kernel, SDPA for
        prefill), the residual add + RMSNorm and RoPE + KV write (`engine.kernels.norm_rope`: one
        kernel each); on CPU only under Triton's interpreter (TRITON_INTERPRET=1 set before triton
        is imported)
"""

from __future__ import annotations

import torch

from engine.models.ernie4_5_moe import ModelBackends

MOE_BACKENDS = ("auto", "torch", "triton")


def model_backends(moe_backend: str, device: torch.device | str) -> ModelBackends:
    if moe_backend not in MOE_BACKENDS:
        raise ValueError(f"moe_backend must be one of {', '.join(MOE_BACKENDS)}, got {moe_backend!r}")
    device = torch.device(device)
    if moe_backend == "auto":
        moe_backend = "triton" if device.type == "cuda" else "torch"
    if moe_backend == "torch":
        return ModelBackends()
    from engine.kernels.fused_moe import fused_moe
    from engine.kernels.moe_route import route
    from engine.kernels.norm_rope import fused_add_rms_norm, rope_and_write_kv
    from engine.kernels.paged_attention import paged_attention

    return ModelBackends(
        route=route,
        experts=fused_moe,
        attention=paged_attention,
        norm=fused_add_rms_norm,
        rope_write_kv=rope_and_write_kv,
    )
