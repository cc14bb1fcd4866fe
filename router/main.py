"""The router process: serves `pdserve.v1.Generation` (gRPC) and the OpenAI-compatible HTTP API
(`router.openai_api`, aiohttp, on the same asyncio loop) over a pool of workers.

Prints `READY {json}` on stdout once listening (`grpc_address`, and `http_address` unless the
HTTP API is off), like the workers, for launchers. API keys (`--api-key`, `--api-key-file`, or
the `PDSERVE_API_KEY` environment variable, read here and nowhere else) guard both front ends.

Images (models with a `preprocessor_config.json`, e.g. ERNIE-4.5-VL or the `tiny-vl` preset):
`--max-images-per-request`, `--max-image-bytes`, `--max-image-pixels`, `--image-fetch-timeout`,
`--allow-private-image-urls`, `--image-url-allow-hosts`, `--image-min-pixels` and
`--image-max-pixels` (see `router.media`). Both front ends then accept bodies up to
`--max-request-bytes` plus room for that many images of that size; the workers' gRPC message
limit (`pdserve worker --max-message-bytes`, 256 MiB by default) must hold the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

import grpc

from cluster.metrics import RouterMetrics
from cluster.metrics import serve as serve_metrics
from cluster.registry import EmbeddedRegistry, RegistryService, make_registry
from engine.tokenizer import Tokenizer
from protos.pdserve.v1 import generate_pb2_grpc, registry_pb2_grpc
from protos.services import GENERATION_SERVICE, NOT_SERVING, SERVING, add_standard_services
from router.auth import ApiKeyInterceptor, ApiKeys, load_api_keys
from router.media import MediaConfig, vision_spec
from router.openai_api import OpenAIServer, start_http, stop_http
from router.reasoning import PARSER_NAMES, reasoning_parser_enabled
from router.server import GenerationService, RouterConfig
from router.workers import WorkerPool

log = logging.getLogger(__name__)

API_KEY_ENV = "PDSERVE_API_KEY"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class FrontendConfig:
    """The public front ends beyond gRPC: the HTTP API's address, API keys, reasoning parser."""

    http_port: int | None = 8000  # None: no HTTP API; 0: a free port
    http_host: str | None = None  # None: the gRPC host
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    reasoning_parser: str = "auto"
    metrics_port: int | None = 0  # /metrics port; 0: a free one; None: off
    log_json: bool = False  # the one-line-per-request log as JSON
    advertise_host: str | None = None  # the address clients and workers dial (None: the bind host)


async def serve(
    config: RouterConfig,
    worker_addresses: list[str],
    host: str,
    port: int,
    registry_url: str = "embedded",
    ready_out=sys.stdout,
    frontend: FrontendConfig | None = None,
) -> None:
    frontend = frontend or FrontendConfig()
    tokenizer = Tokenizer.for_model(config.model_id)
    vision = vision_spec(config.model_id, tokenizer, config.media)
    pool = WorkerPool(worker_addresses)
    registry = None
    if worker_addresses:  # a static list: poll each worker's GetLoad
        await pool.start()
    else:  # membership from the registry (embedded in this process unless a URL names one)
        registry = make_registry(registry_url)
        pool.start_watching(registry)
    metrics = RouterMetrics(config.model_id)
    metrics.watch_circuits(lambda: {h.worker_id: h.suspended for h in pool.workers.values()})
    parse_reasoning = reasoning_parser_enabled(frontend.reasoning_parser, tokenizer.chat_template)
    service = GenerationService(
        config,
        tokenizer,
        pool,
        metrics=metrics,
        log_json=frontend.log_json,
        vision=vision,
        reasoning_parser=parse_reasoning,
    )
    interceptors = [ApiKeyInterceptor(frontend.api_keys)] if frontend.api_keys.enabled else []
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", service.max_body_bytes + (64 << 10))],
        interceptors=interceptors,
    )
    generate_pb2_grpc.add_GenerationServicer_to_server(service, server)
    if isinstance(registry, EmbeddedRegistry):
        registry_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry), server)
    health = add_standard_services(server, [GENERATION_SERVICE])
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    public = frontend.advertise_host or host
    ready = {"grpc_address": f"{public}:{bound}", "pid": os.getpid(), "workers": worker_addresses}
    ready["registry"] = f"grpc://{public}:{bound}" if isinstance(registry, EmbeddedRegistry) else registry_url
    if frontend.metrics_port is not None:
        ready["metrics_address"] = f"{public}:{serve_metrics(metrics.registry, host, frontend.metrics_port)}"
    http_runner = None
    if frontend.http_port is not None:
        http_host = frontend.http_host or host
        api = OpenAIServer(
            service, frontend.api_keys, reasoning_parser=parse_reasoning, is_serving=pool.has_decode_capacity
        )
        http_runner, http_bound = await start_http(api.make_app(), http_host, frontend.http_port)
        http_public = public if http_host in _WILDCARD_HOSTS or http_host == host else http_host
        ready["http_address"] = f"{http_public}:{http_bound}"
    if not frontend.api_keys.enabled and {host, frontend.http_host or host} - set(_LOOPBACK_HOSTS):
        log.warning("serving beyond loopback without an API key (set --api-key-file or %s)", API_KEY_ENV)
    print("READY " + json.dumps(ready), file=ready_out, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    serving = True
    while not stop.is_set():
        # The router serves while at least one decode (or mixed) worker can take requests.
        now_serving = pool.has_decode_capacity()
        if now_serving != serving:
            serving = now_serving
            log.warning("router health: %s", "SERVING" if serving else "NOT_SERVING (no decode worker)")
            for name in ("", GENERATION_SERVICE):
                await health.set(name, SERVING if serving else NOT_SERVING)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.25)
    if http_runner is not None:
        await stop_http(http_runner)
    await server.stop(grace=1.0)
    await service.close()
    await pool.close()
    if registry is not None:
        await registry.close()


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="model id served (a preset name or a model folder)")
    p.add_argument("--workers", default="", help="static worker addresses host:port,... (instead of a registry)")
    p.add_argument(
        "--registry",
        default="embedded",
        help="'embedded' (served on this router's gRPC port; workers use grpc://ROUTER) or redis://host:port",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--advertise-host",
        default=None,
        help="the address clients and workers dial, when --host binds every interface (0.0.0.0)",
    )
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--local-prefill-max-tokens", type=int, default=0, help="prompts this short prefill on decode")
    p.add_argument("--max-inflight", type=int, default=256)
    p.add_argument("--max-queued", type=int, default=1024)
    p.add_argument("--http-host", default=None, help="address of the OpenAI-compatible HTTP API (default: --host)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP API port; 0 picks a free one, -1 turns it off")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; 0 picks a free one, -1 off")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="format of the per-request log")
    p.add_argument("--api-key", default=None, help=f"require this key on both APIs (also: ${API_KEY_ENV})")
    p.add_argument("--api-key-file", default=None, help="require one of the keys in this file (one per line)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="largest request, images aside")
    media = MediaConfig()
    p.add_argument("--max-images-per-request", type=int, default=media.max_images_per_request)
    p.add_argument("--max-image-bytes", type=int, default=media.max_image_bytes, help="encoded size of one image")
    p.add_argument(
        "--max-image-pixels", type=int, default=media.max_image_pixels, help="decoded width x height of one image"
    )
    p.add_argument("--image-fetch-timeout", type=float, default=media.fetch_timeout_s, help="seconds per image URL")
    p.add_argument(
        "--allow-private-image-urls",
        action="store_true",
        help="let image URLs reach private, loopback and link-local addresses (refused by default: SSRF)",
    )
    p.add_argument(
        "--image-url-allow-hosts",
        default="",
        help="host names, addresses or CIDR networks image URLs may reach even when not public (comma-separated)",
    )
    p.add_argument(
        "--image-min-pixels",
        type=int,
        default=None,
        help="images are scaled up to at least this many pixels (default: the model's preprocessor_config.json)",
    )
    p.add_argument(
        "--image-max-pixels",
        type=int,
        default=None,
        help="images are scaled down to at most this many pixels: fewer tokens per image (default: the model's)",
    )
    p.add_argument(
        "--reasoning-parser",
        default="auto",
        choices=PARSER_NAMES,
        help="split thinking output into reasoning_content (auto: when the chat template has thinking)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    config = RouterConfig(
        model_id=args.model,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        max_inflight=args.max_inflight,
        max_queued=args.max_queued,
        max_request_bytes=args.max_request_bytes,
        media=MediaConfig(
            max_images_per_request=args.max_images_per_request,
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            fetch_timeout_s=args.image_fetch_timeout,
            allow_private_urls=args.allow_private_image_urls,
            allowed_hosts=tuple(h.strip() for h in args.image_url_allow_hosts.split(",") if h.strip()),
            image_min_pixels=args.image_min_pixels,
            image_max_pixels=args.image_max_pixels,
        ),
    )
    frontend = FrontendConfig(
        http_port=None if args.http_port < 0 else args.http_port,
        http_host=args.http_host,
        api_keys=load_api_keys(args.api_key, args.api_key_file, os.environ.get(API_KEY_ENV)),
        reasoning_parser=args.reasoning_parser,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        log_json=args.log_format == "json",
        advertise_host=args.advertise_host,
    )
    if args.host in _WILDCARD_HOSTS and not args.advertise_host:
        raise SystemExit(f"--host {args.host!r} binds every interface: set --advertise-host to an address others dial")
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    asyncio.run(serve(config, workers, args.host, args.port, registry_url=args.registry, frontend=frontend))
    return 0
