"""The Ray launcher behind `pdserve up --launcher ray`: the same router and worker processes as
the local launcher, each started inside a Ray actor placed by Ray (with one GPU per worker when
the cluster runs on CUDA). For Ray clusters and KubeRay; pdserve schedules no machines itself.

Every actor runs `python -m cluster.cli <router|worker> ...` as a child process on its node
and relays the child's output lines, so READY parsing, registry, ports and shutdown are exactly
the local launcher's. Nodes need pdserve installed (a container image, or Ray's runtime_env).
Across nodes, start with `--host 0.0.0.0`: each actor then adds `--advertise-host <its node's
IP>`, so the router's registry address, the workers' gRPC and KV-store addresses and the
client's address are ones other nodes can dial.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray

from cluster.launcher import ClusterSpec, LocalCluster

ACTOR_START_TIMEOUT_S = 120.0


WILDCARD_HOSTS = ("0.0.0.0", "::")


def with_node_address(argv: Sequence[str], node_ip: str | None = None) -> list[str]:
    """A router or worker that binds every interface (`--host 0.0.0.0`, what a multi-node Ray
    cluster needs) advertises the address of the node Ray placed it on, unless told one."""
    argv = list(argv)
    binds_all = any(a == "--host" and b in WILDCARD_HOSTS for a, b in itertools.pairwise(argv))
    if binds_all and "--advertise-host" not in argv:
        argv += ["--advertise-host", node_ip or ray.util.get_node_ip_address()]
    return argv


@ray.remote(num_cpus=0)
class ProcessActor:
    """Owns one pdserve process on the actor's node."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.lines: deque[str] = deque(maxlen=200)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *with_node_address(argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> list[str]:
        return list(self.lines)

    def poll(self) -> int | None:
        return self.popen.poll()

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


@dataclass
class RayProcess:
    """The launcher's handle on a process hosted by a ProcessActor (same surface as `Process`)."""

    name: str
    actor: ray.actor.ActorHandle
    ready: dict = field(default_factory=dict)
    tail: deque = field(default_factory=lambda: deque(maxlen=40))

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        import json

        while time.monotonic() < deadline:
            lines = ray.get(self.actor.output.remote(), timeout=ACTOR_START_TIMEOUT_S)
            self.tail.clear()
            self.tail.extend(lines[-40:])
            for line in lines:
                if line.startswith("READY "):
                    self.ready = json.loads(line[6:])
                    return self.ready
            if ray.get(self.actor.poll.remote()) is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.tail))

    def alive(self) -> bool:
        try:
            return ray.get(self.actor.poll.remote(), timeout=10) is None
        except Exception:
            return False

    def terminate(self) -> None:
        ray.get(self.actor.terminate.remote(), timeout=10)

    def wait(self, timeout: float) -> bool:
        return ray.get(self.actor.wait.remote(timeout), timeout=timeout + 10)

    def kill(self) -> None:
        ray.get(self.actor.kill.remote(), timeout=10)


class RayCluster(LocalCluster):
    """A LocalCluster whose processes live in Ray actors."""

    def __init__(
        self, spec: ClusterSpec, echo: bool = False, env: dict[str, str] | None = None, ray_address: str | None = None
    ) -> None:
        super().__init__(spec, echo=echo, env=env)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)

    def _spawn(self, name: str, argv: Sequence[str], num_gpus: int = 0) -> RayProcess:  # type: ignore[override]
        actor = ProcessActor.options(name=f"pdserve-{name}-{time.monotonic_ns()}", num_gpus=num_gpus).remote(
            list(argv), dict(self.env)
        )
        return RayProcess(name, actor)

    def stop(self, grace_s: float = 5.0) -> None:
        try:
            super().stop(grace_s)
        finally:
            for process in ([self.router] if self.router else []) + self.workers:
                ray.kill(process.actor, no_restart=True)
            if self._owns_ray:
                ray.shutdown()
