"""Frozen, validated configuration dataclasses for the engine.

`ModelConfig` mirrors the fields of a Hugging Face `config.json` that the architecture needs:
`ernie4_5_moe` (the text model) or `ernie4_5_vl_moe` (ERNIE-4.5-VL: the same decoder with a vision
tower, vision experts, 3D RoPE and image token ids; `VisionConfig` holds the tower's shape);
`CacheConfig` and `SchedulerConfig` are engine settings. Each validates once,
at construction, and raises `ConfigError` naming the bad value. Facts found at start-up (KV
capacity, EOS ids) live in `engine.runtime.RuntimeInfo`, never here.

This module is torch-free so the scheduler, the block manager and the router can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_MODEL_TYPE = "ernie4_5_moe"
VL_MODEL_TYPE = "ernie4_5_vl_moe"
SUPPORTED_MODEL_TYPES = (TEXT_MODEL_TYPE, VL_MODEL_TYPE)
# Random-weight presets (defined in engine.presets; named here so torch-free code can know them).
PRESET_NAMES = ("tiny", "ernie-4.5-21b-a3b", "tiny-vl", "ernie-4.5-vl-28b-a3b")
# The token ids of images and videos a VL model config names (image_token_id, ...).
VL_TOKEN_NAMES = (
    "image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_token_id",
    "video_start_token_id",
    "video_end_token_id",
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class VisionConfig:
    """ERNIE-4.5-VL's vision tower (a ViT with 2D RoPE) and resampler: transformers'
    `Ernie4_5_VLMoeVisionConfig` fields (defaults: ERNIE-4.5-VL-28B-A3B)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rms_norm_eps: float = 1e-6  # the eps of the tower's (and resampler's) LayerNorms
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0, f"vision_config.{name} must be a positive integer, got {value!r}"
            )
        _require(
            self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 4 == 0,
            f"vision_config.hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) must be a multiple of 4 "
            "(2D RoPE splits each head into h and w halves of rotated pairs)",
        )
        _require(
            isinstance(self.spatial_merge_size, int) and self.spatial_merge_size > 0,
            f"vision_config.spatial_merge_size must be a positive integer, got {self.spatial_merge_size!r}",
        )
        _require(
            self.temporal_merge_size == 2,
            f"vision_config.temporal_merge_size must be 2 (frames are paired), got {self.temporal_merge_size!r}",
        )
        _require(
            self.hidden_act == "quick_gelu",
            f"vision_config.hidden_act {self.hidden_act!r} is not supported (only 'quick_gelu')",
        )
        _require(self.rms_norm_eps > 0, f"vision_config.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _require(self.rope_theta > 0, f"vision_config.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: channels x patch_size^2 (an image's frame is not repeated in time)."""
        return self.in_channels * self.patch_size * self.patch_size

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"vision_config must be a JSON object, got {type(raw).__name__}")
        defaults = cls()
        rope = raw.get("rope_parameters") or {}
        fields = {name: raw.get(name, getattr(defaults, name)) for name in _VISION_FIELDS}
        fields["depth"] = raw.get("depth", raw.get("num_hidden_layers", defaults.depth))
        fields["num_heads"] = raw.get("num_heads", raw.get("num_attention_heads", defaults.num_heads))
        fields["rope_theta"] = float(rope.get("rope_theta", defaults.rope_theta))
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ConfigError(f"malformed vision_config: {exc}") from exc

    def to_hf_dict(self) -> dict[str, Any]:
        raw = {name: getattr(self, name) for name in _VISION_FIELDS}
        raw.update(depth=self.depth, num_heads=self.num_heads, model_type="ernie4_5_vl_moe_vision")
        raw["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return raw


_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "in_channels",
    "patch_size",
    "spatial_merge_size",
    "temporal_merge_size",
    "hidden_act",
    "rms_norm_eps",
)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an ERNIE-4.5 MoE model (the fields transformers' config carries).

    The text model leaves the VL fields at their defaults. An ERNIE-4.5-VL model
    (`model_type="ernie4_5_vl_moe"`) sets `vision`, the width of its vision experts (it has as
    many vision experts as text experts, with their own gate and correction bias), the 3D RoPE
    split `mrope_section` and the image / video token ids; `moe_intermediate_size` is then the
    text experts' (and shared experts') width.
    """

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
    model_type: str = TEXT_MODEL_TYPE
    dtype: str = "bfloat16"
    # ERNIE-4.5-VL only (model_type ernie4_5_vl_moe):
    vision: VisionConfig | None = None
    vision_moe_intermediate_size: int = 0  # the vision experts' width
    # Rotary pairs per axis of the 3D RoPE, (h, w, t): pairs 0 .. h+w-1 alternate h, w; the last t
    # pairs turn with the temporal position. Sums to head_dim // 2.
    mrope_section: tuple[int, int, int] | None = None
    image_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    video_token_id: int | None = None
    video_start_token_id: int | None = None
    video_end_token_id: int | None = None

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
        if self.model_type == VL_MODEL_TYPE:
            self._check_vl()
        else:
            vl_fields = {name: getattr(self, name) for name in ("vision", "mrope_section", *VL_TOKEN_NAMES)}
            stray = {name: value for name, value in vl_fields.items() if value is not None}
            _require(not stray, f"a {self.model_type} model takes no VL fields, got {stray}")

    def _check_vl(self) -> None:
        _require(self.vision is not None, f"a {VL_MODEL_TYPE} model needs a vision config")
        _require(
            self.moe_num_experts > 0 and self.vision_moe_intermediate_size > 0,
            f"vision_moe_intermediate_size must be > 0 with moe_num_experts > 0, got "
            f"{self.vision_moe_intermediate_size} and {self.moe_num_experts}",
        )
        section = self.mrope_section
        _require(
            section is not None
            and len(section) == 3
            and all(isinstance(n, int) and n >= 0 for n in section)
            and section[0] == section[1]
            and sum(section) == self.head_dim // 2,
            f"mrope_section {section!r} must be (h, w, t) with h == w and h + w + t == head_dim // 2 "
            f"= {self.head_dim // 2}",
        )
        ids = {name: getattr(self, name) for name in VL_TOKEN_NAMES}
        bad = {
            name: value for name, value in ids.items() if not (isinstance(value, int) and 0 <= value < self.vocab_size)
        }
        _require(not bad, f"VL token ids must lie in the vocabulary [0, {self.vocab_size}), got {bad}")
        _require(len(set(ids.values())) == len(ids), f"VL token ids must be distinct, got {ids}")

    @property
    def is_multimodal(self) -> bool:
        """An ERNIE-4.5-VL model: it takes images."""
        return self.vision is not None

    @property
    def vision_expert_token_ids(self) -> frozenset[int]:
        """Prompt tokens the vision experts take: image / video placeholders and their start / end
        markers (transformers' `moe_mm_token_type_ids`). Empty for a text model."""
        ids = (getattr(self, name) for name in VL_TOKEN_NAMES)
        return frozenset(token_id for token_id in ids if token_id is not None)

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
        fields = _vl_fields(raw) if model_type == VL_MODEL_TYPE else _text_fields(raw)
        if model_type == TEXT_MODEL_TYPE:
            for key in ("moe_num_experts", "moe_k", "moe_layer_start_index", "moe_layer_end_index"):
                if isinstance(fields[key], list):  # VL configs carry [text, vision] pairs
                    raise ConfigError(f"{key}={fields[key]!r}: per-modality values belong to the VL model")
        text_dtype = (raw.get("text_config") or {}).get("dtype") if model_type == VL_MODEL_TYPE else None
        fields["model_type"] = model_type
        fields["dtype"] = dtype or _normalise_dtype(
            raw.get("dtype") or raw.get("torch_dtype") or text_dtype or "bfloat16"
        )
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
        text = {
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
        }
        if self.vision is None:
            return {
                "architectures": ["Ernie4_5_MoeForCausalLM"],
                "model_type": self.model_type,
                **text,
                "dtype": self.dtype,
            }
        for key in ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"):
            del text[key]
        text["moe_intermediate_size"] = [self.moe_intermediate_size, self.vision_moe_intermediate_size]
        text["mlp_layer_types"] = ["sparse" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]
        text["rope_parameters"]["mrope_section"] = list(self.mrope_section or ())
        text["model_type"] = "ernie4_5_vl_moe_text"
        return {
            "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
            "model_type": self.model_type,
            "text_config": text,
            "vision_config": self.vision.to_hf_dict(),
            **{name: getattr(self, name) for name in VL_TOKEN_NAMES},
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
        }


def _text_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's fields of a `config.json` (the text model's, or a VL model's text_config)."""
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
    return {
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
    }


# transformers' Ernie4_5_VLMoeConfig defaults (ERNIE-4.5-VL-28B-A3B's vocabulary)
_VL_TOKEN_DEFAULTS = {
    "image_token_id": 100295,
    "image_start_token_id": 101304,
    "image_end_token_id": 101305,
    "video_token_id": 103367,
    "video_start_token_id": 101306,
    "video_end_token_id": 101307,
}


def _vl_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A VL `config.json`: its text_config read as the text model's fields, plus the VL ones.

    Token ids the text_config leaves null (bos, eos, pad) come from the top level when it has them.
    """
    text = raw.get("text_config") or {}
    if not isinstance(text, dict):
        raise ConfigError(f"text_config must be a JSON object, got {type(text).__name__}")
    shared = {
        key: raw[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings") if key in raw
    }
    fields = _text_fields({**shared, **{key: value for key, value in text.items() if value is not None}})
    num_layers = fields["num_hidden_layers"]
    widths = text.get("moe_intermediate_size") or [1536, 512]
    widths = [widths, widths] if isinstance(widths, int) else widths
    experts, top_k = _one_per_modality(text, "moe_num_experts", 64), _one_per_modality(text, "moe_k", 6)
    if not (isinstance(widths, list) and len(widths) == 2):
        raise ConfigError(f"moe_intermediate_size must be [text, vision] widths, got {widths!r}")
    layer_types = text.get("mlp_layer_types") or ["dense"] + ["sparse"] * (num_layers - 1)
    start, end, interval = _moe_layer_pattern(layer_types, num_layers)
    section = (text.get("rope_parameters") or {}).get("mrope_section")
    fields.update(
        moe_intermediate_size=widths[0],
        vision_moe_intermediate_size=widths[1],
        moe_num_experts=experts,
        moe_k=top_k,
        moe_layer_start_index=start,
        moe_layer_end_index=end,
        moe_layer_interval=interval,
        mrope_section=tuple(section) if isinstance(section, list) else (22, 22, 20),
        vision=VisionConfig.from_hf_dict(raw.get("vision_config") or {}),
        **{name: raw.get(name, default) for name, default in _VL_TOKEN_DEFAULTS.items()},
    )
    return fields


def _one_per_modality(text: dict[str, Any], key: str, default: int) -> Any:
    """A value the original VL configs give per modality ([text, vision]): both must agree."""
    value = text.get(key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ConfigError(f"{key}={value!r}: text and vision experts must agree")
        return value[0]
    return value


def _moe_layer_pattern(layer_types: Any, num_layers: int) -> tuple[int, int, int]:
    """(start, end, interval) of `mlp_layer_types` ("dense" / "sparse" per layer), the pattern
    `ModelConfig.is_moe_layer` expresses. Raises ConfigError for any other pattern."""
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(f"mlp_layer_types must list 'dense' or 'sparse' for each of {num_layers} layers")
    unknown = sorted({kind for kind in layer_types if kind not in ("dense", "sparse")})
    if unknown:
        raise ConfigError(f"mlp_layer_types holds {unknown}; only 'dense' and 'sparse' are known")
    sparse = [index for index, kind in enumerate(layer_types) if kind == "sparse"]
    if not sparse:
        return num_layers, num_layers - 1, 1
    for interval in range(1, num_layers + 1):
        every = [i for i in range(sparse[0], sparse[-1] + 1) if (i + 1) % interval == 0]
        if every == sparse:
            return sparse[0], -1 if sparse[-1] == num_layers - 1 else sparse[-1], interval
    raise ConfigError(f"mlp_layer_types {layer_types} is not every n-th layer from one layer to another")


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
    """Continuous batching limits: tokens per step (the chunked-prefill budget) and sequences per step.

    `prefill_max_num_batched_tokens` is the budget while the engine serves the prefill role only
    (`Scheduler.set_prefill_only`): its steps carry no decode tokens whose inter-token latency a
    long step would hurt, and bigger steps run the MoE layers at a better rate per token. None: the
    same budget in every role.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    prefill_max_num_batched_tokens: int | None = None

    def __post_init__(self) -> None:
        _require(
            isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens > 0,
            f"max_num_batched_tokens must be a positive integer, got {self.max_num_batched_tokens!r}",
        )
        prefill = self.prefill_max_num_batched_tokens
        _require(
            prefill is None or (isinstance(prefill, int) and not isinstance(prefill, bool) and prefill > 0),
            f"prefill_max_num_batched_tokens must be a positive integer or None, got {prefill!r}",
        )
        _require(
            isinstance(self.max_num_seqs, int) and self.max_num_seqs > 0,
            f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}",
        )
        _require(
            self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len > 0),
            f"max_model_len must be a positive integer or None, got {self.max_model_len!r}",
        )

    @property
    def prefill_budget(self) -> int:
        """Tokens per step in the prefill role."""
        return self.prefill_max_num_batched_tokens or self.max_num_batched_tokens

    @property
    def largest_step_tokens(self) -> int:
        """The most tokens any step may carry, in any role (what the warm-up must cover)."""
        return max(self.max_num_batched_tokens, self.prefill_budget)


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
    # Prefill and mixed steps of up to this many tokens replay their MoE layers from CUDA graphs
    # (engine.cuda_graph.MoEGraphs; capped by the largest step); 0 keeps those layers eager.
    moe_graph_max_tokens: int = 2048

    def __post_init__(self) -> None:
        _require(
            isinstance(self.cuda_graph_max_batch, int) and self.cuda_graph_max_batch >= 1,
            f"cuda_graph_max_batch must be a positive integer, got {self.cuda_graph_max_batch!r}",
        )
        _require(
            isinstance(self.moe_graph_max_tokens, int)
            and not isinstance(self.moe_graph_max_tokens, bool)
            and self.moe_graph_max_tokens >= 0,
            f"moe_graph_max_tokens must be an integer >= 0, got {self.moe_graph_max_tokens!r}",
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
