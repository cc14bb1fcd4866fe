"""The public gRPC API (`pdserve.v1.Generation`): validate, tokenize, route, relay, retry.

One `Generate` call:

    validate + tokenize ──▶ admission (bounded queue) ──▶ pick decode D (+ prefill P)
        ──▶ D.Decode(request, prefill_peer=P) stream ──▶ detokenize, stop strings ──▶ client
    failure before the first token ──▶ another pair (up to `max_attempts`)
    failure after some tokens     ──▶ another decode worker continues from prompt + tokens so far
    client gone / Abort / deadline ──▶ the D call is cancelled, D aborts and frees (and tells P)

Both public front ends share one entry, `GenerationService.run(request, deadline_s)`: the gRPC
`Generate` RPC streams its messages, and the OpenAI-compatible HTTP API (`router.openai_api`)
shapes them into chat/completion responses. `run` raises `RequestError(code, message)` for
anything that ends a request before it streams; each front end maps the status once.

Images (vision models): `_prepare` collects a request's image parts (`GenerateRequest.images`
for text / token prompts, `ChatMessage.content_parts` for chat), loads and checks each one
(`router.media`: limits, URL fetching with the SSRF guard, decoding), renders the chat template
with one placeholder per image and expands each placeholder into the image's run of placeholder
tokens (`engine.multimodal.expand_placeholders`). The items ride in the `EngineRequest` with
their bytes (D forwards them to P), and their content hashes enter the prompt's block hashes.
An image refused is INVALID_ARGUMENT naming its part (`RequestError.param`).

The router process never imports torch: it uses the engine's torch-free tokenizer, configs,
multimodal contract and sampling validation (`engine.tokenizer`, `engine.config`,
`engine.multimodal`, `engine.sampling_params`), which a test checks. This is a deliberate
widening of DESIGN's import table: tokenization must match the workers' exactly, so both import
one implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format

from cluster.convert import (
    FINISH_REASON_NAMES,
    SamplingParamsError,
    mm_items_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)
from cluster.metrics import RouterMetrics
from engine.block_manager import prompt_block_hashes
from engine.multimodal import ImageInput, MultiModalItem, block_extra_keys, expand_placeholders
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from protos.pdserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc, worker_pb2
from router.media import ImageLoader, MediaConfig, MediaError, VisionSpec
from router.output_parsers import OutputParsers
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)
request_log = logging.getLogger("pdserve.requests")  # one line per finished request

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED}


@dataclass(frozen=True)
class RouterConfig:
    model_id: str
    max_model_len: int
    block_size: int = 16
    default_max_tokens: int = 256
    # Prompts at most this long are prefilled on the decode worker (conditional disaggregation).
    local_prefill_max_tokens: int = 0
    max_attempts: int = 3
    max_inflight: int = 256
    max_queued: int = 1024
    max_request_bytes: int = 4 << 20
    # How long a request may wait for any decode worker to become available.
    wait_for_workers_s: float = 10.0
    # Image limits and URL policy (used when the model sees images).
    media: MediaConfig = field(default_factory=MediaConfig)

    def __post_init__(self) -> None:
        for name in ("max_model_len", "block_size", "default_max_tokens", "max_attempts", "max_inflight"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"router config {name} must be a positive integer, got {value!r}")
        if self.local_prefill_max_tokens < 0 or self.max_queued < 0:
            raise ValueError("local_prefill_max_tokens and max_queued must be >= 0")


class RequestError(Exception):
    """Ends a Generate call with a status and a message naming the problem. `param` names the
    request part at fault (OpenAI's error `param`, e.g. `messages[0].content[1]`) and
    `error_code` is OpenAI's error `code`, when the status alone does not say it."""

    def __init__(
        self, code: grpc.StatusCode, message: str, param: str | None = None, error_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.error_code = error_code

    @classmethod
    def from_media(cls, err: MediaError) -> RequestError:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, str(err), param=err.where, error_code=err.code)


@dataclass
class _Prepared:
    request_id: str
    prompt_ids: list[int]
    sampling: common_pb2.SamplingParams
    params_max_tokens: int
    stops: tuple[str, ...]
    include_stop: bool
    skip_special: bool
    mm_items: tuple[MultiModalItem, ...] = ()
    block_hashes: list[int] = field(default_factory=list)  # the prompt's, as hints for the workers


@dataclass
class RequestRecord:
    """What the router learns about one request while relaying it: metrics and the end-of-request log.

    Never holds prompt text (only counts), so the log line is safe by default.
    """

    request_id: str
    num_prompt_tokens: int
    start: float
    decode_worker: str = ""
    prefill_worker: str = ""  # "" = prefilled on the decode worker
    num_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float | None = None
    last_token_at: float | None = None
    num_retries: int = 0
    num_migrations: int = 0
    aborted: bool = False
    status: str = "OK"

    def log_fields(self, now: float) -> dict:
        return {
            "request_id": self.request_id,
            "status": self.status,
            "decode_worker": self.decode_worker,
            "prefill_worker": self.prefill_worker or "local",
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_tokens,
            "queue_ms": round(self.queue_s * 1000, 2),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 2),
            "duration_ms": round((now - self.start) * 1000, 2),
            "retries": self.num_retries,
            "migrations": self.num_migrations,
        }


class GenerationService(generate_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        config: RouterConfig,
        tokenizer: Tokenizer,
        pool: WorkerPool,
        metrics: RouterMetrics | None = None,
        log_json: bool = False,
        vision: VisionSpec | None = None,
        reasoning_parser: bool = False,
    ) -> None:
        self.config = config
        # gRPC chat streams split thinking into reasoning_text (the HTTP API parses on its own side).
        self.reasoning_parser = reasoning_parser
        self.tokenizer = tokenizer
        self.pool = pool
        self.vision = vision  # None: a text-only model, which refuses images
        self.images = None if vision is None else ImageLoader(config.media, vision.geometry)
        self.metrics = metrics
        self.log_json = log_json
        self._records: dict[str, RequestRecord] = {}
        self._slots = asyncio.Semaphore(config.max_inflight)
        self._num_queued = 0
        self._calls: dict[str, asyncio.Task] = {}  # request id -> the task relaying it
        self._transfer_ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 20)
        self.num_retries = 0
        self.num_migrations = 0
        self._num_inflight = 0

    @property
    def max_body_bytes(self) -> int:
        """Largest request either front end reads: `max_request_bytes`, plus room for the most
        images a request may carry (base64 in data: URLs) when the model sees images."""
        if self.vision is None:
            return self.config.max_request_bytes
        media = self.config.media
        return self.config.max_request_bytes + media.max_images_per_request * media.max_image_wire_bytes

    async def close(self) -> None:
        if self.images is not None:
            await self.images.close()

    # ----------------------------------------------------------------------------- RPCs
    async def ListModels(self, request, context):
        info = generate_pb2.ModelInfo(
            id=self.config.model_id,
            max_model_len=self.config.max_model_len,
            owned_by="pdserve",
            root=self.config.model_id,
        )
        return generate_pb2.ListModelsResponse(models=[info])

    async def Abort(self, request, context):
        return generate_pb2.AbortResponse(aborted=self.abort(request.request_id))

    async def Generate(self, request, context):
        parsers = self.output_parsers(request)
        try:
            async for message in self.run(request, context.time_remaining()):
                if parsers is not None:
                    _parse_into(message, parsers)
                yield message
        except RequestError as err:
            await context.abort(err.code, err.message)

    def output_parsers(self, request: generate_pb2.GenerateRequest) -> OutputParsers | None:
        """For a gRPC chat request: the thinking goes to `reasoning_text` when the model has a
        reasoning parser and the request did not turn thinking off (`chat_template_kwargs.
        enable_thinking`), and tool calls to `tool_calls` when tools are offered. Text and token-id
        prompts come back as the model wrote them."""
        if request.WhichOneof("prompt") != "chat":
            return None
        chat = request.chat
        kwargs = json_format.MessageToDict(chat.chat_template_kwargs)
        thinking = (
            self.reasoning_parser
            and kwargs.get("enable_thinking", True) is not False
            and not chat.continue_final_message
        )
        parse_tools = len(chat.tools) > 0
        return OutputParsers(thinking, parse_tools) if thinking or parse_tools else None

    # ----------------------------------------------------------------------------- shared entry
    async def run(
        self, request: generate_pb2.GenerateRequest, deadline_s: float | None = None
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """Validate, admit, route and relay one request: the stream `Generate` returns.

        Raises RequestError (validation, queue full, no worker, deadline) instead of streaming.
        Cancelling the consuming task cancels the request everywhere; `abort(request_id)` ends
        the stream with FINISH_REASON_ABORT instead. `deadline_s` is the time left, None for none.

        The request runs in a task of its own that feeds a queue, so that `abort` cancels only
        that task: never the caller's, which may be inside gRPC's or aiohttp's own send.
        """
        try:
            prepared = await self._prepare(request)
        except RequestError as err:
            if self.metrics is not None:
                self.metrics.requests.labels(self.config.model_id, err.code.name).inc()
            raise
        if prepared.request_id in self._calls:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"request id {prepared.request_id!r} is in flight")
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(self._produce(prepared, deadline, queue))
        self._calls[prepared.request_id] = task
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._calls.pop(prepared.request_id, None)
            task.cancel()  # the consumer left early: the relay cancels its worker call

    async def _produce(self, prepared: _Prepared, deadline: float | None, queue: asyncio.Queue) -> None:
        """Relay one request into `queue`: its messages, then None (or an exception)."""
        record = RequestRecord(prepared.request_id, len(prepared.prompt_ids), time.monotonic())
        self._records[prepared.request_id] = record
        try:
            async for message in self._generate(prepared, deadline, record):
                queue.put_nowait(message)
        except asyncio.CancelledError:
            # abort() (or a consumer that left, which reads no more): end with ABORT.
            record.status = "CANCELLED"
            queue.put_nowait(generate_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_ABORT))
        except RequestError as exc:
            record.status = exc.code.name
            queue.put_nowait(exc)
        except Exception as exc:  # a bug the front end reports
            record.status = "INTERNAL"
            queue.put_nowait(exc)
        finally:
            self._records.pop(prepared.request_id, None)
            self._finish_record(record)
        queue.put_nowait(None)

    def _finish_record(self, record: RequestRecord) -> None:
        now = time.monotonic()
        fields = record.log_fields(now)
        if self.log_json:
            request_log.info(json.dumps(fields))
        else:
            request_log.info(" ".join(f"{k}={v}" for k, v in fields.items()))
        metrics = self.metrics
        if metrics is None:
            return
        model = self.config.model_id
        metrics.requests.labels(model, record.status).inc()
        if record.status == "OK":
            metrics.e2e.labels(model).observe(now - record.start)
        if record.status == "CANCELLED":
            metrics.cancellations.labels(model, "abort" if record.aborted else "client").inc()
        elif record.status == "DEADLINE_EXCEEDED":
            metrics.cancellations.labels(model, "deadline").inc()

    def _on_tokens(self, record: RequestRecord, count: int) -> None:
        now = time.monotonic()
        metrics, model = self.metrics, self.config.model_id
        if record.ttft_s is None:
            record.ttft_s = now - record.start
            if metrics is not None:
                metrics.ttft.labels(model).observe(record.ttft_s)
        elif metrics is not None and record.last_token_at is not None:
            gap = (now - record.last_token_at) / count
            for _ in range(count):
                metrics.itl.labels(model).observe(gap)
        record.last_token_at = now
        record.num_tokens += count
        if metrics is not None:
            metrics.tokens.labels(model).inc(count)

    def abort(self, request_id: str) -> bool:
        """Abort an in-flight request (its stream ends with ABORT); False if none has this id."""
        task = self._calls.get(request_id)
        if task is None:
            return False
        if request_id in self._records:
            self._records[request_id].aborted = True
        task.cancel()
        return True

    # ----------------------------------------------------------------------------- validation
    async def _prepare(self, request: generate_pb2.GenerateRequest) -> _Prepared:
        parts = image_parts(request)
        num_bytes = request.ByteSize() - sum(part.ByteSize() for _, part in parts)  # images have their own limit
        if num_bytes > self.config.max_request_bytes:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request of {num_bytes} bytes is too large")
        if request.model and request.model != self.config.model_id:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"model {request.model!r} not served here (serving {self.config.model_id!r})"
            )
        self._check_image_parts(parts)
        prompt_ids, items = await self._place_images(self._tokenize(request), parts)
        if not prompt_ids:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt_ids if t >= vocab]
        if bad:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"token ids outside the vocabulary [0, {vocab}): {bad[:8]}"
            )
        max_len = self.config.max_model_len
        if len(prompt_ids) >= max_len:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt has {len(prompt_ids)} tokens but the context holds {max_len}",
            )
        try:
            # Unset max_tokens: the configured default, or what is left of the context if less.
            default_max_tokens = min(self.config.default_max_tokens, max_len - len(prompt_ids))
            params = sampling_from_proto(request.sampling, default_max_tokens=default_max_tokens)
        except SamplingParamsError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if len(prompt_ids) + params.max_tokens > max_len:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_tokens={params.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds the context "
                f"of {max_len}",
            )
        block_size = self.config.block_size
        hashes = prompt_block_hashes(
            prompt_ids, block_size, extra_keys=block_extra_keys(items, len(prompt_ids), block_size)
        )
        return _Prepared(
            request_id=request.request_id or f"req-{uuid.uuid4().hex[:16]}",
            prompt_ids=prompt_ids,
            sampling=sampling_to_proto(params),
            params_max_tokens=params.max_tokens,
            stops=params.stop,
            include_stop=params.include_stop_str_in_output,
            skip_special=params.skip_special_tokens,
            mm_items=items,
            block_hashes=[int.from_bytes(h[:8], "big") for h in hashes],
        )

    def _check_image_parts(self, parts: list[tuple[str, generate_pb2.ImagePart]]) -> None:
        if not parts:
            return
        where = parts[0][0]
        if self.vision is None:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: model {self.config.model_id!r} does not accept images",
                param=where,
                error_code="images_not_supported",
            )
        limit = self.config.media.max_images_per_request
        if len(parts) > limit:
            where = parts[limit][0]
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: at most {limit} images per request, got {len(parts)}",
                param=where,
                error_code="too_many_images",
            )
        for where, part in parts:
            if part.detail not in ("", "auto", "low", "high"):
                raise RequestError.from_media(
                    MediaError(where, f"detail must be 'auto', 'low' or 'high', got {part.detail!r}", "invalid_value")
                )

    async def _place_images(
        self, prompt_ids: list[int], parts: list[tuple[str, generate_pb2.ImagePart]]
    ) -> tuple[list[int], tuple[MultiModalItem, ...]]:
        """Load every image, then expand its placeholder token in the prompt (vision models; a
        text-only model has no parts here, `_check_image_parts` refused them)."""
        if self.vision is None or self.images is None:
            return prompt_ids, ()
        if self.vision.video_token_id is not None and self.vision.video_token_id in prompt_ids:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "the prompt holds a video placeholder: videos are not supported"
            )
        loaded = await asyncio.gather(*(self._load_image(where, part) for where, part in parts), return_exceptions=True)
        for result in loaded:  # the first failure in request order
            if isinstance(result, MediaError):
                raise RequestError.from_media(result)
            if isinstance(result, BaseException):
                raise result
        images: list[ImageInput] = list(loaded)  # type: ignore[arg-type]
        try:
            return expand_placeholders(prompt_ids, images, self.vision.image_token_id, self.vision.geometry)
        except ValueError as exc:  # placeholders typed into the text, or missing from a raw prompt
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{exc}: the prompt must hold one image placeholder token per image",
                param="images" if parts and parts[0][0].startswith("images") else None,
            ) from None

    async def _load_image(self, where: str, part: generate_pb2.ImagePart) -> ImageInput:
        assert self.images is not None
        source = part.WhichOneof("source")
        if source is None:
            raise MediaError(where, "the image part has neither data nor a url", "invalid_image")
        if source == "data":
            return await self.images.load(where, data=part.data)
        return await self.images.load(where, url=part.url)

    def _tokenize(self, request: generate_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.token_ids)
        if kind == "text":
            return self.tokenizer.encode(request.text)
        if kind == "chat":
            return self.tokenizer.encode(render_chat(self.tokenizer, request.chat))
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing: set text, chat or token_ids")

    # ----------------------------------------------------------------------------- relay
    async def _admit(self, deadline: float | None, record: RequestRecord) -> None:
        if self._slots.locked() and self._num_queued >= self.config.max_queued:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "router queue is full; retry later")
        self._num_queued += 1
        self._update_gauges()
        try:
            await asyncio.wait_for(self._slots.acquire(), _remaining(deadline))
        except TimeoutError:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while queued") from None
        finally:
            self._num_queued -= 1
            record.queue_s = time.monotonic() - record.start
            if self.metrics is not None:
                self.metrics.queue_time.labels(self.config.model_id).observe(record.queue_s)
        self._num_inflight += 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.inflight.labels(self.config.model_id).set(self._num_inflight)
            self.metrics.queued.labels(self.config.model_id).set(self._num_queued)

    async def _generate(self, req: _Prepared, deadline: float | None, record: RequestRecord):
        await self._admit(deadline, record)
        try:
            yield generate_pb2.GenerateResponse(
                metadata=generate_pb2.GenerateMetadata(
                    request_id=req.request_id, model=self.config.model_id, num_prompt_tokens=len(req.prompt_ids)
                )
            )
            async for message in self._relay(req, deadline, record):
                yield message
        finally:
            self._slots.release()
            self._num_inflight -= 1
            self._update_gauges()

    async def _relay(self, req: _Prepared, deadline: float | None, record: RequestRecord):
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=req.skip_special)
        tokens: list[int] = []
        text = ""
        emitted = 0  # characters of `text` already sent
        excluded: set[str] = set()
        attempts = 0
        usage = common_pb2.Usage(prompt_tokens=len(req.prompt_ids))
        holdback = max((len(s) for s in req.stops), default=1) - 1
        while True:
            attempts += 1
            decode, prefill = await self._pick(req, tokens, excluded)
            record.decode_worker = decode.worker_id
            record.prefill_worker = prefill.worker_id if prefill else ""
            if self.metrics is not None:
                self.metrics.routing.labels(self.config.model_id, "remote" if prefill else "local").inc()
            call = decode.stub.Decode(self._decode_request(req, tokens, decode, prefill), timeout=_remaining(deadline))
            decode.num_inflight += 1
            if prefill:
                prefill.num_inflight += 1
            try:
                async for resp in call:
                    new_tokens = list(resp.token_ids)
                    for token in new_tokens:
                        text += detok.push(token)
                    tokens.extend(new_tokens)
                    if new_tokens:
                        self._on_tokens(record, len(new_tokens))
                    if resp.HasField("usage"):
                        usage.cached_prompt_tokens = max(usage.cached_prompt_tokens, resp.usage.cached_prompt_tokens)
                    stop = _find_stop(text, req.stops, max(0, emitted - holdback))
                    finished = resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                    out = generate_pb2.GenerateResponse(token_ids=new_tokens)
                    out.logprobs.extend(self._with_text(resp.logprobs))
                    if stop is not None:
                        at, stop_str = stop
                        end = at + len(stop_str) if req.include_stop else at
                        out.text = text[emitted:end]
                        out.finish_reason = common_pb2.FINISH_REASON_STOP
                        out.matched_stop_str = stop_str
                        call.cancel()
                    else:
                        safe = len(text) if finished else max(emitted, len(text) - holdback)
                        out.text = text[emitted:safe]
                        emitted = safe
                        if finished:
                            out.finish_reason = resp.finish_reason
                            if resp.HasField("matched_stop_token_id"):
                                out.matched_stop_token_id = resp.matched_stop_token_id
                    if stop is not None or finished:
                        usage.completion_tokens = len(tokens)
                        out.usage.CopyFrom(usage)
                        yield out
                        return
                    if out.token_ids or out.text:
                        yield out
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise RequestError(code, "deadline exceeded before the request finished") from None
                if code not in RETRYABLE or attempts >= self.config.max_attempts:
                    raise RequestError(code, exc.details() or code.name) from None
                log.warning("request %s failed on %s (%s); retrying", req.request_id, decode.address, code.name)
                if code == grpc.StatusCode.ABORTED and prefill is not None:
                    # The decode worker says its prefill peer (or the KV transfer) failed.
                    self.pool.suspend(prefill)
                    excluded.add(prefill.address)
                else:
                    self.pool.suspend(decode)
                    excluded.add(decode.address)
                    if prefill and not tokens:
                        excluded.add(prefill.address)
                if tokens:
                    self.num_migrations += 1
                    record.num_migrations += 1
                    if self.metrics is not None:
                        self.metrics.migrations.labels(self.config.model_id).inc()
                else:
                    self.num_retries += 1
                    record.num_retries += 1
                    if self.metrics is not None:
                        self.metrics.retries.labels(self.config.model_id).inc()
            finally:
                call.cancel()
                decode.num_inflight -= 1
                if prefill:
                    prefill.num_inflight -= 1

    async def _pick(
        self, req: _Prepared, tokens: list[int], excluded: set[str]
    ) -> tuple[WorkerHandle, WorkerHandle | None]:
        deadline = time.monotonic() + self.config.wait_for_workers_s
        while True:
            decode = self.pool.pick_decode(excluded) or self.pool.pick_decode(set())
            if decode is not None:
                break
            if time.monotonic() >= deadline:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "no decode worker is available")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pool.changed.wait(), timeout=0.5)
        num_tokens = len(req.prompt_ids) + len(tokens)
        prefill = None
        if num_tokens > self.config.local_prefill_max_tokens:
            prefill = self.pool.pick_prefill(excluded)
        return decode, prefill

    def _decode_request(self, req: _Prepared, tokens: list[int], decode: WorkerHandle, prefill: WorkerHandle | None):
        # The images keep their bytes: D forwards the request to P (or prefills it itself).
        msg = worker_pb2.DecodeRequest(
            request=worker_pb2.EngineRequest(
                request_id=req.request_id,
                prompt_token_ids=req.prompt_ids,
                output_token_ids=tokens,
                sampling=req.sampling,
                prompt_block_hashes=req.block_hashes,
                mm_items=mm_items_to_proto(req.mm_items),
            ),
            transfer_id=next(self._transfer_ids) % (1 << 63) or 1,
            role_epoch=decode.report.role_epoch,  # a worker that switched role since refuses it
        )
        if prefill is not None:
            msg.prefill_peer.CopyFrom(prefill.ref())
        return msg

    def _with_text(self, logprobs) -> list[common_pb2.TokenLogprobs]:
        out = []
        for lp in logprobs:
            item = common_pb2.TokenLogprobs()
            item.CopyFrom(lp)
            item.sampled.token = self.tokenizer.decode([lp.sampled.token_id], skip_special_tokens=False)
            for alt in item.top:
                alt.token = self.tokenizer.decode([alt.token_id], skip_special_tokens=False)
            out.append(item)
        return out


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def image_parts(request: generate_pb2.GenerateRequest) -> list[tuple[str, generate_pb2.ImagePart]]:
    """A request's images in prompt order, each with the name of its part: `images[i]` for a
    text / token prompt, `messages[i].content[j]` (OpenAI's path) for a chat prompt."""
    parts = [(f"images[{i}]", image) for i, image in enumerate(request.images)]
    if request.WhichOneof("prompt") != "chat":
        return parts
    if parts:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "images: a chat prompt carries its images in its messages' content_parts",
            param="images",
        )
    for i, message in enumerate(request.chat.messages):
        for j, part in enumerate(message.content_parts):
            if part.WhichOneof("part") == "image":
                parts.append((f"messages[{i}].content[{j}]", part.image))
    return parts


def _template_message(message: generate_pb2.ChatMessage, index: int) -> dict:
    """One message as the chat template sees it: OpenAI's dict, with multimodal content as a list
    of `{"type": "text", "text": ...}` and `{"type": "image"}` parts (the bytes stay out)."""
    out = json_format.MessageToDict(message, preserving_proto_field_name=True)
    if not message.content_parts:
        return out
    del out["content_parts"]
    if message.content:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"messages[{index}]: set content or content_parts, not both",
            param=f"messages[{index}]",
        )
    content = []
    for j, part in enumerate(message.content_parts):
        kind = part.WhichOneof("part")
        if kind is None:
            where = f"messages[{index}].content[{j}]"
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: empty content part", param=where)
        content.append({"type": "text", "text": part.text} if kind == "text" else {"type": "image"})
    out["content"] = content
    return out


def _message_text(message: generate_pb2.ChatMessage) -> str:
    return message.content or "".join(part.text for part in message.content_parts)


def _parse_into(message: generate_pb2.GenerateResponse, parsers: OutputParsers) -> None:
    """Move a message's reasoning and tool calls out of `text` into their own fields."""
    finished = message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    reasoning, content, calls = parsers.feed(message.text, finished)
    message.text = content
    message.reasoning_text = reasoning
    message.tool_calls.extend(
        generate_pb2.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments) for c in calls
    )


def render_chat(tokenizer: Tokenizer, chat: generate_pb2.ChatPrompt) -> str:
    """A chat prompt's text: the model's chat template over its messages, tools and kwargs, with
    the generation prompt or the final message left open. RequestError on input it rejects."""
    if not chat.messages:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "chat.messages is empty")
    messages = [_template_message(m, i) for i, m in enumerate(chat.messages)]
    kwargs = _from_struct(json_format.MessageToDict(chat.chat_template_kwargs))
    tools = [json_format.MessageToDict(t, preserving_proto_field_name=True) for t in chat.tools]
    for tool in tools:
        function = tool.get("function", {})
        if "parameters" in function:
            function["parameters"] = _from_struct(function["parameters"])
    add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    if chat.continue_final_message:
        if chat.HasField("add_generation_prompt") and chat.add_generation_prompt:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "continue_final_message and add_generation_prompt cannot both be true"
            )
        add_prompt = False
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt, tools=tools or None, **kwargs)
    except Exception as exc:  # template errors are the caller's input
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"chat template failed: {exc}") from None
    if chat.continue_final_message:
        text = _open_final_message(text, chat.messages[-1])
    return text


def _from_struct(value):
    """A Struct's content as plain JSON, the same in every process: keys sorted (a Struct is a map,
    whose order protobuf does not keep, so the prompt would otherwise change from run to run)
    and integral numbers as ints (a Struct stores every number as a double)."""
    if isinstance(value, dict):
        return {key: _from_struct(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_from_struct(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _open_final_message(text: str, final: generate_pb2.ChatMessage) -> str:
    """Cut the rendered chat after the last message's content, so the model continues that message
    (what transformers does for `continue_final_message`)."""
    content = _message_text(final)
    if final.role != "assistant" or not content:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, "continue_final_message needs a last assistant message with content"
        )
    at = text.rfind(content)
    if at < 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the chat template does not render the final message")
    return text[: at + len(content)]


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, start)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best


__all__ = ["FINISH_REASON_NAMES", "GenerationService", "RequestError", "RouterConfig"]
