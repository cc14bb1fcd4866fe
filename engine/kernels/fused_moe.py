"""Fused routed-expert MoE on Triton: the fast twin of `fused_moe_ref` (same contract).

    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x_t) * (w13[e, I:] @ x_t)),
             e = topk_ids[t, j] - expert_offset, summed over the slots j whose e lies in [0, E)

Two launch plans compute it (kernels in `_fused_moe.py`):

* ``pairs`` (decode-sized batches): no sort, no padding. A GEMV per (pair, N-tile) for gate/up +
  SiLU-and-mul, then either one program per (token, N-tile) that runs the down projection of all
  the token's slots and adds them in registers (combine="fused": two launches), or a down GEMV per
  (pair, N-tile) and the sum kernel (combine="sum": more programs in flight for tiny T). Weight
  streaming is spread over the whole chip by the N split; pairs that share an expert read its
  tiles together, so L2 absorbs the repeats.
* ``grouped`` (prefill-sized batches): `moe_align` sorts pairs by expert into M-blocks on the GPU,
  then grouped tensor-core GEMMs: gate/up with SiLU-and-mul in the epilogue, down with the routing
  weight in the epilogue; then a deterministic top-k sum (or fp32 atomics, `combine="atomic"`).

The launch plan and block sizes come from a `FusedMoeConfig`: passed in, or looked up in the tuned
JSON for this GPU (`configs/fused_moe_<gpu>.json`, written by `load_tests/kernels/bench_fused_moe.py
--tune`), by shape and the nearest tuned token count; else a built-in default. Nothing here syncs
with the host, so the whole layer can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from engine.kernels._fused_moe import (
    _down_grouped_kernel,
    _down_pair_rows_kernel,
    _down_pairs_kernel,
    _gate_up_grouped_kernel,
    _gate_up_pairs_kernel,
    _sum_topk_kernel,
)
from engine.kernels.moe_align import MoeAlignment, ScratchAllocator, empty_scratch, moe_align

CONFIG_DIR = Path(__file__).parent / "configs"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_PATHS = ("pairs", "grouped")
_COMBINES = ("sum", "atomic", "fused")

# Under TRITON_INTERPRET=1 the decorator returns an interpreter object instead of a JITFunction.
IS_INTERPRETED = not isinstance(_gate_up_pairs_kernel, triton.runtime.JITFunction)
INTERPRETER_SMS = 2  # the interpreter pays per program: kernels that split by SM count split little


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (INTERPRETER_SMS off CUDA): what split counts are sized by."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class FusedMoeConfig:
    """Launch plan and tile sizes; validated at construction (errors name the value).

    `up_*` configure the gate/up kernel, `down_*` the down kernel; `block_m` and `*_group_m` matter
    on the grouped path only. `combine` says how each token's K expert outputs are added:
    "sum" -- weighted rows per pair, then a deterministic sum kernel (either path);
    "atomic" -- fp32 atomics from the down GEMM's epilogue (grouped path; order varies run to run);
    "fused" -- the down kernel loops over a token's slots in registers (pairs path; one launch less).
    `tma` loads the grouped GEMMs' weights (and the down GEMM's activations) through TMA descriptors
    (Hopper and later; ignored where the layout does not allow it).
    """

    path: str = "grouped"
    block_m: int = 64
    up_block_n: int = 64
    up_block_k: int = 64
    up_group_m: int = 8
    up_warps: int = 4
    up_stages: int = 3
    down_block_n: int = 64
    down_block_k: int = 64
    down_group_m: int = 8
    down_warps: int = 4
    down_stages: int = 3
    combine: str = "sum"
    tma: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tma, bool):
            raise ValueError(f"FusedMoeConfig.tma must be a bool, got {self.tma!r}")
        if self.path not in _PATHS:
            raise ValueError(f"FusedMoeConfig.path must be one of {_PATHS}, got {self.path!r}")
        if self.combine not in _COMBINES:
            raise ValueError(f"FusedMoeConfig.combine must be one of {_COMBINES}, got {self.combine!r}")
        if (self.path, self.combine) in (("pairs", "atomic"), ("grouped", "fused")):
            raise ValueError(f"FusedMoeConfig.combine={self.combine!r} is not available on the {self.path!r} path")
        for name in ("block_m", "up_block_n", "up_block_k", "down_block_n", "down_block_k", "up_warps", "down_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"FusedMoeConfig.{name} must be a power of two, got {value!r}")
        for name in ("up_group_m", "down_group_m", "up_stages", "down_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FusedMoeConfig.{name} must be a positive integer, got {value!r}")
        if self.path == "grouped":
            for name in ("block_m", "up_block_n", "up_block_k", "down_block_n", "down_block_k"):
                if getattr(self, name) < 16:
                    raise ValueError(
                        f"FusedMoeConfig.{name} must be >= 16 on the grouped path, got {getattr(self, name)}"
                    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FusedMoeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FusedMoeConfig keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# config lookup
# ----------------------------------------------------------------------------------------------


def device_config_name(device_name: str) -> str:
    """File name of the tuned configs for a GPU, e.g. 'fused_moe_NVIDIA_H100_80GB_HBM3.json'."""
    return "fused_moe_" + "".join(c if c.isalnum() else "_" for c in device_name) + ".json"


def shape_key(hidden_size: int, inter_size: int, dtype: torch.dtype) -> str:
    return f"H={hidden_size},I={inter_size},dtype={str(dtype).removeprefix('torch.')}"


@functools.cache
def _tuned_table(device_name: str) -> dict[str, dict[int, FusedMoeConfig]]:
    """{shape_key: {num_tokens: config}} from this GPU's JSON, or {} when there is none."""
    path = CONFIG_DIR / device_config_name(device_name)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {
        key: {int(num_tokens): FusedMoeConfig.from_dict(cfg) for num_tokens, cfg in buckets.items()}
        for key, buckets in data["configs"].items()
    }


# Shared memory a default config may plan for: under every supported GPU's per-block limit
# (A100 164 KiB, H100/H200 227 KiB). Tuned configs were measured on their GPU and are used as they are.
DEFAULT_SHARED_MEMORY_BYTES = 160 * 1024


def grouped_shared_memory(cfg: FusedMoeConfig, itemsize: int) -> int:
    """Bytes of shared memory the grouped GEMMs pipeline (per stage: an activation tile and the
    weight tiles; gate+up loads two weight tiles), the larger of the two kernels."""
    up = cfg.up_stages * (cfg.block_m * cfg.up_block_k + 2 * cfg.up_block_n * cfg.up_block_k) * itemsize
    down = cfg.down_stages * (cfg.block_m * cfg.down_block_k + cfg.down_block_n * cfg.down_block_k) * itemsize
    return max(up, down)


def fit_shared_memory(cfg: FusedMoeConfig, itemsize: int, budget: int = DEFAULT_SHARED_MEMORY_BYTES) -> FusedMoeConfig:
    """Fewer stages, then narrower N tiles, then shorter K tiles, until the grouped GEMMs fit `budget`."""
    while grouped_shared_memory(cfg, itemsize) > budget:
        if cfg.up_stages > 2 or cfg.down_stages > 2:
            cfg = dataclasses.replace(cfg, up_stages=min(cfg.up_stages, 2), down_stages=min(cfg.down_stages, 2))
        elif cfg.up_block_n > 32:
            cfg = dataclasses.replace(cfg, up_block_n=cfg.up_block_n // 2, down_block_n=cfg.down_block_n // 2)
        elif cfg.up_block_k > 32:
            cfg = dataclasses.replace(cfg, up_block_k=cfg.up_block_k // 2, down_block_k=cfg.down_block_k // 2)
        else:
            break
    return cfg


def default_config(
    num_tokens: int, num_experts: int, top_k: int, *, interpreted: bool = False, itemsize: int = 2
) -> FusedMoeConfig:
    """Config for GPUs (or shapes) without tuned entries, and for the CPU interpreter."""
    if interpreted:  # few, large programs: the interpreter pays per program and per op
        if num_tokens <= 8:
            return FusedMoeConfig(
                path="pairs", combine="fused", up_block_n=32, up_block_k=32, down_block_n=32, down_block_k=32
            )
        return FusedMoeConfig(block_m=16, up_block_n=32, up_block_k=32, down_block_n=32, down_block_k=32)
    if num_tokens <= 8:
        return FusedMoeConfig(
            path="pairs",
            combine="sum" if num_tokens <= 2 else "fused",
            up_block_n=8,
            up_block_k=256,
            up_warps=4,
            down_block_n=8,
            down_block_k=256,
            down_warps=4,
        )
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        block_m, warps, block_n, stages = 16, 4, 64, 4
    elif rows_per_expert <= 32:
        block_m, warps, block_n, stages = 32, 4, 64, 4
    elif rows_per_expert <= 96:
        block_m, warps, block_n, stages = 64, 4, 128, 4
    else:
        block_m, warps, block_n, stages = 128, 8, 128, 3
    config = FusedMoeConfig(
        block_m=block_m,
        up_block_n=block_n,
        up_block_k=64,
        up_warps=warps,
        up_stages=stages,
        down_block_n=block_n,
        down_block_k=64,
        down_warps=warps,
        down_stages=stages,
    )
    return fit_shared_memory(config, itemsize)


@functools.lru_cache(maxsize=4096)
def get_config(
    num_tokens: int,
    hidden_size: int,
    inter_size: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device_name: str,
) -> FusedMoeConfig:
    """Tuned config for the token count nearest (in log2) to `num_tokens`, else the default."""
    if device_name == "interpreter":
        return default_config(num_tokens, num_experts, top_k, interpreted=True)
    buckets = _tuned_table(device_name).get(shape_key(hidden_size, inter_size, dtype))
    if not buckets:
        return default_config(num_tokens, num_experts, top_k, itemsize=dtype.itemsize)
    nearest = min(buckets, key=lambda n: (abs(math.log2(n) - math.log2(max(num_tokens, 1))), n))
    return buckets[nearest]


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    return "interpreter" if device.type == "cpu" else torch.cuda.get_device_name(device)


# ----------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------


def _check_inputs(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int,
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hidden dtype must be one of {SUPPORTED_DTYPES}, got {hidden.dtype}")
    num_tokens, hidden_size = hidden.shape
    if w13.dim() != 3 or w13.shape[2] != hidden_size or w13.shape[1] % 2:
        raise ValueError(f"w13 must be [E, 2*I, H={hidden_size}], got shape {tuple(w13.shape)}")
    num_experts, inter_size = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (num_experts, hidden_size, inter_size):
        raise ValueError(
            f"w2 must be [E={num_experts}, H={hidden_size}, I={inter_size}] to match w13 {tuple(w13.shape)}, "
            f"got shape {tuple(w2.shape)}"
        )
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise TypeError(f"w13 and w2 must have hidden's dtype {hidden.dtype}, got {w13.dtype} and {w2.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [T={num_tokens}, K], got shape {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights shape {tuple(topk_weights.shape)} must equal topk_ids shape {tuple(topk_ids.shape)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids dtype must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"topk_weights dtype must be one of {SUPPORTED_DTYPES}, got {topk_weights.dtype}")
    for name, tensor in (("hidden", hidden), ("w13", w13), ("w2", w2)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")
    if hidden.stride(0) < hidden_size and num_tokens > 1:
        raise ValueError(f"hidden rows overlap: row stride {hidden.stride(0)} < H={hidden_size}")
    for name, tensor in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")
    if not isinstance(expert_offset, int) or expert_offset < 0:
        raise ValueError(f"expert_offset must be a non-negative int, got {expert_offset!r}")
    devices = {t.device for t in (hidden, w13, w2, topk_weights, topk_ids)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if hidden.device.type != "cuda" and not (IS_INTERPRETED and hidden.device.type == "cpu"):
        raise ValueError(f"fused_moe runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got {hidden.device}")


def _tma_view(tensor: torch.Tensor, block_rows: int, block_cols: int) -> TensorDescriptor | None:
    """TMA descriptor of a [E, R, C] (or [R, C]) tensor seen as [E * R, C], or None when TMA cannot
    address it (experts not evenly spaced, or addresses/strides not 16-byte aligned)."""
    rows, cols = tensor.shape[-2], tensor.shape[-1]
    row_stride = tensor.stride(-2)
    num_rows = tensor.numel() // cols
    itemsize = tensor.element_size()
    if tensor.dim() == 3 and tensor.stride(0) != rows * row_stride:
        return None
    if tensor.data_ptr() % 16 or (row_stride * itemsize) % 16 or num_rows == 0:
        return None
    view = tensor.as_strided((num_rows, cols), (row_stride, 1))
    return TensorDescriptor(view, [num_rows, cols], [row_stride, 1], [block_rows, block_cols])


# ----------------------------------------------------------------------------------------------
# stages (fused_moe runs them in order; the tuner times them one by one)
# ----------------------------------------------------------------------------------------------


def pairs_gate_up(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    topk_ids: torch.Tensor,
    act: torch.Tensor,
    *,
    expert_offset: int,
    cfg: FusedMoeConfig,
) -> None:
    """act[p] = silu(x_t @ gate_e.T) * (x_t @ up_e.T) for each local pair p = t * K + j; act is [P, I]."""
    num_pairs, inter_size = act.shape
    _gate_up_pairs_kernel[(num_pairs, triton.cdiv(inter_size, cfg.up_block_n))](
        hidden,
        w13,
        topk_ids,
        act,
        num_pairs,
        topk_ids.shape[1],
        w13.shape[0],
        expert_offset,
        inter_size,
        hidden.shape[1],
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        BLOCK_N=cfg.up_block_n,
        BLOCK_K=cfg.up_block_k,
        EVEN_N=inter_size % cfg.up_block_n == 0,
        EVEN_K=hidden.shape[1] % cfg.up_block_k == 0,
        num_warps=cfg.up_warps,
        num_stages=cfg.up_stages,
    )


def pairs_down_fused(
    act: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor,
    *,
    expert_offset: int,
    cfg: FusedMoeConfig,
) -> None:
    """out[t] = sum_j w[t, j] * act[t*K + j] @ w2[e].T over the token's local slots; out is [T, H]."""
    num_tokens, hidden_size = out.shape
    inter_size = act.shape[1]
    _down_pairs_kernel[(num_tokens, triton.cdiv(hidden_size, cfg.down_block_n))](
        act,
        w2,
        topk_ids,
        topk_weights,
        out,
        num_tokens,
        topk_ids.shape[1],
        w2.shape[0],
        expert_offset,
        hidden_size,
        inter_size,
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        BLOCK_N=cfg.down_block_n,
        BLOCK_K=cfg.down_block_k,
        EVEN_N=hidden_size % cfg.down_block_n == 0,
        EVEN_K=inter_size % cfg.down_block_k == 0,
        num_warps=cfg.down_warps,
        num_stages=cfg.down_stages,
    )


def pairs_down_rows(
    act: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    pair_out: torch.Tensor,
    *,
    expert_offset: int,
    cfg: FusedMoeConfig,
) -> None:
    """pair_out[p] = w[p] * act[p] @ w2[e_p].T for each local pair; pair_out is [P, H]."""
    num_pairs, hidden_size = pair_out.shape
    inter_size = act.shape[1]
    _down_pair_rows_kernel[(num_pairs, triton.cdiv(hidden_size, cfg.down_block_n))](
        act,
        w2,
        topk_ids,
        topk_weights,
        pair_out,
        num_pairs,
        w2.shape[0],
        expert_offset,
        hidden_size,
        inter_size,
        w2.stride(0),
        w2.stride(1),
        BLOCK_N=cfg.down_block_n,
        BLOCK_K=cfg.down_block_k,
        EVEN_N=hidden_size % cfg.down_block_n == 0,
        EVEN_K=inter_size % cfg.down_block_k == 0,
        num_warps=cfg.down_warps,
        num_stages=cfg.down_stages,
    )


def grouped_gate_up(
    hidden: torch.Tensor, w13: torch.Tensor, align: MoeAlignment, act: torch.Tensor, *, top_k: int, cfg: FusedMoeConfig
) -> None:
    """act[r] = silu(x @ gate.T) * (x @ up.T) for each sorted row r of `align`; act is [R, I]."""
    inter_size = act.shape[1]
    w13_desc = _tma_view(w13, cfg.up_block_n, cfg.up_block_k) if cfg.tma else None
    _gate_up_grouped_kernel[(align.num_blocks * triton.cdiv(inter_size, cfg.up_block_n),)](
        hidden,
        w13,
        w13_desc,
        align.sorted_pairs,
        align.block_expert,
        act,
        align.num_pairs,
        align.num_blocks,
        cfg.up_group_m,
        top_k,
        inter_size,
        hidden.shape[1],
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        BLOCK_M=align.block_m,
        BLOCK_N=cfg.up_block_n,
        BLOCK_K=cfg.up_block_k,
        EVEN_K=hidden.shape[1] % cfg.up_block_k == 0,
        USE_TMA=w13_desc is not None,
        num_warps=cfg.up_warps,
        num_stages=cfg.up_stages,
    )


def grouped_down(
    act: torch.Tensor,
    w2: torch.Tensor,
    align: MoeAlignment,
    topk_weights: torch.Tensor,
    down_out: torch.Tensor,
    *,
    top_k: int,
    cfg: FusedMoeConfig,
) -> None:
    """Down GEMM over the sorted rows, routing weight applied. combine="atomic": down_out is a zeroed
    [T, H] fp32 buffer the rows are added into; else [P, H] with one weighted row per pair."""
    hidden_size, inter_size = w2.shape[1], w2.shape[2]
    act_desc = w2_desc = None
    if cfg.tma:
        act_desc = _tma_view(act, align.block_m, cfg.down_block_k)
        w2_desc = _tma_view(w2, cfg.down_block_n, cfg.down_block_k)
        if act_desc is None or w2_desc is None:
            act_desc = w2_desc = None
    _down_grouped_kernel[(align.num_blocks * triton.cdiv(hidden_size, cfg.down_block_n),)](
        act,
        w2,
        act_desc,
        w2_desc,
        align.sorted_pairs,
        align.block_expert,
        topk_weights,
        down_out,
        align.num_pairs,
        align.num_blocks,
        cfg.down_group_m,
        top_k,
        hidden_size,
        inter_size,
        w2.stride(0),
        w2.stride(1),
        BLOCK_M=align.block_m,
        BLOCK_N=cfg.down_block_n,
        BLOCK_K=cfg.down_block_k,
        EVEN_K=inter_size % cfg.down_block_k == 0,
        ATOMIC=cfg.combine == "atomic",
        USE_TMA=w2_desc is not None,
        num_warps=cfg.down_warps,
        num_stages=cfg.down_stages,
    )


def sum_topk(
    pair_out: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor, *, num_experts: int, expert_offset: int
) -> None:
    """out[t] = sum over the token's local slots j of pair_out[t * K + j], in slot order."""
    num_tokens, hidden_size = out.shape
    # The interpreter pays per program: give it few, large tiles.
    block_t = 64 if IS_INTERPRETED else 4
    block_h = triton.next_power_of_2(hidden_size) if IS_INTERPRETED else 512
    _sum_topk_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden_size, block_h))](
        pair_out,
        topk_ids,
        out,
        num_tokens,
        num_experts,
        expert_offset,
        hidden_size,
        out.stride(0),
        TOP_K=topk_ids.shape[1],
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------


def fused_moe(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2*I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K] int32/int64
    *,
    expert_offset: int = 0,
    config: dict[str, Any] | FusedMoeConfig | None = None,
    scratch: ScratchAllocator = empty_scratch,
) -> torch.Tensor:
    """Routed experts of one MoE layer; returns [T, H] in hidden's dtype (contract of `fused_moe_ref`).

    Ids outside [expert_offset, expert_offset + E) contribute nothing (another EP rank adds them).
    `config` overrides the tuned launch config; `scratch` allocates every intermediate and the
    output (tests pass one that fills them with poison). Accumulates in fp32; deterministic unless
    the config says combine="atomic".
    """
    _check_inputs(hidden, w13, w2, topk_weights, topk_ids, expert_offset)
    num_tokens, hidden_size = hidden.shape
    num_experts, inter_size = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    device, dtype = hidden.device, hidden.dtype
    if num_tokens == 0 or top_k == 0:
        return torch.zeros_like(hidden, memory_format=torch.contiguous_format)
    if config is None:
        cfg = get_config(num_tokens, hidden_size, inter_size, num_experts, top_k, dtype, _device_name(device))
    elif isinstance(config, FusedMoeConfig):
        cfg = config
    else:
        cfg = FusedMoeConfig.from_dict(config)

    num_pairs = num_tokens * top_k
    out = scratch((num_tokens, hidden_size), dtype, device)
    if cfg.path == "pairs":
        act = scratch((num_pairs, inter_size), dtype, device)
        pairs_gate_up(hidden, w13, topk_ids, act, expert_offset=expert_offset, cfg=cfg)
        if cfg.combine == "fused":
            pairs_down_fused(act, w2, topk_ids, topk_weights, out, expert_offset=expert_offset, cfg=cfg)
            return out
        pair_out = scratch((num_pairs, hidden_size), dtype, device)
        pairs_down_rows(act, w2, topk_ids, topk_weights, pair_out, expert_offset=expert_offset, cfg=cfg)
        sum_topk(pair_out, topk_ids, out, num_experts=num_experts, expert_offset=expert_offset)
        return out

    align = moe_align(topk_ids, num_experts, cfg.block_m, expert_offset=expert_offset, scratch=scratch)
    act = scratch((align.num_blocks * cfg.block_m, inter_size), dtype, device)
    grouped_gate_up(hidden, w13, align, act, top_k=top_k, cfg=cfg)
    if cfg.combine == "atomic":
        acc = torch.zeros((num_tokens, hidden_size), dtype=torch.float32, device=device)
        grouped_down(act, w2, align, topk_weights, acc, top_k=top_k, cfg=cfg)
        out.copy_(acc)
        return out
    pair_out = scratch((num_pairs, hidden_size), dtype, device)
    grouped_down(act, w2, align, topk_weights, pair_out, top_k=top_k, cfg=cfg)
    sum_topk(pair_out, topk_ids, out, num_experts=num_experts, expert_offset=expert_offset)
    return out
