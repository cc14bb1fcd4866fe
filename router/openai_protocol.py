"""OpenAI request bodies → `GenerateRequest`s, and errors in OpenAI's shape. No I/O here.

What a body may hold follows OpenAI's chat completions and (legacy) completions APIs, plus the
extensions vLLM and FastDeploy users send for ERNIE (`top_k`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`, `repetition_penalty`,
`chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`, `request_id`,
`metadata.enable_thinking`). Unknown fields are ignored, as OpenAI-compatible servers do; a
known field of the wrong JSON type is a 400 whose `param` names it; a value the engine cannot
honour (`logit_bias`, `echo`, penalties other than neutral, JSON response formats) is a 400
rather than silently ignored.

Thinking mode: `chat_template_kwargs.enable_thinking` (vLLM's way) or
`metadata.enable_thinking` (FastDeploy's way; a bool or "true"/"false"), default on. It reaches
the chat template and switches the reasoning parser for the request.

Images: a chat message's `content` array may hold `{"type": "image_url", "image_url": {"url":
..., "detail": ...}}` parts (data: URLs or http(s) URLs) beside text parts; they become
`ChatMessage.content_parts`, one per array entry, so the router's errors name the OpenAI path
(`messages[0].content[1]`). Checking and fetching them is the router's (`router.media`).

Tool choice: `none` leaves the tools out of the prompt and does not parse calls; `auto`
(default) parses calls the model writes; `required` and a named function make the model write
one by opening the assistant turn with the start of a call (`<tool_call>{"name": "` or the whole
name up to `"arguments": `), a prefix the tool-call parser reads first. A named call also stops
at `</tool_call>` and runs with thinking off.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2

from engine.sampling_params import MAX_LOGPROBS
from protos.pdserve.v1 import common_pb2, generate_pb2
from router.tool_calls import TOOL_CALL_END, TOOL_CALL_START

MAX_N = 64
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ApiError(Exception):
    """Ends an HTTP request with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# gRPC status → (HTTP status, OpenAI error type, code): the one place the two front ends meet.
_STATUS_MAP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "duplicate_request_id"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.ABORTED: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error", "cancelled"),
}
_SAMPLING_PARAMS = {
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "min_tokens",
    "logprobs",
    "stop",
    "stop_token_ids",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
}


def error_from_status(
    code: grpc.StatusCode, message: str, param: str | None = None, error_code: str | None = None
) -> ApiError:
    """The HTTP error of a gRPC status. `param` / `error_code` when the caller knows them; else a
    message that starts with a sampling field's name names that field."""
    status, kind, default_code = _STATUS_MAP.get(code, (500, "server_error", None))
    if param is None:
        word = re.match(r"\w+", message)
        param = word.group(0) if word and word.group(0) in _SAMPLING_PARAMS else None
    return ApiError(status, message, type=kind, param=param, code=error_code or default_code)


# --------------------------------------------------------------------------------------------
# Typed field access
# --------------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _get(obj: dict, name: str, kinds: str, path: str = "") -> Any:
    """`obj[name]` if present and not null, checked against `kinds` ("string", "integer|null"...)."""
    value = obj.get(name)
    if value is None:
        return None
    allowed = kinds.split("|")
    if not any(_CHECKS[kind](value) for kind in allowed):
        where = f"{path}{name}"
        raise ApiError(
            400, f"'{where}' must be {' or '.join(allowed)}, got {_json_type(value)}", param=where, code="invalid_type"
        )
    return value


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


# --------------------------------------------------------------------------------------------
# Parsed request
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceSpec:
    """How the router shapes one choice's output."""

    thinking: bool = False  # run the reasoning parser
    parse_tools: bool = False
    tool_prefix: str = ""  # output the prompt already holds; the tool-call parser reads it first
    named_tool: bool = False  # a forced call: finish_reason stays "stop", as OpenAI does


@dataclass(frozen=True)
class ApiRequest:
    kind: str  # "chat" or "completion"
    id: str  # "chatcmpl-..." / "cmpl-...": the response id and X-Request-Id
    model: str
    stream: bool
    include_usage: bool
    n: int
    # One per choice, in choice order (prompt-major for batched completions).
    requests: list[generate_pb2.GenerateRequest] = field(default_factory=list)
    spec: ChoiceSpec = ChoiceSpec()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class ParseOptions:
    model_id: str
    has_reasoning_parser: bool = True


def new_request_id(kind: str, given: str | None = None) -> str:
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    if given:
        return given if given.startswith(prefix) else prefix + given
    return prefix + uuid.uuid4().hex


def parse_chat(body: dict, options: ParseOptions, request_id: str | None = None) -> ApiRequest:
    messages = _messages(body)
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    kwargs = dict(_get(body, "chat_template_kwargs", "object") or {})
    thinking = _enable_thinking(body, kwargs)
    chat = generate_pb2.ChatPrompt(messages=messages)
    add_prompt = _get(body, "add_generation_prompt", "boolean")
    continue_final = bool(_get(body, "continue_final_message", "boolean"))
    spec = ChoiceSpec(thinking=options.has_reasoning_parser and thinking and not continue_final)
    if tools and choice != "none":
        chat.tools.extend(tools)
        spec = ChoiceSpec(thinking=spec.thinking, parse_tools=True)
    if choice not in ("auto", "none"):
        if continue_final:
            raise _bad(
                "tool_choice", "tool_choice 'required' or a named function cannot be used with continue_final_message"
            )
        named = choice != "required"
        if named:  # the model writes only the arguments
            prefix = f'{TOOL_CALL_START}{{"name": {json.dumps(choice, ensure_ascii=False)}, "arguments": '
        else:  # the model writes the name and the arguments
            prefix = f'{TOOL_CALL_START}{{"name": "'
        chat.messages.append(generate_pb2.ChatMessage(role="assistant", content=prefix))
        continue_final, add_prompt = True, None
        if named:
            kwargs["enable_thinking"] = False
        spec = ChoiceSpec(thinking=False, parse_tools=True, tool_prefix=prefix, named_tool=named)
    if kwargs:
        chat.chat_template_kwargs.CopyFrom(_struct(kwargs, "chat_template_kwargs"))
    if add_prompt is not None:
        chat.add_generation_prompt = add_prompt
    chat.continue_final_message = continue_final
    logprobs = bool(_get(body, "logprobs", "boolean"))
    top = _get(body, "top_logprobs", "integer")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise _bad("top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}")
    if top and not logprobs:
        raise _bad("top_logprobs", "top_logprobs needs logprobs=true")
    sampling = _sampling(body, default_max_tokens=None)
    if logprobs:
        sampling.logprobs = top or 0
    if spec.named_tool:
        sampling.stop.append(TOOL_CALL_END)
    prompt = generate_pb2.GenerateRequest(chat=chat)
    return _finish(
        body,
        "chat",
        prompt_requests=[prompt],
        sampling=sampling,
        spec=spec,
        logprobs=logprobs,
        top_logprobs=top or 0,
        request_id=request_id,
    )


def parse_completion(body: dict, options: ParseOptions, request_id: str | None = None) -> ApiRequest:
    prompts = _completion_prompts(body)
    if _get(body, "echo", "boolean"):
        raise _bad("echo", "echo is not supported")
    if _get(body, "suffix", "string"):
        raise _bad("suffix", "suffix is not supported")
    n = _get(body, "n", "integer") or 1
    best_of = _get(body, "best_of", "integer")
    if best_of is not None and best_of != n:
        raise _bad("best_of", "best_of must equal n (candidates are not ranked)")
    top = _get(body, "logprobs", "integer")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise _bad("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {top}")
    sampling = _sampling(body, default_max_tokens=16)
    if top is not None:
        sampling.logprobs = top
    return _finish(
        body,
        "completion",
        prompt_requests=prompts,
        sampling=sampling,
        spec=ChoiceSpec(),
        logprobs=top is not None,
        top_logprobs=top or 0,
        request_id=request_id,
    )


def _finish(
    body: dict,
    kind: str,
    *,
    prompt_requests: list[generate_pb2.GenerateRequest],
    sampling: common_pb2.SamplingParams,
    spec: ChoiceSpec,
    logprobs: bool,
    top_logprobs: int,
    request_id: str | None,
) -> ApiRequest:
    """Common fields, then one GenerateRequest per choice (n per prompt, seeds seed + i)."""
    model = _get(body, "model", "string") or ""
    stream = bool(_get(body, "stream", "boolean"))
    stream_options = _get(body, "stream_options", "object")
    if stream_options is not None and not stream:
        raise _bad("stream_options", "stream_options needs stream=true")
    include_usage = bool(_get(stream_options or {}, "include_usage", "boolean", "stream_options."))
    n = _get(body, "n", "integer")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise _bad("n", f"n must be in [1, {MAX_N}], got {n}")
    _get(body, "user", "string")  # accepted (OpenAI's end-user id); only type-checked
    given = request_id or _get(body, "request_id", "string")
    api_id = new_request_id(kind, given)
    num_choices = len(prompt_requests) * n
    requests = []
    for p, prompt in enumerate(prompt_requests):
        for i in range(n):
            request = generate_pb2.GenerateRequest()
            request.CopyFrom(prompt)
            request.model = model
            request.sampling.CopyFrom(sampling)
            index = p * n + i
            request.request_id = api_id if num_choices == 1 else f"{api_id}-{index}"
            if sampling.HasField("seed"):
                request.sampling.seed = sampling.seed + i
            requests.append(request)
    return ApiRequest(
        kind=kind,
        id=api_id,
        model=model,
        stream=stream,
        include_usage=include_usage,
        n=n,
        requests=requests,
        spec=spec,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _sampling(body: dict, default_max_tokens: int | None) -> common_pb2.SamplingParams:
    """The sampling fields both endpoints share. Ranges are checked by the shared gRPC path."""
    msg = common_pb2.SamplingParams()
    max_tokens = _get(body, "max_completion_tokens", "integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", "integer")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is not None:
        if max_tokens < 1:
            raise _bad("max_tokens", f"max_tokens must be >= 1, got {max_tokens}")
        msg.max_tokens = max_tokens
    for name in ("temperature", "top_p"):
        value = _get(body, name, "number")
        if value is not None:
            if value < 0:
                raise _bad(name, f"{name} must be >= 0, got {value}")
            setattr(msg, name, value)
    top_k = _get(body, "top_k", "integer")
    if top_k is not None:
        if top_k < -1:
            raise _bad("top_k", f"top_k must be >= -1 (-1 or 0 disables it), got {top_k}")
        msg.top_k = max(top_k, 0)
    seed = _get(body, "seed", "integer")
    if seed is not None:
        if not -(1 << 63) <= seed < (1 << 63) - MAX_N:
            raise _bad("seed", f"seed must fit in 64 bits, got {seed}")
        msg.seed = seed
    min_tokens = _get(body, "min_tokens", "integer")
    if min_tokens is not None:
        if min_tokens < 0:
            raise _bad("min_tokens", f"min_tokens must be >= 0, got {min_tokens}")
        msg.min_tokens = min_tokens
    msg.stop.extend(_stop(body))
    for i, token in enumerate(_get(body, "stop_token_ids", "array") or []):
        if not _CHECKS["integer"](token) or not 0 <= token < 1 << 32:
            raise _bad(f"stop_token_ids[{i}]", f"stop_token_ids must hold token ids, got {token!r}")
        msg.stop_token_ids.append(token)
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        value = _get(body, name, "boolean")
        if value is not None:
            setattr(msg, name, value)
    _neutral_or_passed(body, msg)
    _check_unsupported(body)
    return msg


def _stop(body: dict) -> list[str]:
    stop = _get(body, "stop", "string|array")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise _bad(f"stop[{i}]", f"stop must hold non-empty strings, got {s!r}")
    return stops


def _neutral_or_passed(body: dict, msg: common_pb2.SamplingParams) -> None:
    """Penalties and min_p: neutral values are dropped; others reach the engine, which refuses
    what it does not support (a 400 naming the field)."""
    for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1), ("min_p", 0)):
        value = _get(body, name, "number")
        if value is not None and value != neutral:
            setattr(msg, name, value)


def _check_unsupported(body: dict) -> None:
    if _get(body, "logit_bias", "object"):
        raise _bad("logit_bias", "logit_bias is not supported")
    response_format = _get(body, "response_format", "object")
    if response_format is not None:
        kind = _get(response_format, "type", "string", "response_format.")
        if kind not in (None, "text"):
            raise _bad("response_format", f"response_format type {kind!r} is not supported (only 'text')")
    _get(body, "parallel_tool_calls", "boolean")


# --------------------------------------------------------------------------------------------
# Chat messages, tools, thinking
# --------------------------------------------------------------------------------------------


def _messages(body: dict) -> list[generate_pb2.ChatMessage]:
    raw = body.get("messages")
    if raw is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    raw = _get(body, "messages", "array")
    if not raw:
        raise _bad("messages", "'messages' must hold at least one message")
    return [_message(item, f"messages[{i}]") for i, item in enumerate(raw)]


def _message(item: Any, path: str) -> generate_pb2.ChatMessage:
    if not isinstance(item, dict):
        raise ApiError(400, f"'{path}' must be object, got {_json_type(item)}", param=path, code="invalid_type")
    role = _get(item, "role", "string", f"{path}.")
    if role not in _ROLES:
        raise _bad(f"{path}.role", f"'{path}.role' must be one of {', '.join(_ROLES)}, got {role!r}")
    content, parts = _content(item, f"{path}.")
    message = generate_pb2.ChatMessage(role=_ROLES[role], content=content, content_parts=parts)
    for name in ("name", "tool_call_id"):
        value = _get(item, name, "string", f"{path}.")
        if value is not None:
            setattr(message, name, value)
    reasoning = _get(item, "reasoning_content", "string", f"{path}.") or _get(item, "reasoning", "string", f"{path}.")
    if reasoning:
        message.reasoning_content = reasoning
    for j, call in enumerate(_get(item, "tool_calls", "array", f"{path}.") or []):
        message.tool_calls.append(_history_call(call, f"{path}.tool_calls[{j}]"))
    return message


def _content(item: dict, path: str) -> tuple[str, list[generate_pb2.ContentPart]]:
    """(text, []) for text content (parts joined); ("", parts) when any part is an image, the
    parts one for one with the array's entries, so `content_parts[j]` is `content[j]`."""
    content = _get(item, "content", "string|array", path)
    if content is None or isinstance(content, str):
        return content or "", []
    parts = []
    for k, part in enumerate(content):
        where = f"{path}content[{k}]"
        if isinstance(part, str):
            parts.append(generate_pb2.ContentPart(text=part))
            continue
        if not isinstance(part, dict):
            raise ApiError(400, f"'{where}' must be object, got {_json_type(part)}", param=where, code="invalid_type")
        kind = _get(part, "type", "string", f"{where}.") or "text"
        if kind == "text":
            parts.append(generate_pb2.ContentPart(text=_get(part, "text", "string", f"{where}.") or ""))
        elif kind == "image_url":
            parts.append(generate_pb2.ContentPart(image=_image_url(part, where)))
        else:
            raise _bad(f"{where}.type", f"content part type {kind!r} is not supported (text and image_url only)")
    if all(p.WhichOneof("part") == "text" for p in parts):
        return "".join(p.text for p in parts), []
    return "", parts


def _image_url(part: dict, where: str) -> generate_pb2.ImagePart:
    """`{"type": "image_url", "image_url": {"url": ..., "detail": ...}}` (or the URL as a string).
    The URL (data: or http(s)) is fetched and checked by the router (`router.media`)."""
    image_url = _get(part, "image_url", "string|object", f"{where}.")
    if image_url is None:
        raise ApiError(
            400, f"'{where}.image_url' is required", param=f"{where}.image_url", code="missing_required_parameter"
        )
    if isinstance(image_url, str):
        url, detail = image_url, None
    else:
        url = _get(image_url, "url", "string", f"{where}.image_url.")
        detail = _get(image_url, "detail", "string", f"{where}.image_url.")
    if not url:
        raise _bad(f"{where}.image_url.url", f"'{where}.image_url.url' is required")
    if detail not in (None, "auto", "low", "high"):
        raise _bad(f"{where}.image_url.detail", f"detail must be 'auto', 'low' or 'high', got {detail!r}")
    return generate_pb2.ImagePart(url=url, detail=detail or "")


def _history_call(call: Any, path: str) -> generate_pb2.ToolCall:
    if not isinstance(call, dict):
        raise ApiError(400, f"'{path}' must be object, got {_json_type(call)}", param=path, code="invalid_type")
    function = _get(call, "function", "object", f"{path}.") or {}
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return generate_pb2.ToolCall(
        id=_get(call, "id", "string", f"{path}.") or "",
        type=_get(call, "type", "string", f"{path}.") or "function",
        function=generate_pb2.FunctionCall(
            name=_get(function, "name", "string", f"{path}.function.") or "", arguments=arguments
        ),
    )


def _tools(body: dict) -> list[generate_pb2.Tool]:
    tools = []
    for i, tool in enumerate(_get(body, "tools", "array") or []):
        path = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ApiError(400, f"'{path}' must be object, got {_json_type(tool)}", param=path, code="invalid_type")
        kind = _get(tool, "type", "string", f"{path}.") or "function"
        if kind != "function":
            raise _bad(f"{path}.type", f"tool type {kind!r} is not supported (only 'function')")
        function = _get(tool, "function", "object", f"{path}.")
        name = _get(function or {}, "name", "string", f"{path}.function.")
        if not name:
            raise _bad(f"{path}.function.name", f"'{path}.function.name' is required")
        definition = generate_pb2.FunctionDefinition(
            name=name, description=_get(function, "description", "string", f"{path}.function.") or ""
        )
        parameters = _get(function, "parameters", "object", f"{path}.function.")
        if parameters is not None:
            definition.parameters.CopyFrom(_struct(parameters, f"{path}.function.parameters"))
        tools.append(generate_pb2.Tool(type="function", function=definition))
    return tools


def _tool_choice(body: dict, tools: list[generate_pb2.Tool]) -> str:
    """ "auto", "none", "required", or the name of the function to call."""
    choice = _get(body, "tool_choice", "string|object")
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise _bad("tool_choice", f"tool_choice must be 'auto', 'none', 'required' or a function, got {choice!r}")
        if choice == "required" and not tools:
            raise _bad("tool_choice", "tool_choice 'required' needs tools")
        return choice
    function = _get(choice, "function", "object", "tool_choice.") or {}
    name = _get(function, "name", "string", "tool_choice.function.")
    if not name:
        raise _bad("tool_choice", "tool_choice must name a function: {'type': 'function', 'function': {'name': ...}}")
    if name not in {tool.function.name for tool in tools}:
        raise _bad("tool_choice", f"tool_choice names function {name!r}, which is not in tools")
    return name


def _enable_thinking(body: dict, kwargs: dict) -> bool:
    """vLLM's chat_template_kwargs.enable_thinking wins over FastDeploy's metadata.enable_thinking;
    the latter is copied into the template's kwargs. Default: on."""
    value = kwargs.get("enable_thinking")
    if value is None:
        metadata = _get(body, "metadata", "object") or {}
        value = metadata.get("enable_thinking")
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if value is not None:
            if not isinstance(value, bool):
                raise ApiError(
                    400,
                    f"'metadata.enable_thinking' must be boolean, got {_json_type(value)}",
                    param="metadata.enable_thinking",
                    code="invalid_type",
                )
            kwargs["enable_thinking"] = value
    elif not isinstance(value, bool):
        raise ApiError(
            400,
            f"'chat_template_kwargs.enable_thinking' must be boolean, got {_json_type(value)}",
            param="chat_template_kwargs.enable_thinking",
            code="invalid_type",
        )
    return value is not False


def _struct(value: dict, path: str) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    try:
        struct.update(value)
    except (ValueError, TypeError) as exc:
        raise _bad(path, f"'{path}' cannot be represented: {exc}") from None
    return struct


# --------------------------------------------------------------------------------------------
# Completions prompts
# --------------------------------------------------------------------------------------------


def _completion_prompts(body: dict) -> list[generate_pb2.GenerateRequest]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    prompt = _get(body, "prompt", "string|array")
    if isinstance(prompt, str):
        return [generate_pb2.GenerateRequest(text=prompt)]
    if not prompt:
        raise _bad("prompt", "'prompt' must not be empty")
    if all(_CHECKS["integer"](t) for t in prompt):
        return [_token_prompt(prompt, "prompt")]
    out = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            out.append(generate_pb2.GenerateRequest(text=item))
        elif isinstance(item, list) and item and all(_CHECKS["integer"](t) for t in item):
            out.append(_token_prompt(item, f"prompt[{i}]"))
        else:
            raise _bad(f"prompt[{i}]", f"'prompt[{i}]' must be a string or a non-empty array of token ids")
    return out


def _token_prompt(ids: list[int], path: str) -> generate_pb2.GenerateRequest:
    if any(not 0 <= t < 1 << 32 for t in ids):
        raise _bad(path, f"'{path}' holds a negative or too large token id")
    return generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(token_ids=ids))
