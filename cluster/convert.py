"""Protobuf ↔ engine dataclasses, for the worker side and the router's validation. Torch-free.

Unset optional proto fields take the engine's defaults; values the engine does not support
(`min_p`, penalties) are refused rather than silently ignored.

Images (`MultiModalItem`): the router sends each item with its bytes; a worker keeps them only
where it prefills the prompt (`mm_items_from_proto(..., keep_data=False)` on a decode worker
whose prompt a peer prefills: it forwards the request, bytes included, and its own engine gets
the items without them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.multimodal import IMAGE, MultiModalItem, check_items, content_hash
from engine.request import TokenLogprobs
from engine.sampling_params import SamplingParams, SamplingParamsError
from protos.pdserve.v1 import common_pb2, worker_pb2

FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}
FINISH_REASON_NAMES = {value: name for name, value in FINISH_REASONS.items()}

_UNSUPPORTED = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def sampling_from_proto(msg: common_pb2.SamplingParams, default_max_tokens: int = 16) -> SamplingParams:
    """Raises SamplingParamsError naming the offending field."""
    for name in _UNSUPPORTED:
        if msg.HasField(name):
            raise SamplingParamsError(f"{name} is not supported by this server")
    kwargs: dict = {
        "max_tokens": msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
        "min_tokens": msg.min_tokens,
        "stop": tuple(msg.stop),
        "stop_token_ids": tuple(msg.stop_token_ids),
        "ignore_eos": msg.ignore_eos,
        "include_stop_str_in_output": msg.include_stop_str_in_output,
    }
    if msg.HasField("temperature"):
        kwargs["temperature"] = round(float(msg.temperature), 6)
    if msg.HasField("top_p"):
        kwargs["top_p"] = round(float(msg.top_p), 6)
    if msg.HasField("top_k"):
        kwargs["top_k"] = msg.top_k
    if msg.HasField("seed"):
        kwargs["seed"] = msg.seed
    if msg.HasField("logprobs"):
        kwargs["logprobs"] = msg.logprobs
    if msg.HasField("skip_special_tokens"):
        kwargs["skip_special_tokens"] = msg.skip_special_tokens
    return SamplingParams(**kwargs)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=max(params.top_k, 0),
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def logprobs_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        sampled=common_pb2.Logprob(token_id=lp.token_id, logprob=lp.logprob),
        top=[common_pb2.Logprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprobs_from_proto(msg: common_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(
        token_id=msg.sampled.token_id,
        logprob=msg.sampled.logprob,
        top=tuple((p.token_id, p.logprob) for p in msg.top),
    )


_MODALITIES = {IMAGE: worker_pb2.MODALITY_IMAGE}
_MODALITY_NAMES = {value: name for name, value in _MODALITIES.items()}


class MultiModalError(ValueError):
    """Items a worker cannot use (bad modality or placement, bytes that do not match their hash)."""


def mm_items_to_proto(items: Iterable[MultiModalItem]) -> list[worker_pb2.MultiModalItem]:
    return [
        worker_pb2.MultiModalItem(
            modality=_MODALITIES[item.modality],
            data=item.data,
            content_hash=item.content_hash,
            grid_t=item.grid_thw[0],
            grid_h=item.grid_thw[1],
            grid_w=item.grid_thw[2],
            offset=item.offset,
            num_tokens=item.num_tokens,
        )
        for item in items
    ]


def mm_items_from_proto(
    msgs: Sequence[worker_pb2.MultiModalItem], num_prompt_tokens: int, keep_data: bool = True
) -> tuple[MultiModalItem, ...]:
    """The engine's items. `keep_data=False` drops the bytes (a decode worker whose prompt a peer
    prefills). Raises MultiModalError naming the item: unknown modality, items out of order or
    outside the prompt, or (when kept) bytes whose sha256 is not their content_hash."""
    items = []
    for index, msg in enumerate(msgs):
        modality = _MODALITY_NAMES.get(msg.modality)
        if modality is None:
            raise MultiModalError(f"mm_items[{index}]: unknown modality {msg.modality}")
        if keep_data and content_hash(msg.data) != msg.content_hash:
            raise MultiModalError(f"mm_items[{index}]: data does not match content_hash {msg.content_hash[:16]}...")
        try:
            item = MultiModalItem(
                modality,
                msg.data if keep_data else b"",
                msg.content_hash,
                (msg.grid_t, msg.grid_h, msg.grid_w),
                msg.offset,
                msg.num_tokens,
            )
        except ValueError as exc:
            raise MultiModalError(f"mm_items[{index}]: {exc}") from None
        items.append(item)
    try:
        check_items(items, num_prompt_tokens)
    except ValueError as exc:
        raise MultiModalError(str(exc)) from None
    return tuple(items)


__all__ = [
    "FINISH_REASONS",
    "FINISH_REASON_NAMES",
    "MultiModalError",
    "SamplingParamsError",
    "logprobs_from_proto",
    "logprobs_to_proto",
    "mm_items_from_proto",
    "mm_items_to_proto",
    "sampling_from_proto",
    "sampling_to_proto",
]
