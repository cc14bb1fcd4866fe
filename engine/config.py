"""Frozen, validated configuration dataclasses for the engine.

`ModelConfig` mirrors the fields of a Hugging Face `config.json` for `ernie4_5_moe` that the
architecture needs; `CacheConfig` and `SchedulerConfig` are engine settings. Each validates once,
at construction, and raises `ConfigError` naming the bad value. Facts found at start-up (KV
capacity, EOS ids) live in `engine.runtime.RuntimeInfo`, never here.

This module is torch-free so the scheduler, the block manager and the router can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("ernie4_5_moe",)
# Random-weight presets (defined in engine.presets; named here so torch-free code can know them).
PRESET_NAMES = ("tiny", "ernie-4.5-21b-a3b")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an ERNIE-4.5 MoE text model (the fields transformers' config carries)."""

    vocab_size: int = 103424
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = True
    use_bias: bool = False
    moe_intermediate_size: int = 1536
    moe_k: int = 6
    moe_num_experts: int = 64
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1: the last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = 0
    model_type: str = "ernie4_5_moe"
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _require(
            self.model_type in SUPPORTED_MODEL_TYPES,
            f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "moe_layer_interval",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})",
        )
        _require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        _require(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _require(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        if self.moe_num_experts > 0:
            _require(
                0 < self.moe_k <= self.moe_num_experts,
                f"moe_k ({self.moe_k}) must be in [1, moe_num_experts={self.moe_num_experts}]",
            )
            _require(
                self.moe_intermediate_size > 0,
                f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}",
            )
        _require(self.moe_num_shared_experts >= 0, "moe_num_shared_experts must be >= 0")
        _require(
            self.dtype in ("float32", "float16", "bfloat16"),
            f"dtype {self.dtype!r} is not one of float32, float16, bfloat16",
        )
        for token_id in self.eos_token_ids:
            _require(0 <= token_id < self.vocab_size, f"eos token id {token_id} outside the vocabulary")

    @property
    def last_moe_layer(self) -> int:
        return self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The same rule as transformers' `Ernie4_5_MoeDecoderLayer`."""
        return (
            self.moe_num_experts > 0
            and (layer_idx + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= layer_idx <= self.last_moe_layer
        )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def kv_bytes_per_token(self) -> int:
        itemsize = 4 if self.dtype == "float32" else 2
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * itemsize

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], dtype: str | None = None) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict; raises ConfigError on bad or missing fields."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default')")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 500000.0))
        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        num_heads = raw.get("num_attention_heads", 20)
        hidden = raw.get("hidden_size", 2560)
        head_dim = raw.get("head_dim") or (hidden // num_heads if isinstance(num_heads, int) and num_heads else 0)
        fields: dict[str, Any] = {
            "vocab_size": raw.get("vocab_size", 103424),
            "hidden_size": hidden,
            "intermediate_size": raw.get("intermediate_size", 12288),
            "num_hidden_layers": raw.get("num_hidden_layers", 28),
            "num_attention_heads": num_heads,
            "num_key_value_heads": raw.get("num_key_value_heads") or num_heads,
            "head_dim": head_dim,
            "hidden_act": raw.get("hidden_act", "silu"),
            "max_position_embeddings": raw.get("max_position_embeddings", 131072),
            "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-5)),
            "rope_theta": float(rope_theta),
            "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),
            "use_bias": bool(raw.get("use_bias", False)),
            "moe_intermediate_size": raw.get("moe_intermediate_size", 1536),
            "moe_k": raw.get("moe_k", 6),
            "moe_num_experts": raw.get("moe_num_experts", 64),
            "moe_num_shared_experts": raw.get("moe_num_shared_experts", 2) or 0,
            "moe_layer_start_index": raw.get("moe_layer_start_index", 1),
            "moe_layer_end_index": raw.get("moe_layer_end_index", -1),
            "moe_layer_interval": raw.get("moe_layer_interval", 1),
            "moe_norm_min": float(raw.get("moe_norm_min", 1e-12)),
            "bos_token_id": raw.get("bos_token_id", 1),
            "eos_token_ids": eos_ids,
            "pad_token_id": raw.get("pad_token_id", 0),
            "model_type": model_type,
            "dtype": dtype or _normalise_dtype(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
        }
        for key in ("moe_num_experts", "moe_k", "moe_layer_start_index", "moe_layer_end_index"):
            if isinstance(fields[key], list):  # VL configs carry [text, vision] pairs
                raise ConfigError(f"{key}={fields[key]!r}: per-modality values belong to the VL model")
        try:
            return cls(**fields)
        except TypeError as exc:  # a wrong JSON type, e.g. a string where an int belongs
            raise ConfigError(f"malformed config.json: {exc}") from exc

    @classmethod
    def from_model_dir(cls, path: str | Path, dtype: str | None = None) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"no config.json in model folder {str(path)!r}")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed config.json in {str(path)!r}: {exc}") from exc
        return cls.from_hf_dict(raw, dtype=dtype)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers reads for this architecture."""
        return {
            "architectures": ["Ernie4_5_MoeForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_bias": self.use_bias,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_k": self.moe_k,
            "moe_num_experts": self.moe_num_experts,
            "moe_num_shared_experts": self.moe_num_shared_experts,
            "moe_layer_start_index": self.moe_layer_start_index,
            "moe_layer_end_index": self.last_moe_layer,
            "moe_layer_interval": self.moe_layer_interval,
            "moe_norm_min": self.moe_norm_min,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }


def _normalise_dtype(name: str) -> str:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = str(name).removeprefix("torch.")
    return aliases.get(name, name)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache settings. `num_blocks=None` sizes the pool from free memory at start-up."""

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(
            isinstance(self.block_size, int) and self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
            f"block_size must be a positive power of two, got {self.block_size!r}",
        )
        _require(
            self.num_blocks is None or (isinstance(self.num_blocks, int) and self.num_blocks > 0),
            f"num_blocks must be a positive integer or None, got {self.num_blocks!r}",
        )
        _require(
            0.0 < self.gpu_memory_utilization <= 1.0,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: tokens per step (the chunked-prefill budget) and sequences per step."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _require(
            isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens > 0,
            f"max_num_batched_tokens must be a positive integer, got {self.max_num_batched_tokens!r}",
        )
        _require(
            isinstance(self.max_num_seqs, int) and self.max_num_seqs > 0,
            f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}",
        )
        _require(
            self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len > 0),
            f"max_model_len must be a positive integer or None, got {self.max_model_len!r}",
        )


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs, validated together."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
    seed: int = 0
    moe_backend: str = "auto"  # auto (Triton on CUDA, torch elsewhere), torch, triton: see engine.backends
    # Decode steps replay CUDA graphs (engine.cuda_graph) on CUDA unless enforce_eager; batches of up
    # to cuda_graph_max_batch sequences (capped by max_num_seqs) are captured.
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 256

    def __post_init__(self) -> None:
        _require(
            isinstance(self.cuda_graph_max_batch, int) and self.cuda_graph_max_batch >= 1,
            f"cuda_graph_max_batch must be a positive integer, got {self.cuda_graph_max_batch!r}",
        )
        _require(
            self.moe_backend in ("auto", "torch", "triton"),
            f"moe_backend must be auto, torch or triton, got {self.moe_backend!r}",
        )
        _require(
            self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}",
        )
        max_len = self.scheduler.max_model_len
        _require(
            max_len is None or max_len <= self.model.max_position_embeddings,
            f"max_model_len {max_len} exceeds the model's max_position_embeddings {self.model.max_position_embeddings}",
        )
        if not self.scheduler.enable_chunked_prefill:
            _require(
                self.scheduler.max_num_batched_tokens >= self.max_model_len,
                f"without chunked prefill max_num_batched_tokens ({self.scheduler.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})",
            )

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len or self.model.max_position_embeddings
