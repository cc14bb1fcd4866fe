"""An in-process router front end over a scripted "cluster": the real validation, chat template,
tokenization, admission queue and metadata of `GenerationService`, with the workers replaced by a
script of output text pieces. Lets the HTTP tests pin exact outputs (the tiny model's are noise)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from engine.tokenizer import Tokenizer
from protos.pdserve.v1 import common_pb2, generate_pb2
from router.auth import ApiKeys
from router.media import vision_spec
from router.openai_api import OpenAIServer, start_http, stop_http
from router.server import GenerationService, RouterConfig
from router.workers import WorkerPool

Script = Callable[[object], list[str]]


class ScriptedService(GenerationService):
    """Each request's output is `script(prepared)`: text pieces, one message (one token) each."""

    def __init__(
        self,
        script: Script | list[str] = (),
        finish=common_pb2.FINISH_REASON_STOP,
        reasoning_parser: bool = False,  # gRPC chat output parsing (the HTTP API parses on its own)
        **config,
    ) -> None:
        settings = {"model_id": "tiny", "max_model_len": 1024, "wait_for_workers_s": 0.05, **config}
        router_config = RouterConfig(**settings)
        tokenizer = Tokenizer.for_model(router_config.model_id)  # tiny, or tiny-vl for a preset that sees images
        vision = vision_spec(router_config.model_id, tokenizer, router_config.media)
        super().__init__(router_config, tokenizer, WorkerPool([]), vision=vision, reasoning_parser=reasoning_parser)
        self.prepared: list = []  # each request as the workers would get it (ids, images)
        self.script = script if callable(script) else (lambda req, pieces=list(script): pieces)
        self.finish = finish
        self.prompts: list[str] = []  # each request's prompt, as the workers would see it
        self.gate: asyncio.Event | None = None  # when set, outputs wait for it after the first piece
        self.num_cancelled = 0

    async def _relay(self, req, deadline, record) -> AsyncIterator[generate_pb2.GenerateResponse]:
        self.prompts.append(self.tokenizer.decode(req.prompt_ids, skip_special_tokens=False))
        self.prepared.append(req)
        pieces = self.script(req)
        try:
            for i, piece in enumerate(pieces):
                if i == 1 and self.gate is not None:
                    await self.gate.wait()
                message = generate_pb2.GenerateResponse(token_ids=[100 + i], text=piece)
                if req.sampling.HasField("logprobs"):
                    top = [common_pb2.Logprob(token_id=100 + k, logprob=-1.0 - k, token=f"t{k}") for k in range(2)]
                    sampled = common_pb2.Logprob(token_id=100 + i, logprob=-0.5, token=piece)
                    message.logprobs.append(common_pb2.TokenLogprobs(sampled=sampled, top=top[: req.sampling.logprobs]))
                yield message
        except asyncio.CancelledError:
            self.num_cancelled += 1
            raise
        yield generate_pb2.GenerateResponse(
            finish_reason=self.finish,
            usage=common_pb2.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(pieces)),
        )


@contextlib.asynccontextmanager
async def serving(service: GenerationService, keys: ApiKeys | None = None, **options) -> AsyncIterator[str]:
    """Serve the HTTP API over `service` on a free loopback port; yields the base URL."""
    app = OpenAIServer(service, keys, **options).make_app()
    runner, port = await start_http(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await stop_http(runner)
