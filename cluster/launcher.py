"""The local launcher behind `pdserve up`: a router and N prefill + M decode workers as processes.

Workers start first (each prints `READY {json}` with the ports it bound), then the router is
pointed at them. Ctrl-C (or SIGTERM) stops the router, then the workers, each with a grace
period. A process that dies during start-up fails `up` with its last output lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ClusterSpec:
    model: str = "tiny"
    num_prefill: int = 1
    num_decode: int = 1
    num_mixed: int = 0
    device: str = "cpu"
    host: str = "127.0.0.1"
    router_port: int = 50051
    worker_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    # The router's OpenAI-compatible HTTP API: None means 8000, or a free port when router_port
    # is 0 (tests start several clusters at once); -1 turns it off.
    http_port: int | None = None
    registry: str = ""  # "" = the router's embedded registry; or redis://host:port

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode", "num_mixed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_decode + self.num_mixed < 1:
            raise ValueError("a cluster needs at least one decode or mixed worker")
        if not 0 <= self.router_port < 65536:
            raise ValueError(f"router port must be in [0, 65535], got {self.router_port}")
        if self.http_port is not None and not -1 <= self.http_port < 65536:
            raise ValueError(f"HTTP port must be in [0, 65535] or -1 (off), got {self.http_port}")

    @property
    def router_http_port(self) -> int:
        if self.http_port is not None:
            return self.http_port
        return 0 if self.router_port == 0 else 8000


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    ready: dict = field(default_factory=dict)
    tail: deque = field(default_factory=lambda: deque(maxlen=2000))  # the last lines of output
    _ready_event: threading.Event = field(default_factory=threading.Event)

    def pump(self, echo: bool) -> None:
        """Read the process's output on a thread: find READY, keep a tail, optionally echo."""
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            if line.startswith("READY ") and not self.ready:
                self.ready = json.loads(line[6:])
                self._ready_event.set()
            elif echo:
                print(f"[{self.name}] {line}", flush=True)
        self._ready_event.set()

    def wait_ready(self, timeout: float) -> dict:
        if not self._ready_event.wait(timeout) or not self.ready:
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.tail))
        return self.ready

    # The lifecycle surface launchers use (a Ray-hosted process offers the same).
    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


class LocalCluster:
    """Starts and stops the processes of one cluster on this machine. Usable as a context manager."""

    def __init__(self, spec: ClusterSpec, echo: bool = False, env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.echo = echo
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.workers: list[Process] = []
        self.router: Process | None = None
        self.registry_url = ""

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        assert self.router is not None
        return self.router.ready["grpc_address"]

    @property
    def http_address(self) -> str | None:
        """host:port of the router's OpenAI-compatible HTTP API (None when it is off)."""
        assert self.router is not None
        return self.router.ready.get("http_address")

    def _spawn(self, name: str, argv: Sequence[str], num_gpus: int = 0) -> Process:
        popen = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        process = Process(name, popen)
        threading.Thread(target=process.pump, args=(self.echo,), daemon=True).start()
        return process

    def start_worker(self, role: str, index: int) -> Process:
        spec = self.spec
        argv = ["worker", "--role", role, "--worker-id", f"{role}-{index}", "--model", spec.model]
        argv += ["--device", _device_for(spec.device, index), "--host", spec.host, "--registry", self.registry_url]
        argv += spec.worker_args
        process = self._spawn(f"{role}-{index}", argv, num_gpus=1 if spec.device.startswith("cuda") else 0)
        self.workers.append(process)
        return process

    def start(self) -> None:
        """Router first (it serves the embedded registry, unless `spec.registry` names Redis),
        then the workers, which join by heartbeating; returns once the router can route."""
        spec = self.spec
        roles = ["prefill"] * spec.num_prefill + ["decode"] * spec.num_decode + ["mixed"] * spec.num_mixed
        try:
            argv = ["router", "--model", spec.model, "--registry", spec.registry or "embedded"]
            argv += ["--host", spec.host, "--port", str(spec.router_port)]
            argv += ["--http-port", str(spec.router_http_port), *spec.router_args]
            self.router = self._spawn("router", argv)
            self.registry_url = self.router.wait_ready(READY_TIMEOUT_S)["registry"]
            for index, role in enumerate(roles):
                self.start_worker(role, index)
            for worker in self.workers:
                worker.wait_ready(READY_TIMEOUT_S)
            self.wait_registered({w.ready["worker_id"] for w in self.workers}, READY_TIMEOUT_S)
            self.wait_serving(READY_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def wait_registered(self, worker_ids: set[str], timeout: float) -> None:
        """Until the registry lists every worker we started (and the router has synced once more)."""
        import asyncio

        from cluster.registry import RegistryUnavailable, make_registry

        async def poll() -> None:
            registry = make_registry(self.registry_url)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    with contextlib.suppress(RegistryUnavailable):
                        if worker_ids <= {r.info.worker_id for r in await registry.list_workers()}:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"workers {sorted(worker_ids)} did not all register within {timeout:.0f} s")
                    await asyncio.sleep(0.05)
            finally:
                await registry.close()

        asyncio.run(poll())
        time.sleep(0.3)  # the router re-reads the registry every 0.25 s

    def wait_serving(self, timeout: float) -> None:
        """Until the router's health says SERVING (a decode-capable worker has joined)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.RpcError):
                    status = stub.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=2)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"router at {self.address} did not start serving within {timeout:.0f} s")

    def stop(self, grace_s: float = 5.0) -> None:
        processes = ([self.router] if self.router else []) + self.workers
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + grace_s
        for process in processes:
            if not process.wait(max(0.1, deadline - time.monotonic())):
                process.kill()

    def describe(self) -> str:
        lines = [f"router   gRPC {self.address}  (pdserve.v1.Generation, health, reflection)"]
        if self.http_address:
            lines.append(f"router   HTTP http://{self.http_address}/v1  (OpenAI-compatible API)")
        if self.router is not None and "metrics_address" in self.router.ready:
            lines.append(f"router   metrics http://{self.router.ready['metrics_address']}/metrics")
        for worker in self.workers:
            r = worker.ready
            lines.append(
                f"{worker.name:<9} gRPC {r['grpc_address']}  KV store {r['kv_store']}  "
                f"metrics http://{r['metrics_address']}/metrics  pid {r['pid']}"
            )
        return "\n".join(lines)


def _device_for(device: str, index: int) -> str:
    """`cuda` gives each worker its own GPU (one worker per GPU); an explicit `cuda:N` is kept."""
    return f"cuda:{index}" if device == "cuda" else device


def run(args) -> int:
    spec = ClusterSpec(
        model=args.model,
        num_prefill=args.prefill,
        num_decode=args.decode,
        num_mixed=args.mixed,
        device=args.device,
        host=args.host,
        router_port=args.port,
        http_port=args.http_port,
        worker_args=tuple(args.worker_arg or ()),
        router_args=tuple(args.router_arg or ()),
    )
    if getattr(args, "launcher", "local") == "ray":
        from cluster.launcher_ray import RayCluster

        cluster: LocalCluster = RayCluster(spec, echo=args.verbose, ray_address=args.ray_address)
    else:
        cluster = LocalCluster(spec, echo=args.verbose)
    print(f"starting {spec.num_prefill} prefill + {spec.num_decode} decode + {spec.num_mixed} mixed workers...")
    cluster.start()
    print(cluster.describe(), flush=True)
    print(f'try:  pdserve generate --url {cluster.address} "Hello"    (Ctrl-C stops the cluster)', flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if args.demo is not None:
            _demo(cluster.address, args.demo or ["Hello from pdserve!"])
            return 0
        if not args.no_greeting:
            _demo(cluster.address, ["Hello from pdserve!"])
        while not stop.wait(0.5):
            dead = [p.name for p in [cluster.router, *cluster.workers] if p and not p.alive()]
            if dead:
                print(f"processes exited: {', '.join(dead)}; stopping", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the cluster...", flush=True)
        cluster.stop()
    return 0


def _demo(address: str, prompts: Sequence[str]) -> None:
    from router.client import Client

    with Client(address, timeout=60) as client:
        for prompt in prompts:
            try:
                result = client.generate(prompt, max_tokens=24, temperature=0.8, seed=7)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                print("demo skipped: the router requires an API key")
                return
            print(
                f"prompt: {prompt!r}\noutput: {result.text!r}  ({len(result.token_ids)} tokens, {result.finish_reason})"
            )
