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
import weakref
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

    def record(self, stream: Any) -> Any:
        """An event marking the work issued so far on `stream` (from `thread_setup`; None on CPU)."""
        return None

    def wait_events(self, events: Sequence[Any], stream: Any) -> None:  # noqa: B027 (CPU work is synchronous)
        """Make `stream` wait for `events` (no host wait)."""

    def synchronize(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def index_uploader(self, stream: Any) -> IndexUploader:
        """A pair's way of putting block indices where its gathers / scatters (on `stream`) run."""
        return IndexUploader(self.device, stream)


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
        return _OnStream(stream)

    # The pair's stream is passed in: looking up the current one costs ~10 us of host time per call
    # on the H200 hosts, and a transfer makes several such calls on its path to the wire.
    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_events(self, events: Sequence[Any], stream: Any) -> None:
        for event in events:
            stream.wait_event(event)


class _OnStream:
    """`torch.cuda.stream(stream)` without its device bookkeeping: two host calls in, one out.

    A whole send to an idle pair switches the caller's thread to the pair's stream once per
    transfer; the public context manager costs several Python-level calls more (current device,
    a `Stream` object for the previous stream, device comparisons) on that path to the wire.
    Sets and restores the current stream of `stream`'s own device, whatever the thread's device.
    """

    __slots__ = ("_previous", "_stream")

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self._stream = stream
        self._previous: tuple[int, int, int] | None = None

    def __enter__(self) -> None:
        stream = self._stream
        self._previous = torch._C._cuda_getCurrentStream(stream.device_index)
        torch._C._cuda_setStream(
            stream_id=stream.stream_id, device_index=stream.device_index, device_type=stream.device_type
        )

    def __exit__(self, *exc_info: object) -> None:
        assert self._previous is not None
        stream_id, device_index, device_type = self._previous
        torch._C._cuda_setStream(stream_id=stream_id, device_index=device_index, device_type=device_type)


class IndexUploader:
    """Puts a transfer's block indices (an int64 CPU tensor, made on the caller's thread) on the
    device, on the pair's stream, never waiting on the host. CPU indices are used as they are.

    CUDA: through a ring of slots, each a pinned host row and a device row. The ids are written
    into a free slot's pinned row (through a numpy view: no torch call) and one asynchronous copy
    moves them. Pinning fresh memory and copying it (`pin_memory().to(...)`) cost ~0.08 ms of host
    time per transfer on the H200 hosts, an eighth of a 4096-token transfer's time on the wire. A
    slot is free again once
    - the copy out of its pinned row has run (an event recorded after the copy), and
    - nobody holds the device tensor it handed out (a weak reference): every gather or scatter
      that read it was then issued on this stream before the next copy into the row.
    When no slot is free, or a transfer has more ids than a row holds, a fresh pinned buffer is
    used instead. Why never a host wait: a slot's copy may sit on the pair's stream
    behind gathers that wait for the prefill's compute (a wait there was the suspected cause of a
    goodput regression on two H200s at e6ebffa). Call it with `stream` current (a pair thread, or
    the caller's thread inside `on_stream`)."""

    NUM_SLOTS = 16
    MIN_IDS = 4096  # a row's first size (65536 tokens in blocks of 16); rows grow to the next power of two

    def __init__(self, device: torch.device, stream: Any = None) -> None:
        self.device = device
        self.stream = stream
        self._capacity = 0
        self._pinned: list[torch.Tensor] = []
        self._host: list[Any] = []  # numpy views of the pinned rows
        self._rows: list[torch.Tensor] = []
        self._copied: list[Any] = []  # per slot: the event after its last copy (None: never used)
        self._lent: list[Any] = []  # per slot: a weak reference to the tensor it last handed out
        self._next = 0
        self.num_fresh = 0  # uploads that could not use the ring (for tests)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return index
        count = index.numel()
        if count > self._capacity:
            self._grow(count)
        slot = self._free_slot()
        if slot is None:
            self.num_fresh += 1
            return index.pin_memory().to(self.device, non_blocking=True)
        self._next = (slot + 1) % self.NUM_SLOTS
        self._host[slot][:count] = index.numpy()
        out = self._rows[slot][:count]
        out.copy_(self._pinned[slot][:count], non_blocking=True)
        copied = self._copied[slot]
        if copied is None:
            copied = self._copied[slot] = torch.cuda.Event()
        copied.record(self.stream)
        self._lent[slot] = weakref.ref(out)
        return out

    def _free_slot(self) -> int | None:
        """The first slot from `_next` on that lends nothing, if its last copy has run (else None).

        A receiver's slot stays lent from its `expect` until the header (see `RecvPair._preload`),
        so lent slots are passed over; one event query at most (copies run in issue order)."""
        for step in range(self.NUM_SLOTS):
            slot = (self._next + step) % self.NUM_SLOTS
            lent = self._lent[slot]
            if lent is None or lent() is None:
                copied = self._copied[slot]
                return slot if copied is None or copied.query() else None
        return None

    def _grow(self, count: int) -> None:
        """New rows for every slot; the old ones stay alive while a transfer holds one (its copy is
        fenced by the host allocator, its device memory by the caching allocator's stream order)."""
        capacity = max(self.MIN_IDS, 1 << (count - 1).bit_length())
        self._pinned = [torch.empty(capacity, dtype=torch.int64, pin_memory=True) for _ in range(self.NUM_SLOTS)]
        self._host = [row.numpy() for row in self._pinned]
        self._rows = [torch.empty(capacity, dtype=torch.int64, device=self.device) for _ in range(self.NUM_SLOTS)]
        self._copied = [None] * self.NUM_SLOTS
        self._lent = [None] * self.NUM_SLOTS
        self._capacity = capacity


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
