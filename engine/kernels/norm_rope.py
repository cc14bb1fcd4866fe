"""The attention block's small ops fused into one Triton kernel each (kernels in `_norm_rope.py`,
contracts in `norm_rope_ref.py`):

* `fused_add_rms_norm` -- the residual add and the RMSNorm after it, one kernel instead of the
  ~8 elementwise and reduction kernels of the torch form; returns the normed rows and the new
  residual (`hidden, residual = norm(hidden, residual)` in the decoder).
* `rope_and_write_kv` -- RoPE on q and k straight out of the fused qkv projection, the rotated q
  returned and the rotated k plus v stored into the paged cache: one kernel instead of ~20 plus
  the two index copies. Takes the step's fp32 cos / sin tables (computed once per step and shared
  by every layer, as the model does), so 3D RoPE (the VL model) runs through it unchanged.

Both are CUDA-graph safe: the grids follow the shapes only and nothing reads a tensor back to the
host. The arithmetic is the reference's operation by operation (fp32 where it is fp32, rounded to
the model dtype where it is), launched without FMA contraction: the rope results and the residual
sums carry the reference's bits; the norm carries them whenever its sum of squares rounds alike
(the kernel's reduction order is not torch's, so a row may differ from it in the last place).
"""

from __future__ import annotations

import numpy as np
import torch
import triton

from engine.kernels._norm_rope import _fused_add_rms_norm_kernel, _rope_write_kv_kernel
from engine.kernels.fused_moe import IS_INTERPRETED, SUPPORTED_DTYPES

MAX_HIDDEN_SIZE = 16384  # a row lives in one program's registers
ROPE_TILE = 1024  # (head slots x pairs) per rope program


def _check_device(name: str, tensors: list[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    device = tensors[0].device
    if device.type != "cuda" and not (IS_INTERPRETED and device.type == "cpu"):
        raise ValueError(f"{name} runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got {device}")


def _check_norm_inputs(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    hidden_size = x.shape[1]
    if not 0 < hidden_size <= MAX_HIDDEN_SIZE:
        raise ValueError(f"hidden size must be in 1..{MAX_HIDDEN_SIZE}, got {hidden_size}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must be {tuple(x.shape)} {x.dtype} like x, got {tuple(residual.shape)} {residual.dtype}"
        )
    if weight.shape != (hidden_size,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{hidden_size}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    named = [("x", x), ("weight", weight)] + ([("residual", residual)] if residual is not None else [])
    for name, tensor in named:
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")
    _check_device("fused_add_rms_norm", [t for _, t in named])


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor | None,  # [T, H] or None
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed [T, H], new residual [T, H]): `fused_add_rms_norm_ref`'s contract in one launch.

    The new residual is x + residual rounded to x's dtype (x itself when residual is None: no
    copy); normed is the weight times its fp32 RMS normalisation cast back to x's dtype.
    """
    _check_norm_inputs(x, residual, weight, eps)
    num_tokens, hidden_size = x.shape
    out = torch.empty((num_tokens, hidden_size), dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty_like(out)
    if num_tokens == 0:
        return out, new_residual
    # torch's mean divides the sum by H on CPU and multiplies it by round(1 / H) on CUDA (ATen's
    # mean_kernel_cuda): the kernel does what the reference does on the same device
    divide = x.device.type == "cpu"
    block_h = triton.next_power_of_2(hidden_size)
    _fused_add_rms_norm_kernel[(num_tokens,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        new_residual,
        hidden_size,
        eps,
        float(hidden_size) if divide else float(np.float32(1.0) / np.float32(hidden_size)),
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        HAS_RESIDUAL=residual is not None,
        MEAN_BY_DIVISION=divide,
        BLOCK_H=block_h,
        num_warps=min(16, max(1, block_h // 512)),
        enable_fp_fusion=False,
    )
    return out, new_residual


def _rope_table(name: str, table: torch.Tensor, num_tokens: int, half_dim: int) -> torch.Tensor:
    """cos or sin as [T, D/2] (a view): the model's tables are [T, 1, D/2]."""
    if table.dim() == 3 and table.shape[1] == 1:
        table = table.squeeze(1)
    if table.shape != (num_tokens, half_dim):
        raise ValueError(f"{name} must be [T={num_tokens}, 1, D/2={half_dim}] or [T, D/2], got {tuple(table.shape)}")
    if table.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {table.dtype}")
    return table


def _check_rope_inputs(
    qkv: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    if num_q_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"head counts must be positive, got {num_q_heads} query and {num_kv_heads} KV heads")
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 2, got {head_dim}")
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(
            f"qkv must be [T, (Hq + 2 Hkv) D = ({num_q_heads} + 2 * {num_kv_heads}) * {head_dim} = {width}], "
            f"got shape {tuple(qkv.shape)}"
        )
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"qkv dtype must be one of {SUPPORTED_DTYPES}, got {qkv.dtype}")
    expected = (num_kv_heads, head_dim)
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2 or tuple(kv_layer.shape[3:]) != expected:
        raise ValueError(
            f"kv_layer must be [2, N, B, Hkv={num_kv_heads}, D={head_dim}], got shape {tuple(kv_layer.shape)}"
        )
    if kv_layer.dtype != qkv.dtype:
        raise TypeError(f"kv_layer dtype {kv_layer.dtype} must equal qkv dtype {qkv.dtype}")
    if slot_mapping.shape != (qkv.shape[0],):
        raise ValueError(f"slot_mapping must be [T={qkv.shape[0]}], got shape {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping dtype must be int32 or int64, got {slot_mapping.dtype}")
    for name, tensor in (("qkv", qkv), ("kv_layer", kv_layer)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")


def rope_and_write_kv(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) D]: q heads | k heads | v heads
    cos: torch.Tensor,  # [T, 1, D/2] or [T, D/2] fp32, any strides
    sin: torch.Tensor,  # like cos
    kv_layer: torch.Tensor,  # [2, N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Rotate q and k (interleaved pairs), store k and v into `kv_layer` at `slot_mapping` (side
    effect); returns the rotated q [T, Hq, D]. `rope_and_write_kv_ref`'s contract in one launch.

    The caller guarantees every slot lies in the pool (0 <= slot < N * B; not checked: that would
    read slot_mapping back) and that no two tokens share a slot.
    """
    _check_rope_inputs(qkv, kv_layer, slot_mapping, num_q_heads, num_kv_heads, head_dim)
    num_tokens = qkv.shape[0]
    half_dim = head_dim // 2
    cos = _rope_table("cos", cos, num_tokens, half_dim)
    sin = _rope_table("sin", sin, num_tokens, half_dim)
    _check_device("rope_and_write_kv", [qkv, cos, sin, kv_layer, slot_mapping])
    q = torch.empty((num_tokens, num_q_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    num_slots = num_q_heads + 2 * num_kv_heads
    heads = min(triton.next_power_of_2(num_slots), max(1, ROPE_TILE // half_dim))
    _rope_write_kv_kernel[(num_tokens, triton.cdiv(num_slots, heads))](
        qkv,
        cos,
        sin,
        slot_mapping,
        q,
        kv_layer,
        kv_layer.shape[2],
        qkv.stride(0),
        cos.stride(0),
        cos.stride(1),
        sin.stride(0),
        sin.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF_DIM=half_dim,
        HEADS=heads,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return q
