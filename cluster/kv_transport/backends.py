"""What differs between gloo (CPU tensors) and NCCL (CUDA tensors): groups, waits, streams, aborts.

Both build a 2-rank group outside any global world from a `PrefixStore`. The pair thread calls
everything here; `abort` may block inside the library, so callers run it on a throwaway thread.

Waiting, which is where a dead peer could hang us:
- gloo: `work.wait(timeout)` with the transfer's remaining deadline. A dead or departed peer
  closes its sockets, which fails the wait at once. gloo cannot interrupt a wait (`abort()` is a
  no-op there); dropping every reference to the group closes its sockets, which is how one side
  tells the other the group is gone.
- NCCL: the host polls `work.is_completed()` (never a blocking `synchronize()`), checking the
  deadline and the pair's `dead` key on the way; on expiry the group is aborted
  (`ProcessGroupNCCL.abort()`), which ends the kernels still spinning on either side.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from cluster.kv_transport.api import FailureReason, TransportConfig


class CommError(Exception):
    """A communication step failed; the pair drops its group and fails the transfer with `reason`."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


class CommOps(abc.ABC):
    """Backend-specific operations; one instance per transport, used from pair threads."""

    name: str = ""

    def __init__(self, device: torch.device, config: TransportConfig) -> None:
        self.device = device
        self.config = config

    # ------------------------------------------------------------------ groups
    @abc.abstractmethod
    def create_group(self, store: dist.Store, rank: int, timeout_s: float) -> Any: ...

    def send(self, group: Any, tensor: torch.Tensor, tag: int) -> Any:
        try:
            return group.send([tensor], 1 - group.rank(), tag)
        except RuntimeError as exc:  # posting on a connection the peer closed
            raise CommError(FailureReason.PEER_GONE, f"{self.name} send: {_first_line(exc)}") from exc

    def recv(self, group: Any, tensor: torch.Tensor, tag: int) -> Any:
        try:
            return group.recv([tensor], 1 - group.rank(), tag)
        except RuntimeError as exc:
            raise CommError(FailureReason.PEER_GONE, f"{self.name} recv: {_first_line(exc)}") from exc

    @abc.abstractmethod
    def wait(self, work: Any, deadline: float, is_dead: Callable[[], bool]) -> None:
        """Host-wait for `work`; raise CommError on failure, deadline or a peer-dropped group.

        Afterwards work issued on this thread's stream is ordered after `work`. Wait once per
        work (a gloo work counts completions: a second wait waits for one that never comes).
        """

    can_poll = False  # whether `poll` can tell completion without blocking

    def poll(self, work: Any) -> bool:
        """Has `work` finished (successfully or not)? Only where `can_poll`."""
        raise NotImplementedError

    def abort(self, group: Any) -> None:  # noqa: B027 (gloo has nothing to abort)
        """Best effort: end the group's pending operations. May block; call off the hot path."""

    # ------------------------------------------------------------------ device side
    def thread_setup(self) -> Any:
        """Called once on a pair thread: bind the device, return the pair's transfer stream."""
        return None

    def on_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Make `stream` (from `thread_setup`) current on the calling thread for a while."""
        return contextlib.nullcontext()

    def record(self) -> Any:
        """An event marking the work issued so far on this thread's current stream (None on CPU)."""
        return None

    def wait_events(self, events: Sequence[Any]) -> None:  # noqa: B027 (CPU work is synchronous)
        """Make this thread's current stream wait for `events` (no host wait)."""

    def synchronize(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def index_uploader(self) -> IndexUploader:
        """A pair's way of putting block indices where the gather / scatter kernels run."""
        return IndexUploader(self.device)


class GlooOps(CommOps):
    name = "gloo"

    def create_group(self, store: dist.Store, rank: int, timeout_s: float) -> Any:
        options = dist.ProcessGroupGloo._Options()
        options._timeout = _timedelta(timeout_s)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.config.host)]
        return dist.ProcessGroupGloo(store, rank, 2, options)

    def wait(self, work: Any, deadline: float, is_dead: Callable[[], bool]) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CommError(FailureReason.TIMEOUT, "deadline passed before the operation finished")
        try:
            work.wait(_timedelta(remaining))
        except RuntimeError as exc:
            text = _first_line(exc)
            if time.monotonic() >= deadline - 0.05 or "timed out" in text.lower():
                raise CommError(FailureReason.TIMEOUT, f"gloo: {text}") from exc
            raise CommError(FailureReason.PEER_GONE, f"gloo: {text}") from exc


class NcclOps(CommOps):
    name = "nccl"
    # Poll finely for the first moments of a wait (transfers take micro- to milliseconds), then
    # back off so a long layer-wise wait does not burn the host.
    _SPIN_S = 0.002
    _MAX_SLEEP_S = 200e-6
    _DEAD_CHECK_S = 0.05

    def __init__(self, device: torch.device, config: TransportConfig) -> None:
        super().__init__(device, config)
        self._stream: torch.cuda.Stream | None = None

    def create_group(self, store: dist.Store, rank: int, timeout_s: float) -> Any:
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = True
        # c10d's watchdog tears the process down on timeout; ours acts first (see module doc).
        options._timeout = _timedelta(self.config.comm_timeout_s)
        return dist.ProcessGroupNCCL(store, rank, 2, options)

    def wait(self, work: Any, deadline: float, is_dead: Callable[[], bool]) -> None:
        start = time.monotonic()
        next_dead_check = start + self._DEAD_CHECK_S
        sleep = 0.0
        try:
            while not work.is_completed():
                now = time.monotonic()
                if now >= deadline:
                    raise CommError(FailureReason.TIMEOUT, "deadline passed before the NCCL operation finished")
                if now >= next_dead_check:
                    if is_dead():
                        raise CommError(FailureReason.PEER_GONE, "the peer dropped the process group")
                    next_dead_check = now + self._DEAD_CHECK_S
                if now - start > self._SPIN_S:
                    sleep = min(self._MAX_SLEEP_S, sleep * 2 or 20e-6)
                time.sleep(sleep)
            work.wait()  # raises if the work failed; orders this thread's stream after it
        except CommError:
            raise
        except RuntimeError as exc:
            raise CommError(FailureReason.PEER_GONE, f"nccl: {_first_line(exc)}") from exc

    can_poll = True

    def poll(self, work: Any) -> bool:
        try:
            return work.is_completed()
        except RuntimeError:
            return True  # failed: `wait` raises the error

    def abort(self, group: Any) -> None:
        group.abort()

    def thread_setup(self) -> Any:
        torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(self.device, priority=-1)
        torch.cuda.set_stream(stream)
        return stream

    def on_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record()
        return event

    def wait_events(self, events: Sequence[Any]) -> None:
        stream = torch.cuda.current_stream(self.device)
        for event in events:
            stream.wait_event(event)


class IndexUploader:
    """Copies a transfer's block indices (an int64 CPU tensor, made on the caller's thread) to the
    device on the calling thread's stream, asynchronously from freshly pinned memory. It never
    waits on the host: a pinned buffer reused across transfers would have to wait for the last
    upload, which on the pair's stream queues behind gathers that wait for the prefill's compute
    (the suspected cause of a goodput regression on two H200s at e6ebffa). CPU indices are used
    as they are."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return index
        return index.pin_memory().to(self.device, non_blocking=True)


def make_ops(backend: str, device: torch.device, config: TransportConfig) -> CommOps:
    if backend == "gloo":
        if device.type != "cpu":
            raise ValueError(f"the gloo transport moves CPU tensors; the KV cache is on {device}")
        return GlooOps(device, config)
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"the nccl transport moves CUDA tensors; the KV cache is on {device}")
        if not dist.is_nccl_available():
            raise ValueError("this torch build has no NCCL")
        return NcclOps(device, config)
    raise ValueError(f"unknown comm backend {backend!r}")
