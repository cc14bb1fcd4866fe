"""Protobuf ↔ engine dataclasses, for the worker side and the router's validation. Torch-free.

Unset optional proto fields take the engine's defaults; values the engine does not support
(`min_p`, penalties) are refused rather than silently ignored.
"""

from __future__ import annotations

from engine.request import TokenLogprobs
from engine.sampling_params import SamplingParams, SamplingParamsError
from protos.pdserve.v1 import common_pb2

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


__all__ = [
    "FINISH_REASONS",
    "FINISH_REASON_NAMES",
    "SamplingParamsError",
    "logprobs_from_proto",
    "logprobs_to_proto",
    "sampling_from_proto",
    "sampling_to_proto",
]
