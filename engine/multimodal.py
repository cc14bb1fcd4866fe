"""Multimodal prompts (ERNIE-4.5-VL): what a request carries for each image, torch-free.

The router imports this module (it never loads torch), so everything here is plain Python.

A prompt with images is a token sequence in which each image occupies a run of placeholder
tokens, framed by start / end markers that the chat template writes:

    ... User: Picture 1:<|IMAGE_START|> P P P P P P <|IMAGE_END|> What is this? ...
                                        ^offset     ^offset + num_tokens

`num_tokens = t * h * w // merge_size**2` for the image's patch grid `(t, h, w)` (t = 1 for an
image). The grid comes from the image's pixel size alone (`image_grid`, the same arithmetic as
transformers' `Ernie4_5_VLMoeImageProcessor`), so the router expands placeholders and hashes
blocks without decoding pixels into tensors; the prefill worker runs the real processor on the
encoded bytes (`MultiModalItem.data`) and the vision tower on the result.

3D RoPE positions (`mrope_positions`): text tokens advance all three axes together by one;
an image's placeholders take (t, row, column) positions starting at the running position, which
then advances by `max(h, w) // merge_size`. After the prompt, token `i` sits at
`i + mrope_delta` on all three axes (what a decode worker needs to continue, without pixels).

Prefix caching (`block_extra_keys`): a full block that overlaps an image's placeholders hashes
that image's content hash with its token ids, so the same text with another image never shares KV.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IMAGE = "image"
MODALITIES = (IMAGE,)


@dataclass(frozen=True)
class VisionGeometry:
    """How images become patch grids: the image processor's size rules (ERNIE-4.5-VL defaults)."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 6177

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def geometry_from_preprocessor_config(raw: Mapping[str, Any], default: VisionGeometry | None = None) -> VisionGeometry:
    """The geometry a `preprocessor_config.json` describes: its `patch_size`, `merge_size`,
    `min_pixels` / `max_pixels` (else `size.shortest_edge` / `size.longest_edge`); what it
    leaves out keeps `default`'s value (the ERNIE-4.5-VL defaults)."""
    base = default or VisionGeometry()
    size = raw.get("size") if isinstance(raw.get("size"), Mapping) else {}
    return VisionGeometry(
        patch_size=int(raw.get("patch_size", base.patch_size)),
        merge_size=int(raw.get("merge_size", base.merge_size)),
        min_pixels=int(raw.get("min_pixels", size.get("shortest_edge", base.min_pixels))),
        max_pixels=int(raw.get("max_pixels", size.get("longest_edge", base.max_pixels))),
    )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The pixel size an image is resized to: both sides multiples of `factor`, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible. Raises ValueError for
    aspect ratios beyond 200:1 or empty images."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200:1, got {width}x{height}")
    resized_h = round(height / factor) * factor
    resized_w = round(width / factor) * factor
    if resized_h * resized_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_h = max(factor, math.floor(height / beta / factor) * factor)
        resized_w = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_h * resized_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_h = math.ceil(height * beta / factor) * factor
        resized_w = math.ceil(width * beta / factor) * factor
    return resized_h, resized_w


def image_grid(height: int, width: int, geometry: VisionGeometry) -> tuple[int, int, int]:
    """(t, h, w) patch grid of an image of `height` x `width` pixels (t = 1)."""
    resized_h, resized_w = smart_resize(height, width, geometry.factor, geometry.min_pixels, geometry.max_pixels)
    return 1, resized_h // geometry.patch_size, resized_w // geometry.patch_size


def num_placeholder_tokens(grid_thw: Sequence[int], merge_size: int) -> int:
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)


def content_hash(data: bytes) -> str:
    """Hex sha256 of an image's encoded bytes: its identity for prefix caching."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class MultiModalItem:
    """One image of a prompt.

    data          the encoded image file as received (PNG, JPEG, WebP, GIF's first frame ...);
                  only the prefill worker reads it, a decode worker may get it empty
    content_hash  `content_hash(data)`, kept when `data` is dropped
    grid_thw      patch grid (t, h, w) as the image processor produces it
    offset        index in the prompt of the first placeholder token
    num_tokens    placeholder tokens = t * h * w // merge_size**2
    """

    modality: str
    data: bytes
    content_hash: str
    grid_thw: tuple[int, int, int]
    offset: int
    num_tokens: int

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.offset < 0 or self.num_tokens <= 0:
            raise ValueError(f"offset must be >= 0 and num_tokens > 0, got {self.offset} and {self.num_tokens}")

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens

    def without_data(self) -> MultiModalItem:
        """The same item minus its bytes (what a decode worker needs)."""
        return MultiModalItem(self.modality, b"", self.content_hash, self.grid_thw, self.offset, self.num_tokens)


def check_items(items: Sequence[MultiModalItem], num_prompt_tokens: int) -> None:
    """Items must be in prompt order, inside the prompt, and must not overlap."""
    previous_end = 0
    for index, item in enumerate(items):
        if item.offset < previous_end or item.end > num_prompt_tokens:
            raise ValueError(
                f"image {index} spans tokens [{item.offset}, {item.end}) of a {num_prompt_tokens}-token prompt "
                f"after an image ending at {previous_end}: items must be ordered, disjoint and inside the prompt"
            )
        previous_end = item.end


def mrope_positions(
    num_prompt_tokens: int, items: Sequence[MultiModalItem], merge_size: int
) -> tuple[list[int], list[int], list[int]]:
    """(t, h, w) position of every prompt token, as transformers' `get_rope_index` assigns them."""
    check_items(items, num_prompt_tokens)
    pos_t: list[int] = []
    pos_h: list[int] = []
    pos_w: list[int] = []
    position = 0  # the next text position
    cursor = 0  # the next prompt index
    for item in items:
        text = range(position, position + item.offset - cursor)
        for axis in (pos_t, pos_h, pos_w):
            axis.extend(text)
        position += item.offset - cursor
        t, h, w = item.grid_thw
        rows, cols = h // merge_size, w // merge_size
        for frame in range(t):
            for row in range(rows):
                pos_t.extend([position + frame] * cols)
                pos_h.extend([position + row] * cols)
                pos_w.extend(range(position, position + cols))
        position += max(h, w) // merge_size
        cursor = item.end
    tail = range(position, position + num_prompt_tokens - cursor)
    for axis in (pos_t, pos_h, pos_w):
        axis.extend(tail)
    return pos_t, pos_h, pos_w


def mrope_delta(num_prompt_tokens: int, items: Sequence[MultiModalItem], merge_size: int) -> int:
    """Token i >= num_prompt_tokens sits at position i + delta on all three axes (delta <= 0)."""
    if not items:
        return 0
    pos_t, pos_h, pos_w = mrope_positions(num_prompt_tokens, items, merge_size)
    return max(max(pos_t), max(pos_h), max(pos_w)) + 1 - num_prompt_tokens


def block_extra_keys(items: Sequence[MultiModalItem], num_tokens: int, block_size: int) -> list[str]:
    """One key per full block of the first `num_tokens` tokens: the content hashes of the images
    whose placeholders overlap the block, joined ('' for a text-only block)."""
    keys: list[str] = []
    for start in range(0, num_tokens - block_size + 1, block_size):
        end = start + block_size
        keys.append(",".join(item.content_hash for item in items if item.offset < end and item.end > start))
    return keys


@dataclass(frozen=True)
class ImageInput:
    """An image as a prompt builder gets it: the encoded bytes and their pixel size (read from
    the file's header by whoever decoded it)."""

    data: bytes
    height: int
    width: int


def expand_placeholders(
    token_ids: Sequence[int], images: Sequence[ImageInput], image_token_id: int, geometry: VisionGeometry
) -> tuple[list[int], tuple[MultiModalItem, ...]]:
    """Replace the i-th single `image_token_id` of `token_ids` (one per image, as the chat
    template writes it) by image i's run of placeholders. Returns the expanded ids and the items.
    Raises ValueError when the number of placeholders and images differ."""
    slots = [index for index, token in enumerate(token_ids) if token == image_token_id]
    if len(slots) != len(images):
        raise ValueError(f"the prompt has {len(slots)} image placeholders for {len(images)} images")
    expanded: list[int] = []
    items: list[MultiModalItem] = []
    cursor = 0
    for slot, image in zip(slots, images, strict=True):
        expanded.extend(token_ids[cursor:slot])
        grid = image_grid(image.height, image.width, geometry)
        count = num_placeholder_tokens(grid, geometry.merge_size)
        items.append(MultiModalItem(IMAGE, image.data, content_hash(image.data), grid, len(expanded), count))
        expanded.extend([image_token_id] * count)
        cursor = slot + 1
    expanded.extend(token_ids[cursor:])
    return expanded, tuple(items)
