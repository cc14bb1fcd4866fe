"""The VL model's per-step inputs: 3D positions, the vision-expert mask and image embeddings.

The model runner asks `MultiModalInputs.prepare` once per step (VL models only); it returns the
1-D positions `AttentionMetadata` carries and, for a step that holds image or vision-marker
tokens of some prompt, the `MultiModalBatch` the model takes (None otherwise: the text path).

Per request, built on first sight and kept until it finishes (`_RequestState`):

    positions     [3, P] (t, h, w) of every prompt token (`engine.multimodal.mrope_positions`);
                  token i >= P sits at i + delta on every axis, so a decode worker, which gets
                  the items without pixels, needs only their grids
    prompt_mask   [P] bool, the prompt tokens the vision experts take (placeholders, start / end
                  markers: `ModelConfig.vision_expert_token_ids`); generated tokens never do,
                  as in transformers' generate
    embeds        image index -> its placeholder embeddings, made the first time a prefill chunk
                  covers any of its placeholders (chunked prefill may split an image across
                  steps) and dropped once the prefill has passed the image's last placeholder

One step's tokens of one request, the rows they fill, and where image embeddings go:

    prompt   ... T T S P P P P E T T ...          (S / E start / end markers, P placeholders)
    chunk            [start ......... end)
    rows             r  r+1 ...
    image_rows             ^ ^ ^ ^   <- embeds[offset - item.offset ...]

Images are decoded (PIL) and processed by transformers' ERNIE-4.5-VL image processor (PIL
backend), whose patch grid must equal the one the request was built with (`item.grid_thw`);
then the vision tower and resampler run on all images a step needs at once.
Not thread-safe: the runner's step thread owns it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from engine.models.ernie4_5_vl_moe import Ernie4_5_VLMoeForConditionalGeneration, Grid, MultiModalBatch
from engine.multimodal import (
    MultiModalItem,
    VisionGeometry,
    geometry_from_preprocessor_config,
    image_grid,
    mrope_delta,
    mrope_positions,
)
from engine.request import Request
from engine.scheduler import ScheduledRequest

# preprocessor_config.json keys passed to transformers' image processor as they are
_PROCESSOR_KEYS = (
    "image_mean",
    "image_std",
    "rescale_factor",
    "do_rescale",
    "do_normalize",
    "do_convert_rgb",
    "resample",
)


class MultiModalInputError(ValueError):
    """An image cannot be turned into model inputs (no pixels, undecodable, another grid).

    `request_ids` names the requests whose images failed (empty when raised outside a step):
    the engine fails those requests alone and runs the others on the next step."""

    def __init__(self, message: str, request_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.request_ids = tuple(request_ids)


class ImagePreprocessor:
    """Encoded images -> patches [P, C p^2] (float32) and their grids, as transformers makes them.

    The request's grid (`item.grid_thw`, computed by the prompt builder) is the truth. When this
    worker's own size rules give the same grid -- the default, and always when router and worker
    share their settings -- the image goes through the processor untouched (transformers'
    result exactly). When the prompt builder used other limits (the router's
    `--image-min-pixels` / `--image-max-pixels`), the image is first resized (RGB, the
    processor's resampling) to the request's grid in pixels, which the processor then keeps.
    """

    def __init__(self, geometry: VisionGeometry, preprocessor_config: Mapping[str, Any]) -> None:
        from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
            Ernie4_5_VLMoeImageProcessorPil,
        )

        self.geometry = geometry
        settings = {key: preprocessor_config[key] for key in _PROCESSOR_KEYS if key in preprocessor_config}

        def processor(min_pixels: int, max_pixels: int) -> Any:
            return Ernie4_5_VLMoeImageProcessorPil(
                **settings,
                size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                patch_size=geometry.patch_size,
                merge_size=geometry.merge_size,
                temporal_patch_size=1,  # an image is one frame; the resampler pairs it with itself
            )

        self.processor = processor(geometry.min_pixels, geometry.max_pixels)
        # Takes an image already sized to a whole grid as it is (its size rules never bind).
        self.exact_processor = processor(geometry.factor**2, 1 << 40)

    def __call__(self, items: Sequence[MultiModalItem]) -> tuple[Tensor, list[Grid]]:
        """Patches of all `items`, concatenated in order, and each one's grid (checked against the item's)."""
        patches: list[Tensor] = []
        grids: list[Grid] = []
        for item in items:
            pixels, grid = self._one(item)
            if grid != tuple(item.grid_thw):
                raise MultiModalInputError(
                    f"image {item.content_hash[:16]} makes a {grid} patch grid here but the request was built "
                    f"for {tuple(item.grid_thw)}: the prompt builder and this worker use other image settings "
                    f"(this worker: {self.geometry})"
                )
            patches.append(pixels)
            grids.append(grid)
        return torch.cat(patches), grids

    def _one(self, item: MultiModalItem) -> tuple[Tensor, Grid]:
        image = _decode(item)
        _, grid_h, grid_w = item.grid_thw
        try:
            own = image_grid(image.height, image.width, self.geometry)
        except ValueError as exc:
            raise MultiModalInputError(f"image {item.content_hash[:16]}: {exc}") from exc
        processor = self.processor
        merge = self.geometry.merge_size
        if own != tuple(item.grid_thw) and grid_h > 0 and grid_w > 0 and grid_h % merge == grid_w % merge == 0:
            size = (grid_w * self.geometry.patch_size, grid_h * self.geometry.patch_size)
            image = image.convert("RGB").resize(size, resample=self.processor.resample)
            processor = self.exact_processor
        out = processor(images=[image], return_tensors="pt")
        t, h, w = out["image_grid_thw"][0].tolist()
        return out["pixel_values"], (t, h, w)


def _decode(item: MultiModalItem) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not item.data:
        raise MultiModalInputError(
            f"image {item.content_hash[:16]} has no pixels here (a decode worker gets images without data), "
            "but its placeholders must be computed: the prompt was preempted or not prefilled elsewhere"
        )
    try:
        image = Image.open(io.BytesIO(item.data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise MultiModalInputError(f"image {item.content_hash[:16]} cannot be decoded: {exc}") from exc
    return image


@dataclass
class _RequestState:
    request: Request
    positions: Tensor  # [3, P] int64, CPU
    delta: int
    prompt_mask: Tensor  # [P] bool, CPU
    embeds: dict[int, Tensor] = field(default_factory=dict)  # image index -> [num_tokens, H]


@dataclass(frozen=True)
class VLStepInputs:
    positions: Tensor  # [T] int64 on the device: the t axis (every axis of a text token)
    batch: MultiModalBatch | None  # None: the step has text tokens only


class MultiModalInputs:
    """Builds a VL model's per-step inputs and keeps each request's positions and image embeddings."""

    def __init__(
        self,
        model: Ernie4_5_VLMoeForConditionalGeneration,
        preprocessor_config: Mapping[str, Any],
        device: torch.device,
    ) -> None:
        config = model.config
        if config.vision is None:
            raise ValueError("MultiModalInputs needs a VL model")
        self.model = model
        self.device = device
        self.merge_size = config.vision.spatial_merge_size
        default = VisionGeometry(patch_size=config.vision.patch_size, merge_size=self.merge_size)
        geometry = geometry_from_preprocessor_config(preprocessor_config, default)
        if (geometry.patch_size, geometry.merge_size) != (default.patch_size, default.merge_size):
            raise ValueError(
                f"preprocessor_config.json has patch_size {geometry.patch_size} and merge_size {geometry.merge_size} "
                f"but the vision tower takes {default.patch_size} and {default.merge_size}"
            )
        self.preprocess = ImagePreprocessor(geometry, preprocessor_config)
        self.vision_token_ids = torch.tensor(sorted(config.vision_expert_token_ids), dtype=torch.long)
        self._no_embeds = torch.empty(0, config.hidden_size, device=device)
        self._requests: dict[str, _RequestState] = {}

    @property
    def num_tracked_requests(self) -> int:
        return len(self._requests)

    def num_cached_images(self) -> int:
        """Images whose embeddings wait for the rest of their prefill."""
        return sum(len(state.embeds) for state in self._requests.values())

    def prepare(self, scheduled: Sequence[ScheduledRequest]) -> VLStepInputs:
        """This step's positions and multimodal batch; runs the vision tower for images it reaches first."""
        self._forget_finished()
        states = [self._state(item.request) for item in scheduled]
        self._encode_missing(scheduled, states)
        positions: list[Tensor] = []
        masks: list[Tensor] = []
        image_rows: list[Tensor] = []
        image_embeds: list[Tensor] = []
        row = 0
        for item, state in zip(scheduled, states, strict=True):
            start = item.request.num_computed_tokens
            end = start + item.num_new_tokens
            split = min(max(start, item.request.num_prompt_tokens), end)  # [start, split) prompt, [split, end) output
            positions.append(state.positions[:, start:split])
            masks.append(state.prompt_mask[start:split])
            for index, image in enumerate(item.request.mm_items):
                first, last = max(start, image.offset), min(split, image.end)
                if first < last:
                    image_rows.append(torch.arange(row + first - start, row + last - start))
                    image_embeds.append(state.embeds[index][first - image.offset : last - image.offset])
                if image.end <= end:
                    state.embeds.pop(index, None)  # the prefill is past this image
            positions.append((torch.arange(split, end) + state.delta).expand(3, -1))
            masks.append(torch.zeros(end - split, dtype=torch.bool))
            row += end - start
        flat = torch.cat(positions, dim=1).to(self.device)
        vision_mask = torch.cat(masks)
        if not image_rows and not bool(vision_mask.any()):
            return VLStepInputs(flat[0], None)
        batch = MultiModalBatch(
            positions=flat,
            vision_mask=vision_mask.to(self.device),
            image_rows=torch.cat(image_rows or [torch.empty(0, dtype=torch.long)]).to(self.device),
            image_embeds=torch.cat(image_embeds) if image_embeds else self._no_embeds,
        )
        return VLStepInputs(flat[0], batch)

    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None or state.request is not request:
            items, num_prompt = request.mm_items, request.num_prompt_tokens
            prompt = torch.tensor(request.prompt_token_ids, dtype=torch.long)
            state = _RequestState(
                request=request,
                positions=torch.tensor(mrope_positions(num_prompt, items, self.merge_size), dtype=torch.long),
                delta=mrope_delta(num_prompt, items, self.merge_size),
                prompt_mask=torch.isin(prompt, self.vision_token_ids),
            )
            self._requests[request.request_id] = state
        return state

    def _encode_missing(self, scheduled: Sequence[ScheduledRequest], states: Sequence[_RequestState]) -> None:
        """Run the vision tower once for every image this step reaches whose embeddings are not cached."""
        wanted: list[tuple[_RequestState, int, MultiModalItem]] = []
        for item, state in zip(scheduled, states, strict=True):
            start = item.request.num_computed_tokens
            end = min(start + item.num_new_tokens, item.request.num_prompt_tokens)
            for index, image in enumerate(item.request.mm_items):
                if image.offset < end and image.end > start and index not in state.embeds:
                    wanted.append((state, index, image))
        if not wanted:
            return
        # Preprocess request by request, so that a bad image names the request it fails.
        failures: dict[str, str] = {}
        patches: list[Tensor] = []
        grids: list[Grid] = []
        owners = {id(state): state for state, _, _ in wanted}  # in order, each request once
        for state in owners.values():
            images = [image for owner, _, image in wanted if owner is state]
            try:
                pixels, request_grids = self.preprocess(images)
            except MultiModalInputError as exc:
                failures[state.request.request_id] = str(exc)
                continue
            patches.append(pixels)
            grids.extend(request_grids)
        if failures:
            detail = "; ".join(f"{rid}: {message}" for rid, message in failures.items())
            raise MultiModalInputError(detail, request_ids=list(failures))
        embeds = self.model.encode_images(torch.cat(patches).to(self.device), grids)
        for (state, index, image), embed in zip(wanted, embeds, strict=True):
            if embed.shape[0] != image.num_tokens:
                raise MultiModalInputError(
                    f"image {image.content_hash[:16]} gives {embed.shape[0]} embeddings "
                    f"for {image.num_tokens} placeholders",
                    request_ids=[state.request.request_id],
                )
            state.embeds[index] = embed

    def _forget_finished(self) -> None:
        for request_id in [rid for rid, state in self._requests.items() if state.request.is_finished]:
            del self._requests[request_id]
