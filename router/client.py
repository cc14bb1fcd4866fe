"""A small Python client for the public gRPC API, sync and async.

    with Client("127.0.0.1:50051") as client:
        result = client.generate("Hello", max_tokens=16, temperature=0)
        print(result.text, result.finish_reason)
        for chunk in client.stream("Hello"):
            print(chunk.text, end="", flush=True)

`AsyncClient` has the same methods as coroutines / async iterators.

Images (vision models): chat messages take OpenAI-style content arrays, whose image parts are
`{"type": "image_url", "image_url": {"url": ...}}` or `{"type": "image", "image": <bytes or URL>}`;
a text or token-id prompt takes `images=[...]` (bytes or URLs), one placeholder token per image:

    client.generate([{"role": "user", "content": [{"type": "image", "image": png_bytes},
                                                   {"type": "text", "text": "What is this?"}]}])
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import struct_pb2

from cluster.convert import FINISH_REASON_NAMES
from protos.pdserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc

Prompt = str | Sequence[int] | Sequence[dict]
Image = bytes | str  # the encoded file, or a data: / http(s) URL


@dataclass
class GenerateResult:
    request_id: str = ""
    text: str = ""  # the answer (the whole output when the router parses no reasoning / tools)
    reasoning_text: str = ""  # chat with thinking: the model's reasoning
    tool_calls: list[generate_pb2.ToolCallDelta] = field(default_factory=list)  # the pieces, in order
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    usage: common_pb2.Usage | None = None

    def add(self, message: generate_pb2.GenerateResponse) -> None:
        if message.HasField("metadata"):
            self.request_id = message.metadata.request_id
        self.text += message.text
        self.reasoning_text += message.reasoning_text
        self.tool_calls.extend(message.tool_calls)
        self.token_ids.extend(message.token_ids)
        self.logprobs.extend(message.logprobs)
        if message.finish_reason:
            self.finish_reason = FINISH_REASON_NAMES.get(message.finish_reason, "unknown")
            self.usage = message.usage
            kind = message.WhichOneof("matched_stop")
            self.matched_stop = getattr(message, kind) if kind else None


def image_part(image: Image, detail: str = "") -> generate_pb2.ImagePart:
    """An image as the API takes it: the encoded file (bytes) or a URL (str)."""
    if isinstance(image, bytes):
        return generate_pb2.ImagePart(data=image, detail=detail)
    return generate_pb2.ImagePart(url=image, detail=detail)


def content_part(part: str | dict) -> generate_pb2.ContentPart:
    """One entry of an OpenAI-style content array (see the module doc)."""
    if isinstance(part, str):
        return generate_pb2.ContentPart(text=part)
    kind = part.get("type", "text")
    if kind == "text":
        return generate_pb2.ContentPart(text=part["text"])
    if kind == "image_url":
        url = part["image_url"]
        if isinstance(url, dict):
            return generate_pb2.ContentPart(image=image_part(url["url"], url.get("detail", "")))
        return generate_pb2.ContentPart(image=image_part(url))
    if kind == "image":
        return generate_pb2.ContentPart(image=image_part(part["image"], part.get("detail", "")))
    raise ValueError(f"content part type {kind!r} is not one of text, image_url, image")


def chat_message(message: dict) -> generate_pb2.ChatMessage:
    content = message.get("content")
    if isinstance(content, list):
        fields = {k: v for k, v in message.items() if k != "content"}
        return generate_pb2.ChatMessage(**fields, content_parts=[content_part(p) for p in content])
    return generate_pb2.ChatMessage(**message)


def build_request(
    prompt: Prompt,
    *,
    model: str = "",
    request_id: str = "",
    chat_template_kwargs: dict | None = None,
    images: Sequence[Image] = (),
    **sampling,
) -> generate_pb2.GenerateRequest:
    """`prompt` is text, a list of token ids, or chat messages (`[{"role": ..., "content": ...}]`).
    `images` go with a text or token-id prompt (a chat's images are in its messages)."""
    request = generate_pb2.GenerateRequest(
        model=model,
        request_id=request_id,
        sampling=common_pb2.SamplingParams(**sampling),
        images=[image_part(image) for image in images],
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        request.chat.messages.extend(chat_message(m) for m in prompt)
        if chat_template_kwargs:
            kwargs = struct_pb2.Struct()
            kwargs.update(chat_template_kwargs)
            request.chat.chat_template_kwargs.CopyFrom(kwargs)
    else:
        request.token_ids.token_ids.extend(prompt)
    return request


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying the router's API key (`router.auth`), or None without a key."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class Client:
    def __init__(self, address: str, timeout: float | None = None, api_key: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = generate_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout
        self.metadata = _auth_metadata(api_key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, prompt: Prompt, **kwargs) -> Iterator[generate_pb2.GenerateResponse]:
        yield from self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout, metadata=self.metadata)

    def generate(self, prompt: Prompt, **kwargs) -> GenerateResult:
        result = GenerateResult()
        for message in self.stream(prompt, **kwargs):
            result.add(message)
        return result

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(
            generate_pb2.AbortRequest(request_id=request_id), timeout=self.timeout, metadata=self.metadata
        ).aborted

    def models(self) -> list[generate_pb2.ModelInfo]:
        request = generate_pb2.ListModelsRequest()
        return list(self.stub.ListModels(request, timeout=self.timeout, metadata=self.metadata).models)


class AsyncClient:
    def __init__(self, address: str, timeout: float | None = None, api_key: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = generate_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout
        self.metadata = _auth_metadata(api_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, prompt: Prompt, **kwargs) -> AsyncIterator[generate_pb2.GenerateResponse]:
        request = build_request(prompt, **kwargs)
        async for message in self.stub.Generate(request, timeout=self.timeout, metadata=self.metadata):
            yield message

    async def generate(self, prompt: Prompt, **kwargs) -> GenerateResult:
        result = GenerateResult()
        async for message in self.stream(prompt, **kwargs):
            result.add(message)
        return result

    async def abort(self, request_id: str) -> bool:
        response = await self.stub.Abort(
            generate_pb2.AbortRequest(request_id=request_id), timeout=self.timeout, metadata=self.metadata
        )
        return response.aborted
