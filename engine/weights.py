"""Read a Hugging Face ERNIE-4.5 MoE or ERNIE-4.5-VL checkpoint (safetensors) into our models.

Two key layouts load, in one file or sharded with `model.safetensors.index.json`:

    per-expert (real checkpoints, transformers' save_pretrained)   fused (transformers' in-memory state dict)
    mlp.experts.{e}.gate_proj.weight [I, H]  -> w13[e, :I]          mlp.experts.gate_up_proj [E, 2I, H] -> w13
    mlp.experts.{e}.up_proj.weight   [I, H]  -> w13[e, I:]          mlp.experts.down_proj    [E, H, I]  -> w2
    mlp.experts.{e}.down_proj.weight [H, I]  -> w2[e]
    mlp.moe_statics.e_score_correction_bias [1, E]                  mlp.gate.moe_statics.e_score_correction_bias
    mlp.gate.weight [E, H] -> gate_weight (fp32)                    (same)

and, in both, `self_attn.{q,k,v}_proj` -> rows of `qkv_proj`, `mlp.{gate,up}_proj` (dense layers and
shared experts) -> rows of `gate_up_proj`; everything else keeps its name. `lm_head.weight` is
ignored when embeddings are tied; `mtp*` keys (multi-token-prediction heads) are ignored.

An ERNIE-4.5-VL checkpoint (what transformers' `Ernie4_5_VLMoeForConditionalGeneration` saves and
reads, the original Baidu layout) keeps both expert pools in one list, both gates transposed and
both correction biases in one tensor, per MoE layer:

    mlp.experts.{e}.*            e <  E: text expert e      -> mlp.text_moe.{w13, w2}[e]
    mlp.experts.{E + e}.*        vision expert e            -> mlp.vision_moe.{w13, w2}[e]
    mlp.gate.weight   [H, E]     the text gate, transposed  -> mlp.text_moe.gate_weight   [E, H]
    mlp.gate.weight_1 [H, E]     the vision gate            -> mlp.vision_moe.gate_weight [E, H]
    mlp.moe_statics.e_score_correction_bias [2, E]  row 0 -> mlp.text_moe.e_score_correction_bias,
                                                    row 1 -> mlp.vision_moe.e_score_correction_bias

and `model.vision_model.*` / `model.resampler_model.*` (the vision tower and resampler) keep
their names.

Checking happens before any tensor is read: unknown keys, missing keys and shape mismatches each
raise `ModelLoadError` naming the keys. Loading then goes tensor by tensor through `safe_open`
(an expert-stacked tensor reads only the rows of the experts the model holds); nothing builds a
whole-checkpoint copy in memory, and `torch.load` is never used.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")
_FUSED_BIAS = "mlp.gate.moe_statics.e_score_correction_bias"


class ModelLoadError(ValueError):
    """A model source cannot be loaded; the message names the bad path, key or value."""


@dataclass(frozen=True)
class TensorCopy:
    """One checkpoint tensor and where it goes.

    `param[dst_index] <- file_tensor[src_rows].reshape(...)`; `src_rows` is a range of leading rows
    (experts) to read, or None for the whole tensor. `provides` are the per-expert-layout keys this
    copy satisfies (for the missing-key check).
    """

    file: Path
    key: str
    param: str
    dst_index: tuple[int | slice, ...]
    src_rows: tuple[int, int] | None
    shape: tuple[int, ...]  # the shape the file must hold
    provides: tuple[str, ...]
    transpose: bool = False  # the file holds the parameter's transpose (a VL gate)


@dataclass(frozen=True)
class Target:
    """What one needed tensor is: `param[dst_index]`, from a file tensor of `shape`.

    Targets are named by their per-expert-layout checkpoint key, or, where one checkpoint tensor
    fills several parameters (a VL layer's two correction-bias rows), by a name of their own with
    the key in `source` and the rows in `src_rows`.
    """

    param: str
    dst_index: tuple[int | slice, ...]
    shape: tuple[int, ...]
    src_rows: tuple[int, int] | None = None
    transpose: bool = False
    source: str | None = None  # the checkpoint key, when it is not the target's name


# ---------------------------------------------------------------------------------------------
# What the model needs, in per-expert key names
# ---------------------------------------------------------------------------------------------


def expected_targets(config: ModelConfig, expert_range: tuple[int, int] | None = None) -> dict[str, Target]:
    """Every key the model needs (per-expert layout names) -> where it goes and its file shape."""
    targets: dict[str, Target] = {
        "model.embed_tokens.weight": Target("model.embed_tokens.weight", (), (config.vocab_size, config.hidden_size)),
        "model.norm.weight": Target("model.norm.weight", (), (config.hidden_size,)),
    }
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = Target("lm_head.weight", (), (config.vocab_size, config.hidden_size))
    if config.use_bias:
        targets["lm_head.bias"] = Target("lm_head.bias", (), (config.vocab_size,))
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for key, target in _layer_targets(config, layer, expert_range).items():
            source = None if target.source is None else prefix + target.source
            targets[prefix + key] = replace(target, source=source)
    if config.vision is not None:
        targets.update(_vision_targets(config))
    return targets


def _layer_targets(config: ModelConfig, layer: int, expert_range: tuple[int, int] | None) -> dict[str, Target]:
    prefix = f"model.layers.{layer}."
    hidden = config.hidden_size
    targets = {
        f"{name}.weight": Target(f"{prefix}{name}.weight", (), (hidden,))
        for name in ("input_layernorm", "post_attention_layernorm")
    }
    targets.update(_attention_targets(config, prefix))
    if config.is_moe_layer(layer) and config.is_multimodal:
        targets.update(_vl_moe_targets(config, prefix, expert_range))
    elif config.is_moe_layer(layer):
        targets.update(_moe_targets(config, prefix, expert_range))
    else:
        targets.update(_mlp_targets(config, prefix + "mlp", "mlp", config.intermediate_size))
    return targets


def _attention_targets(config: ModelConfig, prefix: str) -> dict[str, Target]:
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    rows = {"q": (0, q_size), "k": (q_size, q_size + kv_size), "v": (q_size + kv_size, q_size + 2 * kv_size)}
    qkv = f"{prefix}self_attn.qkv_proj"
    targets = {}
    for name, (start, end) in rows.items():
        targets[f"self_attn.{name}_proj.weight"] = Target(f"{qkv}.weight", (slice(start, end),), (end - start, hidden))
        if config.use_bias:
            targets[f"self_attn.{name}_proj.bias"] = Target(f"{qkv}.bias", (slice(start, end),), (end - start,))
    targets["self_attn.o_proj.weight"] = Target(f"{prefix}self_attn.o_proj.weight", (), (hidden, q_size))
    if config.use_bias:
        targets["self_attn.o_proj.bias"] = Target(f"{prefix}self_attn.o_proj.bias", (), (hidden,))
    return targets


def _mlp_targets(config: ModelConfig, module: str, key_prefix: str, width: int) -> dict[str, Target]:
    """A gated MLP stored as gate/up/down projections -> our fused gate_up_proj and down_proj."""
    hidden = config.hidden_size
    targets = {
        f"{key_prefix}.gate_proj.weight": Target(f"{module}.gate_up_proj.weight", (slice(0, width),), (width, hidden)),
        f"{key_prefix}.up_proj.weight": Target(
            f"{module}.gate_up_proj.weight", (slice(width, 2 * width),), (width, hidden)
        ),
        f"{key_prefix}.down_proj.weight": Target(f"{module}.down_proj.weight", (), (hidden, width)),
    }
    if config.use_bias:
        targets[f"{key_prefix}.gate_proj.bias"] = Target(f"{module}.gate_up_proj.bias", (slice(0, width),), (width,))
        targets[f"{key_prefix}.up_proj.bias"] = Target(
            f"{module}.gate_up_proj.bias", (slice(width, 2 * width),), (width,)
        )
        targets[f"{key_prefix}.down_proj.bias"] = Target(f"{module}.down_proj.bias", (), (hidden,))
    return targets


def _moe_targets(config: ModelConfig, prefix: str, expert_range: tuple[int, int] | None) -> dict[str, Target]:
    hidden, inter, num_experts = config.hidden_size, config.moe_intermediate_size, config.moe_num_experts
    mlp = f"{prefix}mlp"
    targets = {
        "mlp.gate.weight": Target(f"{mlp}.gate_weight", (), (num_experts, hidden)),
        "mlp.moe_statics.e_score_correction_bias": Target(f"{mlp}.e_score_correction_bias", (), (1, num_experts)),
    }
    targets.update(_expert_targets(config, mlp, 0, inter, expert_range))
    if config.moe_num_shared_experts > 0:
        width = inter * config.moe_num_shared_experts
        targets.update(_mlp_targets(config, f"{mlp}.shared_experts", "mlp.shared_experts", width))
    return targets


def _expert_targets(
    config: ModelConfig, module: str, first_key: int, inter: int, expert_range: tuple[int, int] | None
) -> dict[str, Target]:
    """Experts [start, end) stored as `mlp.experts.{first_key + e}.*` -> `module.w13[e]`, `module.w2[e]`."""
    hidden = config.hidden_size
    start, end = expert_range or (0, config.moe_num_experts)
    targets = {}
    for expert in range(start, end):
        local = expert - start
        key = f"mlp.experts.{first_key + expert}"
        targets[f"{key}.gate_proj.weight"] = Target(f"{module}.w13", (local, slice(0, inter)), (inter, hidden))
        targets[f"{key}.up_proj.weight"] = Target(f"{module}.w13", (local, slice(inter, 2 * inter)), (inter, hidden))
        targets[f"{key}.down_proj.weight"] = Target(f"{module}.w2", (local,), (hidden, inter))
    return targets


def _vl_moe_targets(config: ModelConfig, prefix: str, expert_range: tuple[int, int] | None) -> dict[str, Target]:
    """A VL MoE layer: two expert pools stored as one list, transposed gates, a two-row bias."""
    hidden, num_experts = config.hidden_size, config.moe_num_experts
    mlp = f"{prefix}mlp"
    bias_key = "mlp.moe_statics.e_score_correction_bias"
    targets = {
        "mlp.gate.weight": Target(f"{mlp}.text_moe.gate_weight", (), (hidden, num_experts), transpose=True),
        "mlp.gate.weight_1": Target(f"{mlp}.vision_moe.gate_weight", (), (hidden, num_experts), transpose=True),
    }
    pools = (("text_moe", config.moe_intermediate_size), ("vision_moe", config.vision_moe_intermediate_size))
    for row, (pool, inter) in enumerate(pools):
        param = f"{mlp}.{pool}.e_score_correction_bias"
        targets[f"{bias_key}[{row}]"] = Target(param, (), (2, num_experts), (row, row + 1), source=bias_key)
        targets.update(_expert_targets(config, f"{mlp}.{pool}", row * num_experts, inter, expert_range))
    if config.moe_num_shared_experts > 0:
        width = config.moe_intermediate_size * config.moe_num_shared_experts
        targets.update(_mlp_targets(config, f"{mlp}.shared_experts", "mlp.shared_experts", width))
    return targets


def _vision_targets(config: ModelConfig) -> dict[str, Target]:
    """The vision tower and resampler of a VL model: checkpoint keys are our parameter names."""
    vision = config.vision
    if vision is None:
        return {}
    dim, inter = vision.hidden_size, vision.intermediate_size
    window = dim * vision.spatial_merge_size**2
    tower, resampler = "model.vision_model", "model.resampler_model"
    shapes: dict[str, tuple[int, ...]] = {
        f"{tower}.patch_embed.proj.weight": (dim, vision.patch_dim),
        f"{tower}.ln.weight": (dim,),
        f"{tower}.ln.bias": (dim,),
        f"{resampler}.mlp.weight": (config.hidden_size, window),
        f"{resampler}.mlp.bias": (config.hidden_size,),
        f"{resampler}.after_norm.weight": (config.hidden_size,),
    }
    for block in range(vision.depth):
        prefix = f"{tower}.blocks.{block}"
        for name, shape in (
            ("norm1", (dim,)),
            ("norm2", (dim,)),
            ("attn.qkv", (3 * dim, dim)),
            ("attn.proj", (dim, dim)),
            ("mlp.fc1", (inter, dim)),
            ("mlp.fc2", (dim, inter)),
        ):
            shapes[f"{prefix}.{name}.weight"] = shape
            shapes[f"{prefix}.{name}.bias"] = (shape[0],)
    for name, in_dim in (("spatial_linear", window), ("temporal_linear", vision.temporal_merge_size * window)):
        for index, shape in (("0", (window, in_dim)), ("2", (window, window)), ("3", (window,))):
            shapes[f"{resampler}.{name}.{index}.weight"] = shape
            shapes[f"{resampler}.{name}.{index}.bias"] = (window,)
    return {key: Target(key, (), shape) for key, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------
# What the checkpoint holds
# ---------------------------------------------------------------------------------------------


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Map every tensor key in the folder's safetensors files to its file.

    Uses `model.safetensors.index.json` when present, else every `*.safetensors` file.
    """
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        return _files_from_index(folder, index_path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors in {str(folder)!r}")
    key_to_file: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                if key in key_to_file:
                    raise ModelLoadError(f"key {key!r} appears in both {key_to_file[key].name} and {file.name}")
                key_to_file[key] = file
    return key_to_file


def _files_from_index(folder: Path, index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"malformed {index_path}: {exc!r}") from exc
    key_to_file = {key: folder / name for key, name in weight_map.items()}
    absent = sorted({path.name for path in key_to_file.values() if not path.is_file()})
    if absent:
        raise ModelLoadError(f"{index_path} names shard files that do not exist: {absent}")
    return key_to_file


def _file_shapes(key_to_file: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, file in key_to_file.items():
        by_file[file].append(key)
    shapes: dict[str, tuple[int, ...]] = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as handle:
            available = set(handle.keys())
            for key in keys:
                if key not in available:
                    raise ModelLoadError(f"the index places {key!r} in {file.name}, which does not hold it")
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


# ---------------------------------------------------------------------------------------------
# Planning: checkpoint keys -> copies, with every check done up front
# ---------------------------------------------------------------------------------------------


def _is_ignored(key: str, config: ModelConfig) -> bool:
    if any(part.startswith("mtp") for part in key.split(".")):
        return True  # multi-token-prediction heads: not used for serving
    return key == "lm_head.weight" and config.tie_word_embeddings


def _stacked_copy(
    config: ModelConfig, layer: int, kind: str, file: Path, key: str, expert_range: tuple[int, int]
) -> TensorCopy:
    """A fused-layout expert tensor [E, ...] -> rows [start, end) into w13 or w2."""
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    start, end = expert_range
    prefix = f"model.layers.{layer}.mlp.experts"
    if kind == "gate_up_proj":
        param, shape = "w13", (config.moe_num_experts, 2 * inter, hidden)
        provides = tuple(f"{prefix}.{e}.{p}_proj.weight" for e in range(start, end) for p in ("gate", "up"))
    else:
        param, shape = "w2", (config.moe_num_experts, hidden, inter)
        provides = tuple(f"{prefix}.{e}.down_proj.weight" for e in range(start, end))
    return TensorCopy(file, key, f"model.layers.{layer}.mlp.{param}", (), (start, end), shape, provides)


def _copies(file: Path, key: str, named: list[tuple[str, Target]]) -> list[TensorCopy]:
    return [TensorCopy(file, key, t.param, t.dst_index, t.src_rows, t.shape, (name,), t.transpose) for name, t in named]


def _classify(
    key: str,
    file: Path,
    config: ModelConfig,
    sources: dict[str, list[tuple[str, Target]]],
    expert_range: tuple[int, int],
) -> list[TensorCopy] | str:
    """The copies a checkpoint key feeds (none for a key to skip), or the key itself when it is unknown.

    `sources` maps each checkpoint key to the targets it fills, by name."""
    if _is_ignored(key, config):
        return []
    layer_match = _LAYER.match(key)
    if layer_match is not None and config.is_moe_layer(int(layer_match.group(1))):
        layer, rest = int(layer_match.group(1)), layer_match.group(2)
        stacked = _STACKED.match(rest)
        if stacked is not None and not config.is_multimodal:
            return [_stacked_copy(config, layer, stacked.group(1), file, key, expert_range)]
        if rest == _FUSED_BIAS and not config.is_multimodal:
            return _copies(file, key, sources[f"model.layers.{layer}.mlp.moe_statics.e_score_correction_bias"])
        expert = _EXPERT.match(rest)
        num_stored = config.moe_num_experts * (2 if config.is_multimodal else 1)  # VL: text, then vision experts
        if expert is not None and key not in sources and int(expert.group(1)) < num_stored:
            return []  # another expert-parallel rank's expert
    named = sources.get(key)
    return key if named is None else _copies(file, key, named)


def plan_checkpoint(
    folder: str | Path, config: ModelConfig, expert_range: tuple[int, int] | None = None
) -> list[TensorCopy]:
    """Every copy needed to load `folder` for `config` (experts [start, end) only, when given).

    Raises ModelLoadError listing unknown keys, missing keys, or shape mismatches (key, expected,
    actual) before any tensor data is read.
    """
    expert_range = expert_range or (0, config.moe_num_experts)
    start, end = expert_range
    if not (0 <= start <= end <= config.moe_num_experts and (start < end or config.moe_num_experts == 0)):
        raise ModelLoadError(f"expert_range {expert_range!r} is not within [0, {config.moe_num_experts}]")
    key_to_file = checkpoint_files(folder)
    targets = expected_targets(config, expert_range)
    sources: dict[str, list[tuple[str, Target]]] = defaultdict(list)
    for name, target in targets.items():
        sources[target.source or name].append((name, target))
    copies: list[TensorCopy] = []
    unknown: list[str] = []
    for key, file in sorted(key_to_file.items()):
        result = _classify(key, file, config, dict(sources), expert_range)
        if isinstance(result, str):
            unknown.append(result)
        else:
            copies.extend(result)
    if unknown:
        raise ModelLoadError(f"checkpoint {str(folder)!r} has {len(unknown)} unexpected keys: {_listing(unknown)}")
    provided = [key for copy in copies for key in copy.provides]
    twice = sorted(key for key, count in Counter(provided).items() if count > 1)
    if twice:
        raise ModelLoadError(f"checkpoint {str(folder)!r} provides {len(twice)} tensors twice: {_listing(twice)}")
    missing = sorted(set(targets) - set(provided))
    if missing:
        raise ModelLoadError(f"checkpoint {str(folder)!r} is missing {len(missing)} keys: {_listing(missing)}")
    _check_shapes(copies, _file_shapes({c.key: c.file for c in copies}))
    return copies


def _check_shapes(copies: list[TensorCopy], shapes: dict[str, tuple[int, ...]]) -> None:
    for copy in copies:
        actual = shapes[copy.key]
        if actual != copy.shape and not _is_bias_vector(copy, actual):
            raise ModelLoadError(f"shape mismatch for {copy.key!r}: expected {list(copy.shape)}, got {list(actual)}")


def _is_bias_vector(copy: TensorCopy, actual: tuple[int, ...]) -> bool:
    """The text model's correction bias is [1, E] in checkpoints; a plain [E] is accepted too."""
    return copy.param.endswith("e_score_correction_bias") and copy.src_rows is None and actual == copy.shape[1:]


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def iter_checkpoint_tensors(copies: list[TensorCopy]) -> Iterator[tuple[TensorCopy, torch.Tensor]]:
    """Yield each planned copy with its CPU tensor, one at a time, opening each file once."""
    by_file: dict[Path, list[TensorCopy]] = defaultdict(list)
    for copy in copies:
        by_file[copy.file].append(copy)
    for file, file_copies in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as handle:
            for copy in file_copies:
                if copy.src_rows is None:
                    yield copy, handle.get_tensor(copy.key)
                else:
                    start, end = copy.src_rows
                    yield copy, handle.get_slice(copy.key)[start:end]


@torch.no_grad()
def load_checkpoint(model: Ernie4_5_MoeForCausalLM, folder: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint in `folder`.

    Loads only the experts the model's MoE layers hold (`model.expert_range`). Tensors are cast
    to each parameter's dtype (so the router stays fp32) and copied to its device one at a time.
    """
    copies = plan_checkpoint(folder, model.config, model.expert_range)
    params = dict(model.named_parameters())
    planned = {copy.param for copy in copies}
    if planned != set(params):
        raise ModelLoadError(
            f"model and checkpoint plan disagree (model built from another config?): parameters not in the "
            f"model {sorted(planned - set(params))}, parameters left unfilled {sorted(set(params) - planned)}"
        )
    for copy, tensor in iter_checkpoint_tensors(copies):
        destination = params[copy.param][copy.dst_index]
        destination.copy_((tensor.T if copy.transpose else tensor).reshape(destination.shape))
