"""A server with scripted timings and no model: real sockets, fake tokens.

Serves `pdserve.v1.Generation/Generate` (gRPC) and the OpenAI streaming endpoints
(`/v1/completions`, `/v1/chat/completions`) plus a `/metrics` page, on free loopback ports, from
one background thread. Each request's timing comes from a script: the first token exactly
`ttft_s` after the request arrived, then one token every `itl_s` (an absolute schedule, so
delays do not drift), or an error status. Tests check the harness's metric math against it; the
README's "how far one client process goes" is measured against it with zero delays.

    with FakeServer(lambda req: Timing(ttft_s=0.1, itl_s=0.02)) as server:
        server.grpc_address, server.http_url, server.metrics_url

`python -m load_tests.fake_server --ttft-ms 100 --itl-ms 20` serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from aiohttp import web

from protos.pdserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc

HTTP_STATUS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.INTERNAL: 500,
}


@dataclass(frozen=True)
class FakeRequest:
    prompt_ids: tuple[int, ...]
    text: str
    max_tokens: int


@dataclass(frozen=True)
class Timing:
    ttft_s: float = 0.1
    itl_s: float = 0.02
    num_tokens: int | None = None  # None: the request's max_tokens
    error: grpc.StatusCode | None = None  # fail with this status before any token


Script = Callable[[FakeRequest], Timing]


class _Stats:
    def __init__(self) -> None:
        self.inflight = 0
        self.requests = 0
        self.tokens = 0


class _Generation(generate_pb2_grpc.GenerationServicer):
    def __init__(self, script: Script, stats: _Stats) -> None:
        self.script = script
        self.stats = stats

    async def Generate(self, request, context):
        arrived = time.monotonic()
        prompt = tuple(request.token_ids.token_ids) if request.WhichOneof("prompt") == "token_ids" else ()
        fake = FakeRequest(prompt, request.text, request.sampling.max_tokens or 16)
        timing = self.script(fake)
        if timing.error is not None:
            await context.abort(timing.error, "scripted failure")
        count = timing.num_tokens if timing.num_tokens is not None else fake.max_tokens
        request_id = request.request_id or f"fake-{self.stats.requests}"
        self.stats.requests += 1
        self.stats.inflight += 1
        try:
            metadata = generate_pb2.GenerateMetadata(request_id=request_id, model="fake", num_prompt_tokens=len(prompt))
            yield generate_pb2.GenerateResponse(metadata=metadata)
            for k in range(count):
                await _sleep_until(arrived + timing.ttft_s + k * timing.itl_s)
                message = generate_pb2.GenerateResponse(token_ids=[100 + k % 50], text="x")
                if k == count - 1:
                    message.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    message.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=count))
                self.stats.tokens += 1
                yield message
        finally:
            self.stats.inflight -= 1


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class _Http:
    def __init__(self, script: Script, stats: _Stats) -> None:
        self.script = script
        self.stats = stats

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def generate(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.json()
        prompt = body.get("prompt")
        ids = tuple(prompt) if isinstance(prompt, list) else ()
        fake = FakeRequest(ids, prompt if isinstance(prompt, str) else "", int(body.get("max_tokens") or 16))
        timing = self.script(fake)
        if timing.error is not None:
            status = HTTP_STATUS.get(timing.error, 500)
            return web.json_response(
                {"error": {"message": "scripted failure", "code": timing.error.name}}, status=status
            )
        count = timing.num_tokens if timing.num_tokens is not None else fake.max_tokens
        chat = request.path.endswith("chat/completions")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Request-Id": f"fake-{self.stats.requests}"}
        )
        self.stats.requests += 1
        self.stats.inflight += 1
        try:
            await response.prepare(request)
            for k in range(count):
                await _sleep_until(arrived + timing.ttft_s + k * timing.itl_s)
                finish = "length" if k == count - 1 else None
                choice = {"index": 0, "finish_reason": finish}
                choice.update({"delta": {"content": "x"}} if chat else {"text": "x"})
                self.stats.tokens += 1
                await response.write(_event({"choices": [choice]}))
            usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
            await response.write(_event({"choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
        finally:
            self.stats.inflight -= 1
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        s = self.stats
        lines = [
            "# TYPE pdserve_worker_running_requests gauge",
            f'pdserve_worker_running_requests{{worker="fake"}} {s.inflight}',
            "# TYPE pdserve_worker_waiting_requests gauge",
            'pdserve_worker_waiting_requests{worker="fake"} 0',
            "# TYPE pdserve_kv_usage_ratio gauge",
            f'pdserve_kv_usage_ratio{{worker="fake"}} {min(1.0, s.inflight / 100)}',
            "# TYPE pdserve_worker_role gauge",
            'pdserve_worker_role{worker="fake",role="prefill"} 0',
            'pdserve_worker_role{worker="fake",role="decode"} 1',
            "# TYPE pdserve_kv_transfer_bytes counter",
            f'pdserve_kv_transfer_bytes_total{{worker="fake",direction="recv"}} {s.requests * 1_000_000}',
            "# TYPE pdserve_generation_tokens counter",
            f'pdserve_generation_tokens_total{{worker="fake"}} {s.tokens}',
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class FakeServer:
    """Both front ends on free loopback ports, served from a daemon thread's event loop."""

    def __init__(self, script: Script | Timing = Timing(), host: str = "127.0.0.1") -> None:
        self.script: Script = script if callable(script) else (lambda _req, t=script: t)
        self.host = host
        self.stats = _Stats()
        self.grpc_address = ""
        self.http_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-server", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None

    @property
    def metrics_url(self) -> str:
        return f"{self.http_url}/metrics"

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        generate_pb2_grpc.add_GenerationServicer_to_server(_Generation(self.script, self.stats), self._server)
        port = self._server.add_insecure_port(f"{self.host}:0")
        await self._server.start()
        self.grpc_address = f"{self.host}:{port}"
        self._runner = web.AppRunner(_Http(self.script, self.stats).app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.http_url = f"http://{self.host}:{self._runner.addresses[0][1]}"

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
        if self._runner is not None:
            await self._runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.fake_server", description=__doc__.splitlines()[0])
    p.add_argument("--ttft-ms", type=float, default=100.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    with FakeServer(Timing(args.ttft_ms / 1000, args.itl_ms / 1000)) as server:
        print(f"gRPC {server.grpc_address}  HTTP {server.http_url}  metrics {server.metrics_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
