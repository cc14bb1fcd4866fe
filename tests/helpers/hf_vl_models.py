"""Tiny transformers ERNIE-4.5-VL checkpoints on disk, test images, and transformers' outputs for them.

`make_hf_vl_model_dir` saves a seeded random `Ernie4_5_VLMoeForConditionalGeneration` with
`save_pretrained` (the checkpoint layout real ERNIE-4.5-VL folders have); `hf_vl_inputs` builds
the processor-style inputs transformers' model takes for a prompt with images (pixel values from
transformers' own image processor), and `hf_vl_logits` / `hf_vl_greedy` are the references.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration
from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import Ernie4_5_VLMoeImageProcessorPil
from transformers.utils import logging as hf_logging

from engine.multimodal import (
    IMAGE,
    ImageInput,
    MultiModalItem,
    VisionGeometry,
    content_hash,
    expand_placeholders,
    image_grid,
)
from engine.presets import TINY_VL_TOKEN_IDS
from engine.tokenizer import TINY_DIR
from tests.helpers.hf_models import TINY_HF_CONFIG, TOKENIZER_FILES, randomise

hf_logging.disable_progress_bar()

IMAGE_START, IMAGE_END, IMAGE_TOKEN = (
    TINY_VL_TOKEN_IDS["image_start_token_id"],
    TINY_VL_TOKEN_IDS["image_end_token_id"],
    TINY_VL_TOKEN_IDS["image_token_id"],
)
GEOMETRY = VisionGeometry()  # the processor defaults: patch 14, merge 2, 56*56 .. 28*28*6177 pixels

# the text tests' tiny shape, less what the VL text config names otherwise (mlp_layer_types, two widths)
_NOT_VL_TEXT_KEYS = ("moe_intermediate_size", "moe_num_experts", "moe_layer_start_index", "moe_layer_interval")
TINY_VL_HF_CONFIG: dict[str, Any] = {
    "text_config": {
        **{key: value for key, value in TINY_HF_CONFIG.items() if key not in _NOT_VL_TEXT_KEYS},
        "moe_intermediate_size": [32, 16],
        "moe_num_experts": 6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]},
    },
    "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2},
    **TINY_VL_TOKEN_IDS,
}


def make_hf_vl_model(
    seed: int = 0, text_overrides: dict[str, Any] | None = None
) -> Ernie4_5_VLMoeForConditionalGeneration:
    """transformers' VL model of the tiny shape with seeded, non-trivial weights (eager attention)."""
    raw = {**TINY_VL_HF_CONFIG, "text_config": {**TINY_VL_HF_CONFIG["text_config"], **(text_overrides or {})}}
    config = Ernie4_5_VLMoeConfig(**raw)
    config._attn_implementation = "eager"
    model = Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    # a small embedding, so that the tied head does not just repeat the last token
    randomise(model, seed, config.text_config.moe_num_experts, embed_scale=0.05)
    return model


def make_hf_vl_model_dir(path: str | Path, *, seed: int = 0, text_overrides: dict[str, Any] | None = None) -> Path:
    """`save_pretrained` of a tiny VL model into `path`, with the tiny tokenizer's files."""
    folder = Path(path)
    make_hf_vl_model(seed, text_overrides).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_DIR / name, folder / name)
    return folder


def load_hf_vl_model(path: str | Path) -> Ernie4_5_VLMoeForConditionalGeneration:
    model = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    )
    model.generation_config.eos_token_id = None  # greedy runs for a fixed number of tokens, as ours ignore EOS
    return model.eval()


def png(height: int, width: int, seed: int = 0) -> bytes:
    """A PNG of random pixels (a smooth gradient plus noise, so resizing changes it visibly)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1.0, height)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_input(data: bytes) -> ImageInput:
    width, height = Image.open(io.BytesIO(data)).size
    return ImageInput(data, height, width)


def prompt_with_images(
    text_ids: Sequence[Sequence[int]], images: Sequence[bytes]
) -> tuple[list[int], tuple[MultiModalItem, ...]]:
    """Text pieces with `start, placeholder, end` between consecutive pieces (one per image),
    expanded: the token ids and items the engine takes."""
    ids: list[int] = list(text_ids[0])
    for piece in text_ids[1:]:
        ids += [IMAGE_START, IMAGE_TOKEN, IMAGE_END, *piece]
    return expand_placeholders(ids, [image_input(data) for data in images], IMAGE_TOKEN, GEOMETRY)


def hf_vl_inputs(ids: Sequence[int], images: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """What transformers' processor gives its model: ids, pixel values, grids and both token-type maps."""
    input_ids = torch.tensor([list(ids)])
    inputs = {
        "input_ids": input_ids,
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long(),
        "moe_mm_token_type_ids": torch.isin(input_ids, torch.tensor([IMAGE_TOKEN, IMAGE_START, IMAGE_END])).long(),
    }
    if images:
        processor = Ernie4_5_VLMoeImageProcessorPil()
        out = processor(images=[Image.open(io.BytesIO(data)) for data in images], return_tensors="pt")
        grids = [tuple(g) for g in out["image_grid_thw"].tolist()]
        expected = [image_grid(*reversed(Image.open(io.BytesIO(d)).size), GEOMETRY) for d in images]
        assert grids == expected, (grids, expected)
        inputs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    return inputs


@torch.no_grad()
def hf_vl_logits(
    model: Ernie4_5_VLMoeForConditionalGeneration, ids: Sequence[int], images: Sequence[bytes]
) -> torch.Tensor:
    """transformers' logits [T, V] (float32) of a prompt with images."""
    model.model.rope_deltas = None
    return model(**hf_vl_inputs(ids, images), use_cache=False).logits[0].float()


@torch.no_grad()
def hf_vl_greedy(
    model: Ernie4_5_VLMoeForConditionalGeneration, ids: Sequence[int], images: Sequence[bytes], num_tokens: int
) -> list[int]:
    """transformers' `generate`, greedy, `num_tokens` new tokens."""
    model.model.rope_deltas = None
    out = model.generate(**hf_vl_inputs(ids, images), max_new_tokens=num_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def items_without_data(items: Sequence[MultiModalItem]) -> tuple[MultiModalItem, ...]:
    return tuple(item.without_data() for item in items)


def image_item(data: bytes, offset: int) -> MultiModalItem:
    """One image's item at `offset` (its grid from the processor's rules)."""
    info = image_input(data)
    grid = image_grid(info.height, info.width, GEOMETRY)
    return MultiModalItem(IMAGE, data, content_hash(data), grid, offset, grid[1] * grid[2] // 4)
