"""The worker process: one engine, its KV transport, the roles, and the `pdserve.v1.Worker` service.

A worker's role is state (`prefill`, `decode` or `mixed`), not identity: both role objects exist
for the life of the process over the same engine, KV pool and transport, and the role decides
which RPCs are accepted. A request that names a role epoch other than ours is refused with
FAILED_PRECONDITION so the router retries elsewhere.

Switching roles (`SetRole`) is epoch-fenced; weights, KV pool and communicators stay resident:

    READY ──SetRole──▶ DRAINING ──drained──▶ COMMITTING ──▶ READY (new role, epoch + 1, published)
                          │  new requests refused (UNAVAILABLE: the router goes elsewhere)
                          │  drain timeout: decode streams are evicted (the router continues them
                          │  on another decode worker from the tokens so far), then a short wait
                          └──still busy──▶ READY (old role and epoch: rolled back)

On start the worker prints one line `READY {json}` (worker id, incarnation, addresses) on stdout:
launchers read it to learn the ports the OS picked.
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
import time
import uuid
from dataclasses import dataclass

import grpc

from cluster import metrics
from cluster.engine_loop import EngineLoop
from cluster.kv_transport import KVSpec, PeerRef, TransportConfig, make_transport
from cluster.metrics import WorkerMetrics, WorkerSnapshot
from cluster.registry import Heartbeater, make_registry
from cluster.role_support import RoleError, on_engine
from decode.role import DecodeRole
from engine.config import CacheConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from prefill.role import PrefillRole
from protos.pdserve.v1 import common_pb2, registry_pb2, worker_pb2, worker_pb2_grpc
from protos.services import NOT_SERVING, SERVING, WORKER_SERVICE, add_standard_services

log = logging.getLogger(__name__)

ROLES = {
    "prefill": common_pb2.WORKER_ROLE_PREFILL,
    "decode": common_pb2.WORKER_ROLE_DECODE,
    "mixed": common_pb2.WORKER_ROLE_MIXED,
}
ROLE_NAMES = {value: name for name, value in ROLES.items()}
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    role: str = "mixed"
    model: str = "tiny"
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0
    host: str = "127.0.0.1"  # address the gRPC and metrics servers bind (0.0.0.0: every interface)
    advertise_host: str | None = None  # published address: router, peers and the KV store (None: `host`)
    port: int = 0
    kv_backend: str = "gloo"
    kv_port: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 2048
    # Tokens per step while the worker is a prefill worker (no decode steps to protect there; steps
    # this big run the fused MoE ~1.4x faster per token than 2048-token ones on an H100).
    prefill_max_num_batched_tokens: int = 8192
    max_num_seqs: int = 128
    max_model_len: int | None = 4096
    registry: str = ""  # grpc://ROUTER (embedded store) or redis://host:port; "" = no registry
    metrics_port: int = 0  # /metrics (0: pick a free port)
    moe_backend: str = "auto"  # Triton kernels on CUDA, torch references on CPU (engine.backends)
    enforce_eager: bool = False  # no CUDA-graph decode (engine.cuda_graph)
    heartbeat_interval_s: float = 0.5
    registry_ttl_s: float = 3.0
    # Largest gRPC message the worker accepts: a Decode / Prefill request carries its prompt's
    # images (up to the router's --max-images-per-request x --max-image-bytes, plus the prompt).
    max_message_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        for name in ("port", "kv_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.public_host in _WILDCARD_HOSTS:
            raise ValueError(f"host {self.host!r} binds every interface: set advertise_host to an address peers dial")

    @property
    def public_host(self) -> str:
        """The address published in the registry and the READY line (a pod IP in Kubernetes)."""
        return self.advertise_host or self.host


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, engine: LLMEngine) -> None:
        self.config = config
        self.engine = engine
        self.incarnation_id = uuid.uuid4().hex[:12]
        self.role = ROLES[config.role]
        self.role_epoch = 1
        self.state = common_pb2.WORKER_STATE_READY
        engine.scheduler.set_prefill_only(self.role == ROLES["prefill"])  # before the engine thread starts
        self.loop = EngineLoop(engine)
        self.loop.snapshot_fn = self._snapshot
        self.loop.start()
        self.transport = make_transport(
            config.kv_backend,
            kv=engine.kv_cache,
            local=PeerRef(config.worker_id, self.incarnation_id),
            model_hash=engine.runtime.model_hash,
            config=TransportConfig(host=config.public_host, port=config.kv_port),
        )
        self.address = ""  # host:port once the server is bound
        self.decode_role: DecodeRole | None = None
        self.prefill_role = PrefillRole(self.loop, self.transport)
        self.started_at = time.time()
        self.heartbeater: Heartbeater | None = None
        self._switching = asyncio.Lock()
        self.num_role_switches = 0
        self.metrics = WorkerMetrics(config.model, config.worker_id, self._metrics_snapshot)
        self.metrics_port = 0
        self.loop.step_listeners.append(self.metrics.observe_step)
        self.prefill_role.on_transfer = self.metrics.observe_transfer

    def bind(self, address: str) -> None:
        self.address = address
        self.decode_role = DecodeRole(self.loop, self.transport, self.ref())
        self.decode_role.on_transfer = self.metrics.observe_transfer

    def _metrics_snapshot(self) -> WorkerSnapshot:
        """Read at scrape time on the metrics thread: counters only grow, gauges are a moment's."""
        engine = self.engine
        blocks = engine.block_stats()
        stats = engine.scheduler.stats
        transport = self.transport.stats()
        return WorkerSnapshot(
            role=ROLE_NAMES[self.role],
            role_epoch=self.role_epoch,
            running=len(engine.scheduler.running),
            waiting=len(engine.scheduler.waiting),
            kv_blocks_used=blocks.num_used,
            kv_blocks_cached=blocks.num_cached,
            kv_blocks_total=blocks.num_total,
            prefix_queries=blocks.prefix_queries,
            prefix_hits=blocks.prefix_hits,
            prompt_tokens=stats.num_prompt_tokens,
            generation_tokens=stats.num_generation_tokens,
            preemptions=stats.num_preemptions,
            transfers_active=transport.num_active,
            transfer_bytes_sent=transport.bytes_sent,
            transfer_bytes_received=transport.bytes_received,
            transfer_failures=dict(transport.num_failed),
            requests_finished=dict(stats.finished_by_reason),
            routed_tokens=[m.routed_token_counts.tolist() for m in engine.loaded.model.moe_layers()],
        )

    def info(self) -> common_pb2.WorkerInfo:
        host, _, port = self.address.rpartition(":")
        local = self.transport.local
        return common_pb2.WorkerInfo(
            worker_id=self.config.worker_id,
            incarnation_id=self.incarnation_id,
            host=host,
            grpc_port=int(port),
            kv_store_host=local.host,
            kv_store_port=local.port,
            role=self.role,
            role_epoch=self.role_epoch,
            device=self.config.device,
            model_id=self.config.model,
            num_ranks=1,
            state=self.state,
            metrics_port=self.metrics_port,
        )

    async def registry_record(self) -> registry_pb2.WorkerRecord:
        # The engine thread's latest snapshot: a heartbeat never waits for a long step to end.
        load = self.loop.snapshot or worker_pb2.LoadReport()
        load.role, load.role_epoch, load.state = self.role, self.role_epoch, self.state
        return registry_pb2.WorkerRecord(info=self.info(), load=load, ttl_seconds=self.config.registry_ttl_s)

    def ref(self) -> common_pb2.WorkerRef:
        return common_pb2.WorkerRef(
            worker_id=self.config.worker_id, incarnation_id=self.incarnation_id, grpc_address=self.address
        )

    async def close(self) -> None:
        if self.decode_role is not None:
            await self.decode_role.close()
        self.transport.close()
        self.loop.stop()

    # ----------------------------------------------------------------------------- fencing
    def _check_role(self, allowed: tuple[int, ...], epoch: int, what: str) -> None:
        if self.state != common_pb2.WORKER_STATE_READY:
            raise RoleError(grpc.StatusCode.UNAVAILABLE, f"worker {self.config.worker_id} is not ready for {what}")
        if self.role not in allowed:
            raise RoleError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {self.config.worker_id} is {ROLE_NAMES[self.role]} (epoch {self.role_epoch}); "
                f"it does not serve {what}",
            )
        if epoch and epoch != self.role_epoch:
            raise RoleError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale role epoch {epoch}: worker {self.config.worker_id} is at epoch {self.role_epoch}",
            )

    # ----------------------------------------------------------------------------- RPCs
    async def Decode(self, request, context):
        try:
            self._check_role(
                (common_pb2.WORKER_ROLE_DECODE, common_pb2.WORKER_ROLE_MIXED), request.role_epoch, "decode"
            )
            assert self.decode_role is not None
            async for response in self.decode_role.decode(request, context):
                yield response
        except RoleError as err:
            await context.abort(err.code, err.message)

    async def Prefill(self, request, context):
        try:
            self._check_role(
                (common_pb2.WORKER_ROLE_PREFILL, common_pb2.WORKER_ROLE_MIXED), request.role_epoch, "prefill"
            )
            async for response in self.prefill_role.prefill(request, context):
                yield response
        except RoleError as err:
            await context.abort(err.code, err.message)

    async def AbortRequest(self, request, context):
        rid = request.request_id
        freed = await self.prefill_role.abort(rid)
        if not freed:
            freed = await on_engine(self.loop, lambda e: e.abort(rid))
        return worker_pb2.WorkerAbortResponse(freed=freed)

    async def GetLoad(self, request, context):
        return await on_engine(self.loop, self._load_report)

    def _load_report(self, engine: LLMEngine) -> worker_pb2.LoadReport:
        # Cheap at our pool sizes, and a broken invariant should be loud: GetLoad then fails.
        engine.check_idle_invariants()
        return self._snapshot(engine)

    def _snapshot(self, engine: LLMEngine) -> worker_pb2.LoadReport:
        stats = engine.block_stats()
        scheduler = engine.scheduler
        now = time.monotonic()
        waiting = list(scheduler.waiting)
        return worker_pb2.LoadReport(
            worker_id=self.config.worker_id,
            incarnation_id=self.incarnation_id,
            role=self.role,
            role_epoch=self.role_epoch,
            state=self.state,
            num_running_requests=len(scheduler.running),
            num_waiting_requests=len(waiting),
            num_queued_prefill_tokens=sum(r.num_tokens - r.num_computed_tokens for r in waiting)
            + sum(r.num_tokens - r.num_computed_tokens - 1 for r in scheduler.running),
            oldest_waiting_seconds=max((now - r.arrival_time for r in waiting), default=0.0),
            num_kv_blocks_used=stats.num_used,
            num_kv_blocks_total=stats.num_total,
            num_kv_blocks_cached=stats.num_cached,
            avg_batch_size=scheduler.stats.last_batch_size,
            timestamp_unix_ms=int(time.time() * 1000),
        )

    async def SetRole(self, request, context):
        target = request.target_role
        if target not in ROLE_NAMES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown target role {target}")
        respond = worker_pb2.SetRoleResponse
        if request.expected_role_epoch and request.expected_role_epoch != self.role_epoch:
            message = f"expected epoch {request.expected_role_epoch}, worker is at {self.role_epoch}"
            return respond(
                result=worker_pb2.SET_ROLE_RESULT_STALE_EPOCH,
                role=self.role,
                role_epoch=self.role_epoch,
                message=message,
            )
        if target == self.role:
            return respond(result=worker_pb2.SET_ROLE_RESULT_NOOP, role=self.role, role_epoch=self.role_epoch)
        if self._switching.locked():
            return respond(
                result=worker_pb2.SET_ROLE_RESULT_BUSY, role=self.role, role_epoch=self.role_epoch, message="switching"
            )
        async with self._switching:
            result, message = await self._switch(target, request.drain_timeout_seconds or 30.0, request.reason)
        return respond(result=result, role=self.role, role_epoch=self.role_epoch, message=message)

    async def _switch(self, target: int, drain_timeout_s: float, reason: str) -> tuple[int, str]:
        old = ROLE_NAMES[self.role]
        start = time.monotonic()
        log.info("role switch %s -> %s requested (%s); draining", old, ROLE_NAMES[target], reason or "no reason given")
        self.state = common_pb2.WORKER_STATE_DRAINING
        await self.publish()
        drained = await self._drain(drain_timeout_s)
        if not drained and self.decode_role is not None:
            evicted = self.decode_role.evict_all(f"worker {self.config.worker_id} is switching roles")
            log.info("drain timeout: evicted %d decode streams for migration", evicted)
            drained = await self._drain(5.0)
        if not drained:
            self.state = common_pb2.WORKER_STATE_READY
            await self.publish()
            log.warning("role switch %s -> %s rolled back: still busy", old, ROLE_NAMES[target])
            self.metrics.observe_flip(old, ROLE_NAMES[target], "drain_timeout", time.monotonic() - start)
            return worker_pb2.SET_ROLE_RESULT_DRAIN_TIMEOUT, "work did not drain in time; role unchanged"
        self.state = common_pb2.WORKER_STATE_COMMITTING
        prefill_only = target == ROLES["prefill"]
        await asyncio.wrap_future(self.loop.call(lambda engine: engine.scheduler.set_prefill_only(prefill_only)))
        self.role = target
        self.role_epoch += 1
        self.state = common_pb2.WORKER_STATE_READY
        self.num_role_switches += 1
        await self.publish()
        seconds = time.monotonic() - start
        self.metrics.observe_flip(old, ROLE_NAMES[target], "ok", seconds)
        log.info(
            "role switch %s -> %s committed at epoch %d in %.2f s", old, ROLE_NAMES[target], self.role_epoch, seconds
        )
        return worker_pb2.SET_ROLE_RESULT_OK, f"{old} -> {ROLE_NAMES[target]} in {seconds:.2f} s"

    async def _drain(self, timeout_s: float) -> bool:
        """Wait until nothing runs here: no engine request, no Prefill or Decode RPC in progress."""
        deadline = time.monotonic() + timeout_s
        while True:
            num_engine = await on_engine(self.loop, lambda e: len(e.requests))
            busy = num_engine + self.prefill_role.num_active + (self.decode_role.num_active if self.decode_role else 0)
            if busy == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)

    async def publish(self) -> None:
        """Push the current role, epoch and state to the registry now (not at the next beat)."""
        if self.heartbeater is not None:
            await self.heartbeater.beat()

    async def KVHandshake(self, request, context):
        mine = self.transport.spec
        theirs = request.spec
        other = KVSpec(
            model_hash=theirs.model_hash,
            num_layers=theirs.num_layers or 1,
            num_kv_heads=theirs.num_kv_heads or 1,
            head_dim=theirs.head_dim or 1,
            block_size=theirs.block_size or 1,
            dtype=theirs.dtype,
            layout=theirs.layout,
        )
        mismatches = mine.mismatches(other)
        return worker_pb2.KVHandshakeResponse(
            ok=not mismatches,
            spec=worker_pb2.KVCacheSpec(**mine.to_dict()),
            mismatched_fields=mismatches,
            message="ok" if not mismatches else "; ".join(mismatches),
            worker_id=self.config.worker_id,
            incarnation_id=self.incarnation_id,
        )


def build_engine(config: WorkerConfig) -> LLMEngine:
    return LLMEngine.from_model(
        config.model,
        device=config.device,
        dtype=config.dtype,
        seed=config.seed,
        cache=CacheConfig(block_size=config.block_size, num_blocks=config.num_kv_blocks),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens,
            prefill_max_num_batched_tokens=config.prefill_max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
        ),
        moe_backend=config.moe_backend,
        enforce_eager=config.enforce_eager,
    )


async def serve(config: WorkerConfig, ready_out=sys.stdout) -> None:
    engine = build_engine(config)
    service = WorkerService(config, engine)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", config.max_message_bytes)])
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    health = add_standard_services(server, [WORKER_SERVICE])
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {config.host}:{config.port}")
    service.bind(f"{config.public_host}:{port}")
    service.metrics_port = metrics.serve(service.metrics.registry, config.host, config.metrics_port)
    await server.start()
    local = service.transport.local
    ready = {
        "worker_id": config.worker_id,
        "incarnation_id": service.incarnation_id,
        "role": config.role,
        "grpc_address": service.address,
        "kv_store": f"{local.host}:{local.port}",
        "metrics_address": f"{config.public_host}:{service.metrics_port}",
        "pid": os.getpid(),
        "model": config.model,
        "model_hash": engine.runtime.model_hash,
    }
    heartbeater = None
    if config.registry:
        heartbeater = Heartbeater(make_registry(config.registry), service.registry_record, config.heartbeat_interval_s)
        service.heartbeater = heartbeater
        await heartbeater.beat()
        heartbeater.start()
    print("READY " + json.dumps(ready), file=ready_out, flush=True)
    stop = asyncio.Event()
    aio_loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio_loop.add_signal_handler(sig, stop.set)
    serving = True
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.1)
        # pdserve.v1.Worker is SERVING only while the worker takes new work: READY with a live engine
        # loop (draining for a role switch, or a dead engine thread, reads NOT_SERVING). "" stays
        # SERVING while the process and its engine are alive (liveness).
        now_serving = service.loop.is_alive() and service.state == common_pb2.WORKER_STATE_READY
        if now_serving != serving:
            serving = now_serving
            await health.set(WORKER_SERVICE, SERVING if serving else NOT_SERVING)
        if not service.loop.is_alive():
            await health.set("", NOT_SERVING)
    service.state = common_pb2.WORKER_STATE_STOPPING
    await health.set(WORKER_SERVICE, NOT_SERVING)
    if heartbeater is not None:
        await heartbeater.stop((config.worker_id, service.incarnation_id))
        await heartbeater.registry.close()
    await server.stop(grace=1.0)
    await service.close()


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker-id", default=None, help="stable id (default: worker-<random>)")
    p.add_argument("--role", default="mixed", choices=sorted(ROLES))
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument(
        "--advertise-host",
        default=None,
        help="address published in the registry for the router and peers (default: --host; in Kubernetes the pod IP)",
    )
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: pick a free one)")
    p.add_argument("--kv-backend", default=None, choices=["gloo", "nccl"], help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--kv-port", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="tokens per step (the chunked-prefill budget)"
    )
    p.add_argument(
        "--prefill-max-num-batched-tokens",
        type=int,
        default=8192,
        help="tokens per step while the worker's role is prefill (no decode latency to protect)",
    )
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--registry", default="", help="grpc://ROUTER_HOST:PORT (embedded) or redis://host:port")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: pick a free one)")
    p.add_argument("--moe-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=256 << 20,
        help="largest Decode / Prefill request accepted (prompt plus its images' bytes)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode eagerly (no CUDA graphs); CUDA graphs are the default on GPU",
    )


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    backend = args.kv_backend or ("nccl" if args.device.startswith("cuda") else "gloo")
    return WorkerConfig(
        worker_id=args.worker_id or f"worker-{uuid.uuid4().hex[:6]}",
        role=args.role,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        host=args.host,
        advertise_host=args.advertise_host,
        port=args.port,
        kv_backend=backend,
        kv_port=args.kv_port,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_max_num_batched_tokens=args.prefill_max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        registry=args.registry,
        metrics_port=args.metrics_port,
        moe_backend=args.moe_backend,
        enforce_eager=args.enforce_eager,
        max_message_bytes=args.max_message_bytes,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    asyncio.run(serve(config_from_args(args)))
    return 0
