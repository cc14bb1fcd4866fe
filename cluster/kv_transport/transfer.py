"""One transfer's state, shared by the caller's thread, the pair thread and the watchdog.

    sender:    QUEUED ──pair thread starts it──▶ ACTIVE ──last send completes──▶ DONE
    receiver:  QUEUED ──its header arrives─────▶ ACTIVE ──last scatter lands──▶ DONE
               any non-final state ──fail(reason) (cancel, deadline, peer, protocol)──▶ FAILED

The state changes only in `activate`, `complete` and `fail`, under `lock`. The pair thread
touches the blocks (gather / scatter) only while holding `lock` and seeing ACTIVE, and records
the GPU event of that work in `last_event`. `fail` therefore fences: once it returns, no new
block access will be issued, and issued ones are finished (receiver: host waits for the last
scatter) or ordered before the caller's later work (sender: the caller's compute stream waits
for the last gather). Neither kernel ever waits on the network (pairs issue them only after the
host saw the communication they follow complete), so the fence is bounded even with a dead
peer. That is what lets a caller free the blocks the moment a future is done or `cancel()`
returns.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cluster.kv_transport.api import FailureReason, KVTransferError, PeerRef, TransferFuture, TransferResult


class Direction(enum.Enum):
    SEND = "send"
    RECV = "recv"


class State(enum.Enum):
    QUEUED = "queued"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"


class Transfer:
    """Bookkeeping of one transfer (see the module doc for who may change what)."""

    def __init__(
        self,
        direction: Direction,
        transfer_id: str,
        peer: PeerRef,
        block_ids: Sequence[int],  # (an int64 numpy array from `validate_blocks`)
        num_tokens: int,
        num_layers: int,
        num_bytes: int,
        deadline: float,
        on_final: Callable[[Transfer, FailureReason | None], None],
        poll: Callable[[], None] | None = None,
        whole: bool = False,
    ) -> None:
        self.direction = direction
        self.transfer_id = transfer_id
        self.peer = peer
        self.block_ids = block_ids
        self.index: Any = None  # block_ids as an int64 CPU tensor, made by the caller's thread
        # Receiver: the indices already on the device (uploaded by expect's thread); the pair takes
        # them at the header, and a final transfer lets go of them (they hold an upload slot).
        self.device_index: Any = None
        self.num_tokens = num_tokens
        self.num_layers = num_layers
        self.num_bytes = num_bytes
        self.deadline = deadline
        self.whole = whole  # sender: every layer was written before the transfer was submitted
        self.lock = threading.Condition()
        self.state = State.QUEUED
        self.started_at = 0.0
        # Sender: layer readiness (GPU: the event recorded on the compute stream per layer).
        self.layer_ready = [False] * num_layers
        self.layer_events: list[Any] = [None] * num_layers
        self.finished = False
        self.compute_stream: Any = None
        # GPU event of the last issued gather (sender) or scatter (receiver) of these blocks.
        self.last_event: Any = None
        # Set by the pair while ACTIVE: aborts the process group carrying this transfer.
        self.abort_group: Callable[[], None] | None = None
        self.timeline: list[tuple[str, float]] = [("created", time.monotonic())]
        self._on_final = on_final
        self.future = TransferFuture(transfer_id, peer.name, num_layers, self.cancel, poll)

    @property
    def key(self) -> tuple[Direction, str]:
        return (self.direction, self.transfer_id)

    @property
    def is_final(self) -> bool:
        return self.state in (State.DONE, State.FAILED)

    # ------------------------------------------------------------------ state changes
    def activate(self, deadline: float | None = None) -> bool:
        with self.lock:
            if self.state is not State.QUEUED:
                return False
            self.state = State.ACTIVE
            self.started_at = time.monotonic()
            if deadline is not None:
                self.deadline = deadline
            return True

    def complete(self) -> bool:
        with self.lock:
            if self.state is not State.ACTIVE:
                return False
            self.state = State.DONE
            self.abort_group = None
            self.lock.notify_all()
        elapsed = time.monotonic() - self.started_at
        self.mark("complete")
        self.future.num_layers_done = self.num_layers
        self._on_final(self, None)
        result = TransferResult(self.transfer_id, self.peer.name, self.num_bytes, elapsed, tuple(self.timeline))
        self.future._resolve(result, None)
        return True

    def fail(self, reason: FailureReason, detail: str = "") -> bool:
        """Move to FAILED (first failure wins), fence block access, resolve the future."""
        with self.lock:
            if self.is_final:
                return False
            self.state = State.FAILED
            last_event, compute_stream = self.last_event, self.compute_stream
            self.abort_group = None
            self.lock.notify_all()
        self._fence(last_event, compute_stream)
        self._on_final(self, reason)
        self.future._resolve(None, KVTransferError(reason, self.transfer_id, self.peer.name, detail))
        return True

    def mark(self, stage: str) -> None:
        """Stamp a step (list.append is atomic: any thread may call it)."""
        self.timeline.append((stage, time.monotonic()))

    def cancel(self) -> bool:
        return self.fail(FailureReason.ABORTED, "cancelled by this worker")

    def _fence(self, last_event: Any, compute_stream: Any) -> None:
        if last_event is None:
            return
        if self.direction is Direction.RECV:
            last_event.synchronize()  # a scatter, issued only after its data arrived: microseconds
        elif compute_stream is not None:
            compute_stream.wait_event(last_event)  # later writes to the blocks wait for the gather

    # ------------------------------------------------------------------ sender layers
    def mark_ready(self, layers: range, event: Any, compute_stream: Any) -> None:
        with self.lock:
            if self.compute_stream is None:
                self.compute_stream = compute_stream
            for layer in layers:
                if not self.layer_ready[layer]:
                    self.layer_ready[layer] = True
                    self.layer_events[layer] = event
            self.lock.notify_all()

    def wait_layers(self, start: int, end: int, deadline: float) -> list[Any] | None:
        """Block until layers [start, end) are ready; their events, or None once final or past deadline."""
        with self.lock:
            while not all(self.layer_ready[start:end]):
                remaining = deadline - time.monotonic()
                if self.is_final or remaining <= 0:
                    return None
                self.lock.wait(min(remaining, 0.5))
            if self.is_final:
                return None
            return [e for e in dict.fromkeys(self.layer_events[start:end]) if e is not None]
