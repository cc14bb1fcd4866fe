"""The paged KV pool: one tensor `kv[L, 2, N, B, Hkv, D]` (see engine/attention.py for the layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import CacheConfig, ModelConfig

# Without a measured budget (CPU), the pool defaults to this many tokens' worth of blocks.
DEFAULT_CPU_KV_TOKENS = 16384
# Headroom left for activations when sizing the pool from free GPU memory.
CUDA_ACTIVATION_RESERVE_BYTES = 2 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def layout(self) -> str:
        return "L2NBHD"


def plan_num_blocks(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> int:
    """How many blocks the pool gets: the configured number, or what free memory allows."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = model.num_hidden_layers * 2 * cache.block_size * model.num_key_value_heads * model.head_dim
    per_block *= dtype.itemsize
    if device.type != "cuda":
        return max(1, DEFAULT_CPU_KV_TOKENS // cache.block_size)
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * cache.gpu_memory_utilization) - (total - free) - CUDA_ACTIVATION_RESERVE_BYTES
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB "
            f"at gpu_memory_utilization={cache.gpu_memory_utilization}"
        )
    return int(num_blocks)


def allocate_kv_cache(spec: KVCacheSpec, device: torch.device) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype, device=device)
