"""Streaming clients that timestamp every token: the gRPC API and the OpenAI HTTP API.

Each `send` fills one `RequestRecord`: when the request went out, when each message that
carried tokens arrived (and how many tokens it carried), when the stream ended, how many prompt
and output tokens the server counted, and the status. Timestamps are `time.monotonic()`
(CLOCK_MONOTONIC: one clock for every process of the machine, so several client processes can
share a start time).

    grpc    pdserve.v1.Generation/Generate; token counts per message are exact (`token_ids`);
            prompts go as token ids, text or chat messages (images as image parts of the last
            chat message); a pool of channels (separate HTTP/2 connections) so one
            connection's stream limit is not the bottleneck
    openai  POST /v1/completions (token-id or text prompts) or /v1/chat/completions (chat,
            images), `stream: true` with `stream_options.include_usage`; a chunk that carries
            text counts as one token for timing, the usage chunk gives the exact output count
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field

import grpc

from load_tests.workload import RequestSpec

BACKENDS = ("grpc", "openai", "openai-chat")


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are monotonic seconds."""

    index: int
    prompt_len: int  # the workload's count; replaced by the server's when it reports one
    max_tokens: int
    scheduled_at: float = 0.0  # when the arrival process wanted it sent
    sent_at: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # messages that carried >= 1 token
    chunk_tokens: list[int] = field(default_factory=list)
    ended_at: float = 0.0
    num_output_tokens: int | None = None  # the server's count, when it gave one
    status: str = "NOT_SENT"  # OK, a gRPC status name, HTTP_<code>, INCOMPLETE, CLIENT_ERROR
    error: str = ""
    request_id: str = ""

    @property
    def success(self) -> bool:
        return self.status == "OK"

    @property
    def output_len(self) -> int:
        return self.num_output_tokens if self.num_output_tokens is not None else sum(self.chunk_tokens)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "request_id": self.request_id,
            "prompt_len": self.prompt_len,
            "max_tokens": self.max_tokens,
            "scheduled_at": self.scheduled_at,
            "sent_at": self.sent_at,
            "chunk_times": self.chunk_times,
            "chunk_tokens": self.chunk_tokens,
            "ended_at": self.ended_at,
            "num_output_tokens": self.num_output_tokens,
            "status": self.status,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RequestRecord:
        return cls(**data)


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "grpc"  # grpc | openai | openai-chat
    target: str = "127.0.0.1:50051"  # host:port (gRPC) or http://host:port (HTTP)
    model: str = ""
    api_key: str | None = None
    num_channels: int = 4  # gRPC connections per client process
    request_timeout_s: float = 600.0
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: tuple[tuple[str, object], ...] = ()  # extra JSON fields / sampling fields

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.kind!r}")
        if self.num_channels < 1 or not self.request_timeout_s > 0:
            raise ValueError("num_channels must be >= 1 and the request timeout > 0")


def make_backend(config: BackendConfig) -> GrpcBackend | OpenAIBackend:
    return GrpcBackend(config) if config.kind == "grpc" else OpenAIBackend(config)


class GrpcBackend:
    """Async `Generate` streams over a small pool of channels. Use inside one event loop."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: itertools.cycle | None = None
        self._metadata = (("authorization", f"Bearer {config.api_key}"),) if config.api_key else None

    async def open(self) -> None:
        from protos.pdserve.v1 import generate_pb2_grpc

        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
        self._channels = [
            grpc.aio.insecure_channel(self.config.target, options=options) for _ in range(self.config.num_channels)
        ]
        self._stubs = itertools.cycle([generate_pb2_grpc.GenerationStub(c) for c in self._channels])
        # Connect up front, so the first requests do not pay for the handshakes.
        with contextlib.suppress(TimeoutError, grpc.RpcError):
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self._channels)), timeout=5)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        from router.client import build_request

        prompt = spec.prompt
        if spec.images:  # image_url parts in the last chat message, as the chat backend sends them
            try:
                prompt = _chat_messages(spec)
            except ValueError as exc:
                record.status, record.error = "CLIENT_ERROR", str(exc)
                return
        config = self.config
        sampling: dict = {
            "max_tokens": spec.max_tokens,
            "temperature": config.temperature,
            "ignore_eos": config.ignore_eos,
        }
        sampling.update(dict(config.extra_body))
        request = build_request(prompt, model=config.model, **sampling)
        assert self._stubs is not None, "open() first"
        record.sent_at = time.monotonic()
        call = next(self._stubs).Generate(request, timeout=config.request_timeout_s, metadata=self._metadata)
        try:
            async for message in call:
                now = time.monotonic()
                if message.token_ids:
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(len(message.token_ids))
                if message.HasField("metadata"):
                    record.request_id = message.metadata.request_id
                    record.prompt_len = message.metadata.num_prompt_tokens or record.prompt_len
                if message.finish_reason:
                    record.num_output_tokens = message.usage.completion_tokens or sum(record.chunk_tokens)
            record.status = "OK"
        except grpc.aio.AioRpcError as exc:
            record.status, record.error = exc.code().name, exc.details() or ""
        except asyncio.CancelledError:
            call.cancel()
            record.status, record.error = "INCOMPLETE", "cancelled at the run's time limit"
            raise
        finally:
            record.ended_at = time.monotonic()


class OpenAIBackend:
    """Async streamed completions / chat completions over one aiohttp session."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._session = None
        base = config.target if "://" in config.target else f"http://{config.target}"
        path = "/v1/chat/completions" if config.kind == "openai-chat" else "/v1/completions"
        self.url = base.rstrip("/") + path

    async def open(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def body(self, spec: RequestSpec) -> dict:
        config = self.config
        body: dict = {
            "model": config.model or "default",
            "max_tokens": spec.max_tokens,
            "temperature": config.temperature,
            "ignore_eos": config.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if config.kind == "openai-chat":
            body["messages"] = _chat_messages(spec)
        elif isinstance(spec.prompt, list) and spec.prompt and isinstance(spec.prompt[0], dict):
            raise ValueError("chat prompts need --backend openai-chat")
        else:
            body["prompt"] = spec.prompt
        body.update(dict(config.extra_body))
        return body

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        import aiohttp

        assert self._session is not None, "open() first"
        body = self.body(spec)
        record.sent_at = time.monotonic()
        try:
            async with self._session.post(self.url, json=body) as response:
                record.request_id = response.headers.get("X-Request-Id", "")
                if response.status != 200:
                    record.status, record.error = f"HTTP_{response.status}", _error_text(await response.text())
                    return
                await self._read_stream(response, record)
        except (aiohttp.ClientError, TimeoutError) as exc:
            record.status, record.error = (
                "CONNECTION_ERROR" if isinstance(exc, aiohttp.ClientError) else "TIMEOUT",
                repr(exc),
            )
        except asyncio.CancelledError:
            record.status, record.error = "INCOMPLETE", "cancelled at the run's time limit"
            raise
        finally:
            record.ended_at = time.monotonic()

    async def _read_stream(self, response, record: RequestRecord) -> None:
        buffer = b""
        async for data in response.content.iter_any():
            now = time.monotonic()
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                payload = event.strip()
                if not payload.startswith(b"data:"):
                    continue
                payload = payload[5:].strip()
                if payload == b"[DONE]":
                    record.status = "OK"
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    error = chunk["error"]
                    record.status, record.error = f"STREAM_{error.get('code') or 'error'}", error.get("message", "")
                    return
                if _has_output(chunk):
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(1)
                if chunk.get("usage"):
                    record.num_output_tokens = chunk["usage"].get("completion_tokens")
                    record.prompt_len = chunk["usage"].get("prompt_tokens") or record.prompt_len
        record.status, record.error = "INCOMPLETE", "the stream ended without [DONE]"


def _has_output(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    return False


def _chat_messages(spec: RequestSpec) -> list[dict]:
    if isinstance(spec.prompt, str):
        messages = [{"role": "user", "content": spec.prompt}]
    elif spec.prompt and isinstance(spec.prompt[0], dict):
        messages = [dict(m) for m in spec.prompt]  # type: ignore[arg-type]
    else:
        raise ValueError("the chat backend needs text or chat prompts (--prompt-format text|chat)")
    if spec.images:
        text = messages[-1]["content"]
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in spec.images]
        messages[-1]["content"] = [*parts, {"type": "text", "text": text}]
    return messages


def _error_text(body: str) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return json.loads(body)["error"]["message"]
    return body[:200]
