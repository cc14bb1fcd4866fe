"""A small Python client for the public gRPC API, sync and async.

    with Client("127.0.0.1:50051") as client:
        result = client.generate("Hello", max_tokens=16, temperature=0)
        print(result.text, result.finish_reason)
        for chunk in client.stream("Hello"):
            print(chunk.text, end="", flush=True)

`AsyncClient` has the same methods as coroutines / async iterators.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import struct_pb2

from cluster.convert import FINISH_REASON_NAMES
from protos.pdserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class GenerateResult:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    usage: common_pb2.Usage | None = None

    def add(self, message: generate_pb2.GenerateResponse) -> None:
        if message.HasField("metadata"):
            self.request_id = message.metadata.request_id
        self.text += message.text
        self.token_ids.extend(message.token_ids)
        self.logprobs.extend(message.logprobs)
        if message.finish_reason:
            self.finish_reason = FINISH_REASON_NAMES.get(message.finish_reason, "unknown")
            self.usage = message.usage
            kind = message.WhichOneof("matched_stop")
            self.matched_stop = getattr(message, kind) if kind else None


def build_request(
    prompt: Prompt,
    *,
    model: str = "",
    request_id: str = "",
    chat_template_kwargs: dict | None = None,
    **sampling,
) -> generate_pb2.GenerateRequest:
    """`prompt` is text, a list of token ids, or chat messages (`[{"role": ..., "content": ...}]`)."""
    request = generate_pb2.GenerateRequest(
        model=model, request_id=request_id, sampling=common_pb2.SamplingParams(**sampling)
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        request.chat.messages.extend(generate_pb2.ChatMessage(**m) for m in prompt)
        if chat_template_kwargs:
            kwargs = struct_pb2.Struct()
            kwargs.update(chat_template_kwargs)
            request.chat.chat_template_kwargs.CopyFrom(kwargs)
    else:
        request.token_ids.token_ids.extend(prompt)
    return request


class Client:
    def __init__(self, address: str, timeout: float | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = generate_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, prompt: Prompt, **kwargs) -> Iterator[generate_pb2.GenerateResponse]:
        yield from self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout)

    def generate(self, prompt: Prompt, **kwargs) -> GenerateResult:
        result = GenerateResult()
        for message in self.stream(prompt, **kwargs):
            result.add(message)
        return result

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(generate_pb2.AbortRequest(request_id=request_id), timeout=self.timeout).aborted

    def models(self) -> list[generate_pb2.ModelInfo]:
        return list(self.stub.ListModels(generate_pb2.ListModelsRequest(), timeout=self.timeout).models)


class AsyncClient:
    def __init__(self, address: str, timeout: float | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = generate_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, prompt: Prompt, **kwargs) -> AsyncIterator[generate_pb2.GenerateResponse]:
        async for message in self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout):
            yield message

    async def generate(self, prompt: Prompt, **kwargs) -> GenerateResult:
        result = GenerateResult()
        async for message in self.stream(prompt, **kwargs):
            result.add(message)
        return result

    async def abort(self, request_id: str) -> bool:
        response = await self.stub.Abort(generate_pb2.AbortRequest(request_id=request_id), timeout=self.timeout)
        return response.aborted
