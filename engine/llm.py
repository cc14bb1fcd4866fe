"""Offline inference in the spirit of vLLM's `LLM`: load once, generate for a batch of prompts.

from engine import LLM, SamplingParams
llm = LLM(model="tiny")
for out in llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0)):
    print(out.text, out.finish_reason)

A VL model (`tiny-vl`, an ERNIE-4.5-VL folder) also takes prompts with images, as dicts:

    llm.generate([{"prompt": "Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> What is it?",
                   "images": [png_bytes]}])
    llm.generate([{"prompt_token_ids": ids, "images": [ImageInput(data, height, width)]}])

The prompt holds one image placeholder token per image (what the chat template writes); each is
expanded into the image's run of placeholders (`engine.multimodal.expand_placeholders`). An image
is its encoded bytes (PNG, JPEG, ...; the pixel size is read with PIL) or an `ImageInput`.
`chat` takes image parts (`{"type": "image", "image": bytes | ImageInput}`) in message content.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.config import CacheConfig, SchedulerConfig
from engine.llm_engine import InvalidRequestError, LLMEngine
from engine.multimodal import ImageInput, MultiModalItem, expand_placeholders
from engine.request import Request, RequestStatus, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from engine.parallel import ExpertParallel

# text, token ids, or a dict: {"prompt": text} or {"prompt_token_ids": ids}, plus "images" (VL models)
Prompt = str | Sequence[int] | Mapping[str, Any]


@dataclass(frozen=True)
class CompletionOutput:
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprobs, ...] | None
    num_cached_tokens: int
    stop_reason: int | str | None = None


class _TextTracker:
    """Detokenizes one request incrementally and finds stop strings in its text."""

    def __init__(self, llm_engine: LLMEngine, request: Request) -> None:
        params = request.sampling_params
        self.detok = IncrementalDetokenizer(llm_engine.tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.params = params
        self.text = ""

    def push(self, token_id: int) -> str | None:
        """Add a token; returns the stop string matched in the text, if any (and trims the text)."""
        self.text += self.detok.push(token_id)
        for stop in self.params.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[: at + len(stop)] if self.params.include_stop_str_in_output else self.text[:at]
                return stop
        return None


class LLM:
    """Synchronous batch generation on one engine (CPU or one GPU; or, with `expert_parallel`,
    rank 0 of a group whose other ranks run `follower_loop(llm.engine.runner)`)."""

    def __init__(
        self,
        model: str = "tiny",
        *,
        device: str = "cpu",
        dtype: str | None = None,
        seed: int = 0,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 128,
        max_model_len: int | None = None,
        expert_parallel: ExpertParallel | None = None,
        moe_backend: str = "auto",
        enforce_eager: bool = False,
    ) -> None:
        self.engine = LLMEngine.from_model(
            model,
            device=device,
            dtype=dtype,
            seed=seed,
            cache=CacheConfig(
                block_size=block_size, num_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
            ),
            expert_parallel=expert_parallel,
            moe_backend=moe_backend,
            enforce_eager=enforce_eager,
        )
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """One result per prompt, in order. Invalid prompts raise InvalidRequestError before any runs."""
        batch = self._as_batch(prompts)
        param_list = self._as_params(params, len(batch))
        requests: list[Request] = []
        trackers: dict[str, _TextTracker] = {}
        for prompt, p in zip(batch, param_list, strict=True):
            ids, items = self._encode(prompt)
            requests.append(self.engine.make_request(f"offline-{next(self._ids)}", ids, p, mm_items=items))
        for request in requests:
            self.engine.submit(request)
            trackers[request.request_id] = _TextTracker(self.engine, request)
        while self.engine.has_unfinished:
            for out in self.engine.step():
                stop = trackers[out.request_id].push(out.new_token_ids[0])
                if stop is not None and not out.finished:
                    out.request.stop_reason = stop
                    self.engine.finish(out.request, RequestStatus.FINISHED_STOPPED)
                elif stop is not None:
                    out.request.stop_reason = stop
        return [self._result(r, trackers[r.request_id]) for r in requests]

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **template_kwargs) -> CompletionOutput:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        images = [part["image"] for part in _content_parts(messages) if part.get("type") == "image" and "image" in part]
        return self.generate({"prompt": prompt, "images": images}, params)[0]

    def _encode(self, prompt: Prompt) -> tuple[list[int], tuple[MultiModalItem, ...]]:
        """A prompt's token ids and its images (placeholders expanded)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), ()
        if not isinstance(prompt, Mapping):
            return list(prompt), ()
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        elif isinstance(prompt.get("prompt"), str):
            ids = self.tokenizer.encode(prompt["prompt"])
        else:
            raise InvalidRequestError("a dict prompt needs 'prompt' (text) or 'prompt_token_ids'")
        images = [_image_input(image) for image in prompt.get("images") or ()]
        if not images:
            return ids, ()
        model = self.engine.loaded.config
        geometry = self.engine.runtime.vision_geometry
        if model.image_token_id is None or geometry is None:
            raise InvalidRequestError(f"model {self.engine.runtime.model_id!r} does not accept images")
        try:
            return expand_placeholders(ids, images, model.image_token_id, geometry)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None

    @staticmethod
    def _result(request: Request, tracker: _TextTracker) -> CompletionOutput:
        want_logprobs = request.sampling_params.logprobs is not None
        return CompletionOutput(
            prompt_token_ids=tuple(request.prompt_token_ids),
            token_ids=tuple(request.output_token_ids),
            text=tracker.text,
            finish_reason=request.finish_reason,
            logprobs=tuple(request.output_logprobs) if want_logprobs else None,
            num_cached_tokens=request.num_cached_tokens,
            stop_reason=request.stop_reason,
        )

    @staticmethod
    def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, Mapping)):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        if not isinstance(prompts, Sequence) or not prompts:
            raise InvalidRequestError("prompts must be a string, a list of token ids, or a non-empty list of those")
        return list(prompts)

    @staticmethod
    def _as_params(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise InvalidRequestError(f"got {len(params)} sampling params for {n} prompts")
        return list(params)


def _image_input(image: ImageInput | bytes) -> ImageInput:
    """An image as `expand_placeholders` takes it: encoded bytes get their pixel size from PIL."""
    if isinstance(image, ImageInput):
        return image
    if not isinstance(image, (bytes, bytearray)):
        raise InvalidRequestError(f"an image must be encoded bytes or an ImageInput, got {type(image).__name__}")
    from PIL import Image, UnidentifiedImageError

    try:
        width, height = Image.open(io.BytesIO(image)).size
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequestError(f"an image cannot be decoded: {exc}") from None
    return ImageInput(bytes(image), height, width)


def _content_parts(messages: list[dict]) -> list[dict]:
    """Every mapping part of every message's list content, in conversation order."""
    return [
        part
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, Mapping)
    ]
