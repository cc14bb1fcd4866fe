"""The OpenAI-compatible HTTP API, served by the router process next to gRPC (aiohttp).

    POST /v1/chat/completions   chat (streaming with server-sent events, or one JSON body)
    POST /v1/completions        text / token-id prompts, batched prompts
    GET  /v1/models             the served model (and GET /v1/models/{id})
    GET  /health                200 while a decode worker can take requests, else 503

Every generation goes through `GenerationService.run`, the entry the gRPC `Generate` RPC uses:
one call per choice (`n` choices, and one per prompt of a batched completion), merged here.
Per choice the output text runs through the reasoning parser (thinking on) and the tool-call
parser (tools offered), then is shaped into OpenAI chunks or a response body:

    run() messages ──▶ ReasoningParser ──reasoning──────────────────────────▶ reasoning_content
                                       ──answer──▶ ToolCallParser ──text───▶ content
                                                                  ──calls──▶ tool_calls

A request fails with an HTTP status (see `router.openai_protocol.error_from_status`) until every
choice has been admitted and has sent its first message; a stream's headers go out only then, so
a full queue is a 429 rather than a stream that ends in an error. A failure after that ends the
stream with an OpenAI error event, then `data: [DONE]`. A client that disconnects cancels its
choices, which aborts them on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from cluster.convert import FINISH_REASON_NAMES
from protos.pdserve.v1 import common_pb2, generate_pb2
from router.auth import ApiKeys
from router.openai_protocol import (
    ApiError,
    ApiRequest,
    ChoiceSpec,
    ParseOptions,
    error_from_status,
    parse_chat,
    parse_completion,
)
from router.output_parsers import OutputParsers
from router.server import GenerationService, RequestError
from router.tool_calls import ToolCallDelta

log = logging.getLogger(__name__)

_OPEN_PATHS = ("/health",)


# --------------------------------------------------------------------------------------------
# One choice's output
# --------------------------------------------------------------------------------------------


@dataclass
class ChoiceDelta:
    """What one `run()` message adds to one choice, after the parsers."""

    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChoiceState:
    """Runs one choice's messages through its parsers and counts its tokens."""

    def __init__(self, index: int, spec: ChoiceSpec) -> None:
        self.index = index
        self.spec = spec
        self.parsers = OutputParsers(spec.thinking, spec.parse_tools, spec.tool_prefix)
        self.num_prompt_tokens = 0
        self.num_completion_tokens = 0
        self.num_cached_tokens = 0
        self.text_offset = 0  # completions logprobs: where the next token's text starts

    def feed(self, message: generate_pb2.GenerateResponse) -> ChoiceDelta:
        if message.HasField("metadata"):
            self.num_prompt_tokens = message.metadata.num_prompt_tokens
        finished = message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        reasoning, content, calls = self.parsers.feed(message.text, finished)
        delta = ChoiceDelta(self.index, reasoning, content, calls, list(message.logprobs))
        if finished:
            self._finish(message, delta)
        return delta

    def _finish(self, message: generate_pb2.GenerateResponse, delta: ChoiceDelta) -> None:
        reason = FINISH_REASON_NAMES.get(message.finish_reason, "error")
        called = self.parsers.num_calls > 0
        if reason == "stop" and called and not self.spec.named_tool:
            reason = "tool_calls"
        delta.finish_reason = reason
        kind = message.WhichOneof("matched_stop")
        delta.stop_reason = getattr(message, kind) if kind else None
        if message.HasField("usage"):
            self.num_prompt_tokens = message.usage.prompt_tokens or self.num_prompt_tokens
            self.num_completion_tokens = message.usage.completion_tokens
            self.num_cached_tokens = message.usage.cached_prompt_tokens


def usage_body(choices: list[ChoiceState], n: int) -> dict:
    """OpenAI usage: the prompt counted once per prompt (not per choice), outputs summed."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt = sum(c.num_prompt_tokens for c in firsts)
    completion = sum(c.num_completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.num_cached_tokens for c in firsts)},
    }


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(entries: list[common_pb2.TokenLogprobs]) -> list[dict]:
    def one(lp: common_pb2.Logprob) -> dict:
        return {"token": lp.token, "logprob": _logprob(lp.logprob), "bytes": list(lp.token.encode())}

    return [{**one(e.sampled), "top_logprobs": [one(t) for t in e.top]} for e in entries]


def completion_logprobs(state: ChoiceState, entries: list[common_pb2.TokenLogprobs]) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        out["tokens"].append(entry.sampled.token)
        out["token_logprobs"].append(_logprob(entry.sampled.logprob))
        out["top_logprobs"].append({t.token: _logprob(t.logprob) for t in entry.top})
        out["text_offset"].append(state.text_offset)
        state.text_offset += len(entry.sampled.token)
    return out


def tool_call_chunks(calls: tuple[ToolCallDelta, ...]) -> list[dict]:
    """Streamed `tool_calls` entries; consecutive pieces of one call are merged."""
    out: list[dict] = []
    for piece in calls:
        if out and out[-1]["index"] == piece.index and not piece.id:
            out[-1]["function"]["arguments"] += piece.arguments
            continue
        entry: dict = {"index": piece.index, "function": {"arguments": piece.arguments}}
        if piece.id:
            entry.update(id=piece.id, type="function")
            entry["function"]["name"] = piece.name
        out.append(entry)
    return out


@dataclass
class ChoiceTotal:
    """A non-streamed choice: the concatenation of its deltas."""

    reasoning: str = ""
    content: str = ""
    calls: dict[int, dict] = field(default_factory=dict)
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.reasoning += delta.reasoning
        self.content += delta.content
        self.logprobs.extend(delta.logprobs)
        for piece in delta.tool_calls:
            call = self.calls.setdefault(
                piece.index, {"id": piece.id, "type": "function", "function": {"name": piece.name, "arguments": ""}}
            )
            call["function"]["arguments"] += piece.arguments
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


# --------------------------------------------------------------------------------------------
# Fan-in of one request's choices
# --------------------------------------------------------------------------------------------


class _Choices:
    """Runs every choice of one API request in its own task and merges their messages in arrival
    order. `close()` cancels whatever still runs (which aborts it on the workers)."""

    _END = object()

    def __init__(self, service: GenerationService, requests: list[generate_pb2.GenerateRequest]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(service, i, r)) for i, r in enumerate(requests)]

    async def _pump(self, service: GenerationService, index: int, request: generate_pb2.GenerateRequest) -> None:
        try:
            async for message in service.run(request):
                self._queue.put_nowait((index, message))
            self._queue.put_nowait((index, self._END))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # RequestError, or a bug: either ends the whole request
            self._queue.put_nowait((index, exc))

    async def messages(self) -> AsyncIterator[tuple[int, generate_pb2.GenerateResponse]]:
        """(choice index, message) until every choice has ended; raises the first failure."""
        num_running = len(self._tasks)
        while num_running:
            index, item = await self._queue.get()
            if item is self._END:
                num_running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return error_from_status(exc.code, exc.message, exc.param, exc.error_code)
    log.error("request failed: %r", exc, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")


# --------------------------------------------------------------------------------------------
# The HTTP server
# --------------------------------------------------------------------------------------------


class OpenAIServer:
    """Routes and middlewares; owned by the router's asyncio loop."""

    def __init__(
        self,
        service: GenerationService,
        keys: ApiKeys | None = None,
        *,
        reasoning_parser: bool = True,
        is_serving: Callable[[], bool] = lambda: True,
    ) -> None:
        self.service = service
        self.keys = keys or ApiKeys()
        self.options = ParseOptions(model_id=service.config.model_id, has_reasoning_parser=reasoning_parser)
        self.is_serving = is_serving
        self.created = int(time.time())

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=self.service.max_body_bytes)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        return app

    # ------------------------------------------------------------------------- middlewares
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as err:
            return _error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            return _error_response(ApiError(exc.status, exc.text or exc.reason, code=code))
        except Exception as exc:  # a bug: still an OpenAI-shaped 500, with the traceback in the log
            return _error_response(_api_error(exc))

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path not in _OPEN_PATHS and not self.keys.check_header(request.headers.get("Authorization")):
            raise ApiError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        return await handler(request)

    # ------------------------------------------------------------------------- small routes
    async def health(self, request: web.Request) -> web.Response:
        if self.is_serving():
            return web.json_response({"status": "ok"})
        raise ApiError(503, "no decode worker is available", type="server_error", code="service_unavailable")

    def _model_card(self) -> dict:
        config = self.service.config
        return {
            "id": config.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "pdserve",
            "root": config.model_id,
            "parent": None,
            "max_model_len": config.max_model_len,
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.service.config.model_id:
            raise ApiError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return web.json_response(self._model_card())

    # ------------------------------------------------------------------------- generation
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        return await self._generate(request, parse_chat(body, self.options, request.headers.get("X-Request-Id")))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        return await self._generate(request, parse_completion(body, self.options, request.headers.get("X-Request-Id")))

    async def _generate(self, request: web.Request, api: ApiRequest) -> web.StreamResponse:
        states = [ChoiceState(i, api.spec) for i in range(len(api.requests))]
        choices = _Choices(self.service, api.requests)
        try:
            if api.stream:
                return await self._stream(request, api, states, choices)
            return await self._complete(api, states, choices)
        finally:
            await choices.close()

    async def _complete(self, api: ApiRequest, states: list[ChoiceState], choices: _Choices) -> web.Response:
        totals = [ChoiceTotal() for _ in states]
        try:
            async for index, message in choices.messages():
                totals[index].add(states[index].feed(message))
        except Exception as exc:
            raise _api_error(exc) from None
        shape = self._chat_choice if api.kind == "chat" else self._completion_choice
        body = {
            "id": api.id,
            "object": "chat.completion" if api.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.service.config.model_id,
            "choices": [shape(api, states[i], total) for i, total in enumerate(totals)],
            "usage": usage_body(states, api.n),
        }
        return web.json_response(body, headers={"X-Request-Id": api.id}, dumps=_dumps)

    def _chat_choice(self, api: ApiRequest, state: ChoiceState, total: ChoiceTotal) -> dict:
        calls = [total.calls[i] for i in sorted(total.calls)]
        message: dict = {
            "role": "assistant",
            "content": total.content if total.content or not calls else None,
            "reasoning_content": total.reasoning if api.spec.thinking else None,
        }
        if calls:
            message["tool_calls"] = calls
        return {
            "index": state.index,
            "message": message,
            "logprobs": {"content": chat_logprobs(total.logprobs)} if api.logprobs else None,
            "finish_reason": total.finish_reason,
            "stop_reason": total.stop_reason,
        }

    def _completion_choice(self, api: ApiRequest, state: ChoiceState, total: ChoiceTotal) -> dict:
        return {
            "index": state.index,
            "text": total.content,
            "logprobs": completion_logprobs(state, total.logprobs) if api.logprobs else None,
            "finish_reason": total.finish_reason,
            "stop_reason": total.stop_reason,
        }

    async def _stream(
        self, request: web.Request, api: ApiRequest, states: list[ChoiceState], choices: _Choices
    ) -> web.StreamResponse:
        writer = _SseWriter(api, self.service.config.model_id)
        backlog: list[tuple[int, generate_pb2.GenerateResponse]] = []
        started: set[int] = set()
        try:
            async for index, message in choices.messages():
                if writer.response is None:  # not every choice admitted yet: hold the headers
                    backlog.append((index, message))
                    started.add(index)
                    if len(started) < len(states):
                        continue
                    await writer.open(request, states)
                    for i, m in backlog:
                        await writer.delta(states[i], states[i].feed(m))
                    continue
                await writer.delta(states[index], states[index].feed(message))
        except ConnectionResetError:  # the client left; its choices are cancelled on the way out
            return writer.response
        except Exception as exc:
            error = _api_error(exc)
            if writer.response is None:
                raise error from None
            await writer.event(error.body())
        if writer.response is None:  # every choice ended before sending anything (not expected)
            await writer.open(request, states)
        if api.include_usage:
            await writer.event(writer.chunk([], usage=usage_body(states, api.n)))
        await writer.done()
        return writer.response


class _SseWriter:
    """Writes one streamed response: `data: {chunk}` events, then `data: [DONE]`."""

    def __init__(self, api: ApiRequest, model: str) -> None:
        self.api = api
        self.model = model
        self.created = int(time.time())
        self.response: web.StreamResponse | None = None

    async def open(self, request: web.Request, states: list[ChoiceState]) -> None:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": self.api.id}
        )
        await response.prepare(request)
        self.response = response
        if self.api.kind == "chat":  # OpenAI opens each choice with the role
            for state in states:
                await self.event(self.chunk([self._choice(state.index, {"role": "assistant", "content": ""})]))

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        kind = "chat.completion.chunk" if self.api.kind == "chat" else "text_completion"
        body = {"id": self.api.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if self.api.include_usage:
            body["usage"] = usage
        return body

    def _choice(self, index: int, delta: dict, **extra) -> dict:
        base = {"index": index, "logprobs": None, "finish_reason": None}
        if self.api.kind == "chat":
            return {**base, "delta": delta, **extra}
        return {**base, **delta, **extra}

    async def delta(self, state: ChoiceState, delta: ChoiceDelta) -> None:
        if self.api.kind == "chat":
            body: dict = {}
            if delta.reasoning:
                body["reasoning_content"] = delta.reasoning
            if delta.content:
                body["content"] = delta.content
            if delta.tool_calls:
                body["tool_calls"] = tool_call_chunks(delta.tool_calls)
            logprobs = {"content": chat_logprobs(delta.logprobs)} if self.api.logprobs and delta.logprobs else None
        else:
            body = {"text": delta.content} if delta.content or delta.finish_reason else {}
            logprobs = completion_logprobs(state, delta.logprobs) if self.api.logprobs and delta.logprobs else None
        if not body and logprobs is None and delta.finish_reason is None:
            return
        if self.api.kind == "completion":
            body.setdefault("text", "")
        choice = self._choice(state.index, body, logprobs=logprobs, finish_reason=delta.finish_reason)
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        await self.event(self.chunk([choice]))

    async def event(self, body: dict) -> None:
        assert self.response is not None
        await self.response.write(b"data: " + _dumps(body).encode() + b"\n\n")

    async def done(self) -> None:
        assert self.response is not None
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()


# --------------------------------------------------------------------------------------------
# Helpers and start-up
# --------------------------------------------------------------------------------------------


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _error_response(err: ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return web.json_response(err.body(), status=err.status, headers=headers)


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()  # aiohttp enforces client_max_size: 413 above it
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: a free port); returns the runner (for cleanup) and the port."""
    # handler_cancellation: a client that disconnects cancels its handler, hence its requests.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, bound


async def stop_http(runner: web.AppRunner) -> None:
    with contextlib.suppress(Exception):
        await runner.cleanup()
