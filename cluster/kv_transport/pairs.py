"""Per-pair worker threads: `SendPair` (this worker sends to a peer) and `RecvPair` (receives from one).

A pair owns one peer incarnation, one thread, at most one live process-group generation, its
own store connections, `config.staging_depth` staging buffers and (on GPU) its own transfer stream. Nothing is
shared between pairs, so one pair's failure cannot stall another. The wire protocol is in
`protocol.py`; the transfer state machine in `transfer.py`.

Pipelining (both sides, depth K = `config.staging_depth` staging buffers, chunk i uses buffer
i % K; shown for K = 2):

    sender   gather0 send0 | gather1 send1 | [send0 done] gather2 send2 | ...
    receiver recv0 recv1   | [recv0 done] scatter0 recv2 | [recv1 done] scatter1 recv3 | ...

With K buffers the receiver has K receives posted before the first byte arrives, and the sender
gathers K chunks ahead, so the wire never waits for a host round trip while K > 2 chunks remain.
Slots are counted across transfers on both sides: the sender starts the next transfer while the
last one's sends are on the wire, and the receiver reads the next header and posts its receives
while the last transfer's chunks are still arriving (`RecvPair._post_ready`). Back-to-back
transfers to one receiver leave the link no gap of the protocol's making; what is left is host
time. On two H200s, bursts of 8192-token (and longer) transfers ran at 0.87-0.93 of raw NCCL and
4096-token ones at 0.84-0.88 at c567b80 (the code before it: 0.70-0.87 in the same machine
sessions), by the host's state: the sender's caller posts each transfer in ~0.5 ms of Python against 0.67 ms on the
wire, and a burst pays ~0.6 ms more than raw to start and finish
(benchmarks/results/kv_transfer_NOTES.md).
Chunks: a whole-prompt transfer is cut into `config.chunk_bytes` pieces; a layer-wise stream
into at most `config.stream_chunk_layers` layers, so little is left to send when the prefill's
last layer is done.

On GPU every step is enqueued on the pair's stream (c10d runs NCCL on its own stream, ordered
after ours at each call), so gathers and scatters overlap the wire. The `[... done]` steps are
host-confirmed: a gather or scatter is issued only once the send or recv it must follow has
completed, so no kernel that touches the KV blocks ever waits on the network. That is what keeps
`cancel()` immediate and bounded even with a dead peer (see `transfer.py`): the caller's compute
stream may be made to wait for an issued gather, never for a peer.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from cluster.kv_transport import kv_io
from cluster.kv_transport.api import FailureReason, KVSpec, PeerRef, TransportConfig
from cluster.kv_transport.backends import CommError, CommOps
from cluster.kv_transport.protocol import (
    CTL_KEY,
    GEN_KEY,
    HELLO_KEY,
    PROBE_MAGIC,
    ChannelClosed,
    End,
    Header,
    Hello,
    Message,
    Open,
    Wake,
    channel_key,
    check_header,
    dead_key,
    decode,
    encode,
    group_prefix,
    pair_prefix,
    read_frame,
    write_frame,
)
from cluster.kv_transport.transfer import State, Transfer

log = logging.getLogger(__name__)

_IDLE_POP_S = 60.0  # an idle receiver re-arms its blocking pop this often (each timeout logs a line)
# A receiving pair with nothing expected and no message for this long retires (its sender may be
# long gone); a later expect starts a new one, and the sender's idle re-check rebuilds the group.
_IDLE_CLOSE_S = 600.0
# After this much idleness a sender asks the receiver's store whether it dropped the group (one
# round trip). A drop while idle is rare (the receiver failed on its own); if missed, one transfer
# fails retryably and the pair rebuilds.
_RECHECK_IDLE_S = 5.0
_TAG_LIMIT = 1 << 30
# How often a sender with sends in flight polls them (NCCL): first every _POLL_S, backing off to
# _MAX_POLL_S while none completes. Each wake-up takes the GIL from the caller's thread, which on
# a burst is posting the next transfers: at a fixed 200 us, a 4096-token burst's caller lost
# ~30 wake-ups' worth of host time. A completion noticed late only frees the sender's blocks later.
_POLL_S = 200e-6
_MAX_POLL_S = 0.001
_DEAD_CHECK_S = 0.05  # how often a waiting side checks whether the peer dropped the group
# A receiver waiting for a chunk polls without sleeping this long, then backs off to _MAX_SLEEP_S
# (chunks take ~0.1-0.2 ms on NVLink; a wake-up from a longer sleep would cost as much again).
_SPIN_S = 0.002
_MAX_SLEEP_S = 200e-6
# How long a caller's thread waits for the sender's pair thread to finish host work it does
# holding the post lock (reaping, posting a queued transfer) before leaving its transfer to the queue.
_CALLER_WAIT_S = 0.002


class PairHost(Protocol):
    """What a pair needs from its transport."""

    ops: CommOps
    config: TransportConfig
    spec: KVSpec
    rows: torch.Tensor
    local: PeerRef

    def new_store_client(self) -> dist.Store: ...

    def push_control(self, prefix: str, raw: bytes) -> None: ...

    def note_group(self, built: bool) -> None: ...

    def note_orphan(self, transfer_id: str) -> None: ...


def _store_error_text(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


class Pair(abc.ABC):
    """Shared machinery: the thread, the live group generation, dropping and aborting groups."""

    role = ""

    def __init__(self, host: PairHost, peer: PeerRef) -> None:
        self.host = host
        self.peer = peer
        self.closed = False
        self.group: Any = None
        self.gen = 0
        self.seq = 0
        self.chan: socket.socket | None = None  # the live generation's control channel
        self._pair_store: dist.Store | None = None
        self._staging: kv_io.StagingBuffers | None = None
        self._upload_index: Any = None  # set on the pair thread (see backends.IndexUploader)
        self._stream: Any = None  # the pair's transfer stream (GPU), set on the pair thread
        self.thread = threading.Thread(target=self._main, name=f"kvt-{self.role}-{peer.worker_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            self._stream = self.host.ops.thread_setup()
            depth = self.host.config.staging_depth
            self._staging = kv_io.StagingBuffers(self.host.rows.dtype, self.host.rows.device, depth)
            self._upload_index = self.host.ops.index_uploader(self._stream)
            self._run()
        except Exception as exc:  # a bug here must not kill the worker: fail this pair's transfers
            log.exception("KV transport %s pair with %s crashed", self.role, self.peer.name)
            self.close(FailureReason.PROTOCOL_ERROR, f"internal error: {exc!r}")
        finally:
            self._drop_group("pair closed")

    @abc.abstractmethod
    def _run(self) -> None:
        """The pair thread's body (sender or receiver)."""

    @abc.abstractmethod
    def close(self, reason: FailureReason, detail: str) -> None:
        """Fail every transfer of this pair with `reason` and stop its thread."""

    # ------------------------------------------------------------------ groups
    def _is_dead(self) -> bool:
        """Has the peer dropped our generation? (An unreachable store counts as dropped.)"""
        try:
            return self._pair_store is not None and self._pair_store.check([dead_key(self.gen)])
        except Exception:
            return True

    def _mark_dead(self, gen: int, why: str) -> None:
        try:
            if self._pair_store is not None:
                self._pair_store.set(dead_key(gen), why[:200])
        except Exception:
            pass  # the peer (or its store) is gone; it will notice on its own

    def _drop_group(self, why: str) -> None:
        self._close_channel()
        group, gen = self.group, self.gen
        if group is None:
            return
        self.group = None
        log.info("KV transport: dropping %s group g%d with %s: %s", self.role, gen, self.peer.name, why)
        self._mark_dead(gen, why)
        abort_group_async(self.host.ops, group)
        self.host.note_group(built=False)

    def _close_channel(self) -> None:
        chan, self.chan = self.chan, None
        if chan is not None:
            chan.close()

    @staticmethod
    def _group_store(store: dist.Store, prefix: str, gen: int) -> dist.Store:
        """The generation's rendezvous namespace, on a connection of its own (c10d may use it from its threads)."""
        return dist.PrefixStore(f"{prefix}/{group_prefix(gen)}", store.clone())

    def _chunks(self, num_blocks: int, whole: bool, idle: bool = False) -> list[tuple[int, int]]:
        """A transfer's layer chunks; a whole send to an idle pair gets small edge chunks
        (`TransportConfig.edge_split_bytes`): with sends in flight, the wire is busy with those
        while the first gather runs, and the extra chunks' host time would slow a burst."""
        config = self.host.config
        bytes_per_layer = num_blocks * self.host.spec.bytes_per_block_layer
        max_layers = None if whole else config.stream_chunk_layers
        chunks = kv_io.plan_chunks(self.host.spec.num_layers, bytes_per_layer, config.chunk_bytes, max_layers)
        if whole and idle:
            chunks = kv_io.split_edges(chunks, bytes_per_layer, config.edge_split_bytes)
        return chunks


def _readable(chan: socket.socket) -> bool:
    """Can `chan` be read without blocking (a frame, or its end)? A broken socket counts as readable."""
    try:
        readable, _, _ = select.select([chan], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def abort_group_async(ops: CommOps, group: Any) -> None:
    """Abort a group off the calling thread (an abort may block inside the library)."""

    def run() -> None:
        try:
            ops.abort(group)
        except Exception as exc:
            log.warning("KV transport: aborting a group raised %s", exc)

    threading.Thread(target=run, name="kvt-abort", daemon=True).start()


@dataclass
class _Posted:
    """One posted send; `done` once the host saw it complete (a gloo work may be waited only once)."""

    work: Any
    done: bool = False


@dataclass
class _Outgoing:
    """A transfer whose header went out, and how far its chunks are posted. Posting may begin on
    the caller's thread (`SendPair.submit`) and end on the pair thread; either way every chunk the
    header announced is posted (filler after a cancel), so the receiver stays in step."""

    chunks: list[tuple[int, int]]
    seq: int
    index: Any
    buffers: list[torch.Tensor]
    posts: list[_Posted] = field(default_factory=list)
    next_chunk: int = 0
    all_gathered: bool = True

    @property
    def tag(self) -> int:
        return 1 + self.seq % _TAG_LIMIT

    @property
    def posted_all(self) -> bool:
        return self.next_chunk == len(self.chunks)


class SendPair(Pair):
    """Sends this worker's transfers to one receiver incarnation, in FIFO order. Rank 1.

    Where completions can be polled (NCCL), the thread starts the next transfer while the last
    one's sends are still on the wire, and resolves futures as their sends complete (`_inflight`).

    A whole-prompt send to an idle pair with a live group starts on the caller's thread: header,
    index upload, and every gather and send whose staging buffer is free, with no host wait. A
    hand-off to the pair thread costs 0.1-0.3 ms on the GPU hosts, longer than a gather of 4096
    tokens' KV; the pair thread posts what is left (`_started`) and completes the transfer.
    `_post_lock` is held by whichever thread posts on the group or changes its state; lock order:
    `_post_lock`, then `_cv`. The pair thread picks its next transfer only while holding it, so a
    transfer's chunks always go out back to back (NCCL matches in posting order). A caller's
    thread that finds it taken waits for it, briefly (`_CALLER_WAIT_S`), unless the holder is
    waiting on the peer or on the prefill's compute (`_holder_waits`): then it leaves its transfer
    to the queue at once. Why wait at all: the pair thread can only run while the caller's thread
    gives up the GIL, and a caller that queues and goes on with Python work (submitting the next
    transfers) keeps it for up to the interpreter's switch interval (5 ms). On two H200s a burst
    of 4096-token sends lost ~1 ms of wire time per burst that way, the pair thread holding the
    lock while it had no GIL.
    """

    role = "send"

    def __init__(self, host: PairHost, peer: PeerRef) -> None:
        super().__init__(host, peer)
        self._cv = threading.Condition()
        self._queue: deque[Transfer] = deque()
        self._current: Transfer | None = None
        self._started: tuple[Transfer, _Outgoing] | None = None  # begun on a caller's thread, chunks left
        self._post_lock = threading.Lock()
        self._holder_waits = False  # the post lock's holder is waiting on the peer or the compute
        self._parked = False  # the pair thread waits for a transfer with nothing in flight to poll
        self._inflight: deque[tuple[Transfer, list[_Posted]]] = deque()  # all sent, not yet seen complete
        self._num_posted = 0  # chunks posted on this group: chunk k goes out of staging buffer k % depth
        self._last_post: list[_Posted | None] = [None] * host.config.staging_depth
        self._store: dist.Store | None = None
        self._last_use = 0.0
        self.mismatch: str | None = None  # handshake failed: every transfer fails at once

    def submit(self, transfer: Transfer) -> None:
        if transfer.whole and self._start_here(transfer):
            return
        with self._cv:
            if self.closed or self.mismatch is not None:
                reason = FailureReason.HANDSHAKE_MISMATCH if self.mismatch else FailureReason.ABORTED
                detail = self.mismatch or "pair closed"
            else:
                self._queue.append(transfer)
                self._cv.notify()
                return
        transfer.fail(reason, detail)

    def close(self, reason: FailureReason, detail: str) -> None:
        """Fail every queued and in-flight transfer with `reason`; the thread exits (any thread)."""
        with self._cv:
            self.closed = True
            victims = [*self._queue, *([self._current] if self._current else []), *(t for t, _ in self._inflight)]
            victims += [self._started[0]] if self._started else []
            self._queue.clear()
            group = self.group
            self._cv.notify_all()
        for transfer in victims:
            transfer.fail(reason, detail)
        if group is not None:
            abort_group_async(self.host.ops, group)

    def _start_here(self, transfer: Transfer) -> bool:
        """Begin a whole send on the caller's thread if the pair is idle and its group live (see the
        class doc); False leaves it to the queue. Never waits on the peer."""
        if not self._take_post_lock():
            return False
        try:
            with self._cv:
                if self.closed or self.mismatch is not None or self._queue or self._current or self._started:
                    return False
                if not self._group_is_fresh():
                    return False
                self._current = transfer
            with self._sending(transfer) as left, self.host.ops.on_stream(self._stream):
                if self._inflight and not self.host.ops.can_poll:
                    return False  # the pair thread is waiting for those sends (gloo)
                chunks = self._chunks(len(transfer.block_ids), whole=True, idle=not self._inflight)
                if self._inflight and self._staging_too_small(chunks, len(transfer.block_ids)):
                    return False  # growing the buffers waits for the sends in flight
                outgoing = self._begin(transfer, chunks)
                if outgoing is not None:
                    self._post(transfer, outgoing, may_wait=False)
                    if not outgoing.posted_all:
                        left.append((transfer, outgoing))  # the pair thread posts the rest
                if self.host.ops.can_poll:
                    self._reap(block=False)  # after posting: the wire first, finished transfers after
            return True
        finally:
            self._post_lock.release()

    def _take_post_lock(self) -> bool:
        """The post lock for a caller's thread (see the class doc), or False to queue instead."""
        if self._post_lock.acquire(blocking=False):
            return True
        with self._cv:
            if self._queue or self._started:
                return False  # it would go behind those anyway
        return not self._holder_waits and self._post_lock.acquire(timeout=_CALLER_WAIT_S)

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[None]:
        """Mark a wait on the peer or the compute made while holding the post lock."""
        self._holder_waits = True
        try:
            yield
        finally:
            self._holder_waits = False

    def _group_is_fresh(self) -> bool:
        """A live group whose receiver cannot have dropped it unnoticed (`_ensure_group` would not check)."""
        if self.group is None or time.monotonic() - self._last_use > _RECHECK_IDLE_S:
            return False
        return not self._channel_closed()

    def _await_transfers(self) -> bool:
        """Wait until a transfer is queued or handed over by a caller's thread (False once closed);
        meanwhile resolve in-flight ones as their sends complete."""
        next_dead_check = time.monotonic() + _DEAD_CHECK_S
        can_poll = self.host.ops.can_poll
        poll_s = _POLL_S
        while True:
            with self._cv:
                while self._queue and self._queue[0].is_final:
                    self._queue.popleft()
                if self.closed:
                    return False
                if self._started is not None or self._queue:
                    return True
                if not self._inflight:
                    self._parked = True
                    self._cv.wait()
                    self._parked = False
                    poll_s = _POLL_S
                    continue
                if can_poll:
                    self._cv.wait(poll_s)  # woken early by a new transfer
            # Polling never queues behind a caller's thread that is posting: it reaps on its way.
            if not self._post_lock.acquire(blocking=not can_poll):
                continue
            try:
                num_inflight = len(self._inflight)
                self._reap_or_fail(block=not can_poll)
                poll_s = _POLL_S if len(self._inflight) < num_inflight else min(2 * poll_s, _MAX_POLL_S)
                if self._inflight and time.monotonic() >= next_dead_check:
                    next_dead_check = time.monotonic() + _DEAD_CHECK_S
                    if self._is_dead():
                        self._fail_group(CommError(FailureReason.PEER_GONE, "the receiver dropped the group"), None)
            finally:
                self._post_lock.release()

    def _take_next(self) -> tuple[Transfer, _Outgoing | None] | None:
        """What the pair thread posts now (`_post_lock` held): the rest of a transfer a caller's
        thread began, else the queue's head. Taken only under the lock, so no caller's thread is
        part-way through a transfer: a transfer's chunks go out back to back, never interleaved
        with another's (NCCL matches sends to receives in posting order)."""
        with self._cv:
            while self._queue and self._queue[0].is_final:
                self._queue.popleft()
            if self.closed:
                return None
            if self._started is not None:
                item, self._started = self._started, None
            elif self._queue:
                item = (self._queue.popleft(), None)
            else:
                return None
            self._current = item[0]
            return item

    def _run(self) -> None:
        while self._await_transfers():
            with self._post_lock:
                item = self._take_next()
                if item is None:
                    continue
                transfer, outgoing = item
                with self._sending(transfer):
                    if outgoing is None:
                        with self._waiting():
                            self._ensure_group(transfer)
                        with self._cv:
                            idle = not self._inflight and not self._queue
                        chunks = self._chunks(len(transfer.block_ids), transfer.whole, idle)
                        if self._staging_too_small(chunks, len(transfer.block_ids)):
                            self._reap(block=True)  # nothing in flight may still read the buffers replaced
                            self._last_post = [None] * len(self._last_post)
                        outgoing = self._begin(transfer, chunks)
                    if outgoing is not None:
                        self._post(transfer, outgoing, may_wait=True)
                    self._reap(block=not self.host.ops.can_poll)

    @contextlib.contextmanager
    def _sending(self, transfer: Transfer) -> Iterator[list[tuple[Transfer, _Outgoing]]]:
        """Work on `transfer` as the current one (either thread, `_post_lock` held): a failure fails
        the group and what is on it instead of propagating. A caller's thread puts the transfer it
        leaves part-posted into the yielded list: it becomes `_started` in the same step that ends
        this turn, and the pair thread takes it once the lock is free. (Whoever leaves work for the
        pair thread wakes it: here for chunks left, `_post` for sends to reap.)"""
        left: list[tuple[Transfer, _Outgoing]] = []
        try:
            yield left
        except CommError as exc:
            left.clear()
            self._fail_group(exc, transfer)
        except Exception as exc:
            left.clear()
            log.exception("KV transport: sending %s to %s failed", transfer.transfer_id, self.peer.name)
            self._fail_group(CommError(FailureReason.PROTOCOL_ERROR, f"internal error: {exc!r}"), transfer)
        finally:
            with self._cv:
                self._current = None
                if left:
                    self._started = left[0]
                    self._cv.notify()

    def _fail_group(self, exc: CommError, transfer: Transfer | None) -> None:
        """The group is unusable: fail what is on it, drop it (and the store link), maybe close."""
        with self._cv:
            victims = [t for t, _ in self._inflight] + ([transfer] if transfer is not None else [])
            if self._started is not None:
                victims.append(self._started[0])
                self._started = None
            self._inflight.clear()
        for victim in victims:
            victim.fail(exc.reason, exc.detail)
        self._drop_group(exc.detail)
        self._drop_store()
        if exc.reason in (FailureReason.HANDSHAKE_MISMATCH, FailureReason.PEER_RESTARTED):
            # The peer at this address will never take our transfers: fail the rest now.
            with self._cv:
                self.mismatch = exc.detail if exc.reason is FailureReason.HANDSHAKE_MISMATCH else None
            self.close(exc.reason, exc.detail)

    def _reap_or_fail(self, block: bool) -> None:
        try:
            self._reap(block)
        except CommError as exc:
            self._fail_group(exc, None)

    def _reap(self, block: bool) -> None:
        """Resolve in-flight transfers whose sends completed, oldest first (wait for them if `block`)."""
        ops = self.host.ops
        while self._inflight:
            transfer, posts = self._inflight[0]
            for post in posts:
                if post.done:
                    continue
                if not block and not ops.poll(post.work):
                    return
                with self._waiting() if block else contextlib.nullcontext():  # else done: no wait
                    ops.wait(post.work, transfer.deadline, self._is_dead)
                post.done = True
            with self._cv:
                self._inflight.popleft()
            self._last_use = time.monotonic()
            transfer.complete()

    # ------------------------------------------------------------------ rendezvous
    def _connect_store(self, deadline: float) -> dist.Store:
        if self._store is None:
            timeout = datetime.timedelta(seconds=max(0.05, deadline - time.monotonic()))
            try:
                store = dist.TCPStore(self.peer.host, self.peer.port, None, False, timeout, wait_for_workers=False)
            except Exception as exc:
                text = _store_error_text(exc)
                raise CommError(
                    FailureReason.PEER_GONE, f"cannot reach {self.peer.host}:{self.peer.port}: {text}"
                ) from exc
            self._store = store
            self._pair_store = dist.PrefixStore(pair_prefix(self.host.local, self.peer), store)
        self._store.set_timeout(datetime.timedelta(seconds=self.host.config.connect_timeout_s))
        return self._store

    def _drop_store(self) -> None:
        self._store = None
        self._pair_store = None

    def _ensure_group(self, transfer: Transfer) -> None:
        if self.group is not None:
            if self._channel_closed():
                self._drop_group("the receiver closed the control channel")
            else:
                idle = time.monotonic() - self._last_use > _RECHECK_IDLE_S
                if not (idle and self._is_dead()):
                    return
                self._drop_group("the receiver dropped it while idle")
        deadline = min(transfer.deadline, time.monotonic() + self.host.config.connect_timeout_s)
        store = self._connect_store(deadline)
        assert self._pair_store is not None
        try:
            hello = Hello.decode(store.get(HELLO_KEY))
        except Exception as exc:
            raise CommError(
                FailureReason.PEER_GONE, f"no hello from {self.peer.name}: {_store_error_text(exc)}"
            ) from exc
        if hello.worker_id != self.peer.worker_id:
            raise CommError(FailureReason.PEER_GONE, f"{self.peer.host}:{self.peer.port} now serves {hello.worker_id}")
        if hello.incarnation != self.peer.incarnation:
            raise CommError(
                FailureReason.PEER_RESTARTED,
                f"{self.peer.worker_id} restarted: incarnation {hello.incarnation}, not {self.peer.incarnation}",
            )
        local = self.host.local
        problems = self.host.spec.mismatches(hello.spec)
        if problems:
            # Generation 0 carries no group: it only lets the receiver fail its expects at once.
            self._push_queue(Open(0, local.worker_id, local.incarnation, self.host.spec))
            raise CommError(FailureReason.HANDSHAKE_MISMATCH, "; ".join(problems))
        try:
            gen = self._pair_store.add(GEN_KEY, 1)
            self._pair_store.queue_push(CTL_KEY, encode(Open(gen, local.worker_id, local.incarnation, self.host.spec)))
            group_store = self._group_store(self._store, pair_prefix(local, self.peer), gen)
        except Exception as exc:
            raise CommError(FailureReason.PEER_GONE, f"store of {self.peer.name}: {_store_error_text(exc)}") from exc
        self.gen = gen
        try:
            group = self.host.ops.create_group(group_store, 1, max(0.05, deadline - time.monotonic()))
        except Exception as exc:
            self._mark_dead(gen, "sender could not build the group")
            raise CommError(
                FailureReason.TIMEOUT, f"group g{gen} with {self.peer.name}: {_store_error_text(exc)}"
            ) from exc
        probe = torch.tensor([PROBE_MAGIC, gen], dtype=torch.int64, device=self.host.rows.device)
        self.group, self.seq = group, 0
        self._num_posted, self._last_post = 0, [None] * len(self._last_post)
        self.host.note_group(built=True)
        self.host.ops.wait(self.host.ops.send(group, probe, 0), deadline, self._is_dead)
        self._connect_channel(gen, local, deadline)
        self._last_use = time.monotonic()
        log.info("KV transport: send group g%d with %s is up", gen, self.peer.name)

    def _channel_closed(self) -> bool:
        """Did the receiver close the channel? (It never writes to it: readable means closed.)"""
        return self.chan is None or _readable(self.chan)

    def _connect_channel(self, gen: int, local: PeerRef, deadline: float) -> None:
        assert self._pair_store is not None
        try:
            port = int(self._pair_store.get(channel_key(gen)))
            chan = socket.create_connection((self.peer.host, port), timeout=max(0.05, deadline - time.monotonic()))
            chan.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chan.settimeout(self.host.config.connect_timeout_s)  # frames are small: a full buffer means a dead peer
            write_frame(chan, Open(gen, local.worker_id, local.incarnation, self.host.spec))
        except Exception as exc:
            self._mark_dead(gen, "sender could not open the control channel")
            raise CommError(
                FailureReason.PEER_GONE, f"control channel of g{gen} with {self.peer.name}: {_store_error_text(exc)}"
            ) from exc
        self.chan = chan

    # ------------------------------------------------------------------ one transfer
    def _begin(self, transfer: Transfer, chunks: list[tuple[int, int]]) -> _Outgoing | None:
        """Activate `transfer`, write its header and put its indices on the device (None: it was
        cancelled or expired while queued). The staging buffers must already be big enough, or
        nothing may be in flight (see `_staging_too_small`)."""
        ops, group = self.host.ops, self.group
        num_blocks = len(transfer.block_ids)
        if not transfer.activate():
            return None
        transfer.mark("start")
        with transfer.lock:
            transfer.abort_group = lambda: abort_group_async(ops, group)
        seq, self.seq = self.seq, self.seq + 1
        header = Header(
            gen=self.gen,
            seq=seq,
            transfer_id=transfer.transfer_id,
            num_layers=self.host.spec.num_layers,
            num_tokens=transfer.num_tokens,
            num_blocks=num_blocks,
            dtype=self.host.spec.dtype,
            block_size=self.host.spec.block_size,
            layout=self.host.spec.layout,
            chunks=tuple(chunks),
            deadline_s=max(0.0, transfer.deadline - time.monotonic()),
        )
        self._push(header)
        transfer.mark("header")
        index = self._upload_index(transfer.index)
        assert self._staging is not None
        buffers = self._staging.reserve(self._words(chunks, num_blocks))
        return _Outgoing(chunks, seq, index, buffers)

    def _post(self, transfer: Transfer, out: _Outgoing, may_wait: bool) -> None:
        """Post `out`'s remaining chunks (gathering each as its layers are ready); `_reap` completes
        the transfer once all are posted. Without `may_wait`, stop at the first chunk whose staging
        buffer is still on the wire (the pair thread goes on from there)."""
        ops, rows, group = self.host.ops, self.host.rows, self.group
        num_blocks = len(transfer.block_ids)
        while not out.posted_all:
            i = out.next_chunk
            chunk = out.chunks[i]
            slot = self._num_posted % len(self._last_post)
            previous = self._last_post[slot]
            if previous is not None and not previous.done:  # host-confirmed: no gather waits on the wire
                if not may_wait and not (ops.can_poll and ops.poll(previous.work)):
                    return
                with self._waiting():
                    ops.wait(previous.work, transfer.deadline, self._is_dead)
                previous.done = True
            with self._waiting():
                events = self._wait_layers(transfer, chunk)
            view = kv_io.staging_view(out.buffers[slot], rows, chunk, num_blocks)
            with transfer.lock:
                gathered = transfer.state is State.ACTIVE and events is not None
                if gathered:
                    ops.wait_events(events, self._stream)
                    kv_io.gather(rows, chunk, out.index, view)
                    transfer.last_event = ops.record(self._stream)
            out.all_gathered &= gathered  # after a cancel the rest is filler; End(ok=False) says so
            transfer.mark(f"gather{i}")
            post = _Posted(ops.send(group, view, out.tag))
            transfer.mark(f"send{i}")
            if i == len(out.chunks) - 1:  # (after the send: a frame lands long before a chunk does)
                self._push(End(self.gen, out.seq, out.all_gathered))
                transfer.mark("end")
            self._last_post[slot] = post
            self._num_posted += 1
            out.posts.append(post)
            out.next_chunk = i + 1
            transfer.future.num_layers_done = chunk[1]
        with self._cv:
            self._inflight.append((transfer, out.posts))
            if self._parked:  # (a caller's thread posted it: the pair thread must start polling)
                self._cv.notify()

    def _wait_layers(self, transfer: Transfer, chunk: tuple[int, int]) -> list[Any] | None:
        """The chunk's layer events once ready (None: cancelled), resolving earlier transfers meanwhile."""
        while True:
            tick = time.monotonic() + (0.001 if self._inflight else 1.0)
            events = transfer.wait_layers(chunk[0], chunk[1], min(transfer.deadline, tick))
            if events is not None or transfer.is_final:
                return events
            if time.monotonic() >= transfer.deadline:
                raise CommError(FailureReason.TIMEOUT, f"layers {chunk[0]}..{chunk[1] - 1} not ready by the deadline")
            self._reap(block=False)

    def _words(self, chunks: list[tuple[int, int]], num_blocks: int) -> int:
        return max(kv_io.chunk_words(self.host.rows, c, num_blocks) for c in chunks)

    def _staging_too_small(self, chunks: list[tuple[int, int]], num_blocks: int) -> bool:
        assert self._staging is not None
        return self._staging.num_words < self._words(chunks, num_blocks)

    def _push(self, message: Message) -> None:
        """A Header or End, on the generation's control channel."""
        assert self.chan is not None
        try:
            write_frame(self.chan, message)
        except OSError as exc:
            raise CommError(FailureReason.PEER_GONE, f"control channel to {self.peer.name}: {exc}") from exc

    def _push_queue(self, message: Message) -> None:
        assert self._pair_store is not None
        try:
            self._pair_store.queue_push(CTL_KEY, encode(message))
        except Exception as exc:
            raise CommError(FailureReason.PEER_GONE, f"store of {self.peer.name}: {_store_error_text(exc)}") from exc


@dataclass
class _Incoming:
    """A transfer whose header arrived, as it goes through the receive pipeline (wire order).
    `transfer` is None for an orphan (nobody expects it, or it failed here): its chunks are still
    received, into staging only, so the pair stays in step with the sender."""

    header: Header
    transfer: Transfer | None
    chunks: list[tuple[int, int]]
    deadline: float
    index: Any = None  # the transfer's block ids on the device
    works: dict[int, tuple[Any, torch.Tensor]] = field(default_factory=dict)  # chunk -> (recv, staging view)
    next_post: int = 0
    next_done: int = 0
    end_ok: bool | None = None  # the sender's End: False when the payload is filler after a cancel

    @property
    def tag(self) -> int:
        return 1 + self.header.seq % _TAG_LIMIT

    @property
    def posted_all(self) -> bool:
        return self.next_post == len(self.chunks)


class RecvPair(Pair):
    """Receives one sender incarnation's transfers into the blocks its `expect`s name. Rank 0."""

    role = "recv"

    def __init__(self, host: PairHost, peer: PeerRef) -> None:
        super().__init__(host, peer)
        self.prefix = pair_prefix(peer, host.local)
        self._lock = threading.Lock()
        self._expects: dict[str, Transfer] = {}
        self._store: dist.Store | None = None
        self.mismatch: str | None = None
        # The receive pipeline (pair thread only): transfers in wire order, chunks posted and not
        # yet scattered, and chunks posted on this group so far (chunk k uses staging slot k % depth).
        self._incoming: deque[_Incoming] = deque()
        self._num_in_flight = 0
        self._num_posted = 0
        self._upload_lock = threading.Lock()  # the index ring serves callers' threads and the pair thread

    def post(self, transfer: Transfer) -> None:
        self._preload(transfer)  # (before the transfer can be found: its header may be on the way)
        with self._lock:
            failure = None
            if self.closed:
                failure = (FailureReason.ABORTED, "pair closed")
            elif self.mismatch is not None:
                failure = (FailureReason.HANDSHAKE_MISMATCH, self.mismatch)
            else:
                self._expects = {tid: t for tid, t in self._expects.items() if not t.is_final}
                self._expects[transfer.transfer_id] = transfer
        if failure is not None:
            transfer.fail(*failure)

    def close(self, reason: FailureReason, detail: str) -> None:
        with self._lock:
            self.closed = True
            victims = list(self._expects.values())
            self._expects.clear()
            group = self.group
        for transfer in victims:
            transfer.fail(reason, detail)
        if group is not None:
            abort_group_async(self.host.ops, group)
        chan = self.chan
        if chan is not None:  # wakes the pair thread reading it (it closes the socket itself)
            with contextlib.suppress(OSError):
                chan.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):  # our own store is going away too
            self.host.push_control(self.prefix, encode(Wake()))

    def _preload(self, transfer: Transfer) -> None:
        """Put an expected transfer's block indices on the device now, on the caller's thread.

        The receiver knows its blocks long before the sender starts (decode allocates first), so the
        upload need not wait for the header: on two H200s it took ~0.1 ms of the ~0.25 ms between
        a 4096-token transfer's header arriving and its first receive being posted, the step the
        sender's first chunk waited for. Until the pair thread has made its stream, the upload
        happens at the header instead."""
        upload = self._upload_index
        if upload is None:
            return
        try:
            with self._upload_lock, self.host.ops.on_stream(self._stream):
                transfer.device_index = upload(transfer.index)
        except Exception:  # the header's upload is the fallback; if that fails too, the pair fails the transfer
            log.exception("KV transport: early upload of %s's block indices failed", transfer.transfer_id)

    def _device_index(self, transfer: Transfer) -> Any:
        index, transfer.device_index = transfer.device_index, None
        if index is not None:
            return index
        with self._upload_lock:
            return self._upload_index(transfer.index)

    def _take(self, transfer_id: str) -> Transfer | None:
        with self._lock:
            transfer = self._expects.pop(transfer_id, None)
        return transfer if transfer is not None and not transfer.is_final else None

    def _fail_all(self, reason: FailureReason, detail: str) -> None:
        with self._lock:
            victims = list(self._expects.values())
            self._expects.clear()
        for transfer in victims:
            transfer.fail(reason, detail)

    # ------------------------------------------------------------------ control loop
    def _run(self) -> None:
        self._store = self.host.new_store_client()
        self._pair_store = dist.PrefixStore(self.prefix, self._store)
        last_message = time.monotonic()
        while not self.closed:
            try:
                if self._incoming:
                    self._pump()
                    last_message = time.monotonic()
                    continue
                message = self._next_message(_IDLE_POP_S)
            except ChannelClosed as exc:  # the sender dropped the generation, or is gone
                self._fail_incoming(FailureReason.PEER_GONE, f"control channel: {exc}")
                self._drop_group(str(exc))
                continue
            except CommError as exc:
                self._fail_incoming(exc.reason, exc.detail)
                self._drop_group(exc.detail)
                continue
            except Exception as exc:
                log.exception("KV transport: receiving from %s failed", self.peer.name)
                self._fail_incoming(FailureReason.PROTOCOL_ERROR, f"internal error: {exc!r}")
                self._drop_group(repr(exc))
                continue
            if message is None:
                with self._lock:
                    expecting = any(not t.is_final for t in self._expects.values())
                if not expecting and time.monotonic() - last_message > _IDLE_CLOSE_S:
                    self.close(FailureReason.ABORTED, "idle pair retired")
                continue
            last_message = time.monotonic()
            try:
                self._handle(message)
            except CommError as exc:
                self._fail_incoming(exc.reason, exc.detail)
                self._drop_group(exc.detail)
            except Exception as exc:
                log.exception("KV transport: receiving from %s failed", self.peer.name)
                self._fail_incoming(FailureReason.PROTOCOL_ERROR, f"internal error: {exc!r}")
                self._drop_group(repr(exc))
        self._fail_incoming(FailureReason.ABORTED, "pair closed")

    def _handle(self, message: Message) -> None:
        if isinstance(message, Open):
            self._open(message)
        elif isinstance(message, Header):
            self._on_header(message)
        elif isinstance(message, End):
            self._on_end(message)
        # Wake: nothing to do (the loop re-checks `closed`)

    def _next_message(self, timeout_s: float) -> Message | None:
        """The generation's channel while one is up (raises ChannelClosed), else the store queue."""
        if self.chan is not None:
            return read_frame(self.chan, timeout_s)
        assert self._store is not None and self._pair_store is not None
        self._store.set_timeout(datetime.timedelta(seconds=max(0.01, timeout_s)))
        try:
            raw = self._pair_store.queue_pop(CTL_KEY)
        except Exception as exc:  # a timeout, or our own store going away at close
            if "timeout" not in str(exc).lower():
                time.sleep(0.05)
            return None
        try:
            return decode(raw)
        except ValueError as exc:
            log.error("KV transport: dropping a control message from %s: %s", self.peer.name, exc)
            return None

    def _open(self, message: Open) -> None:
        assert self._pair_store is not None
        problems = self.host.spec.mismatches(message.spec)
        if problems:
            detail = "; ".join(problems)
            with self._lock:
                self.mismatch = detail
            if message.gen > 0:
                self._mark_dead(message.gen, "handshake mismatch")
            self._fail_all(FailureReason.HANDSHAKE_MISMATCH, detail)
            return
        latest = self._pair_store.add(GEN_KEY, 0)
        if message.gen == 0 or message.gen < latest or self._pair_store.check([dead_key(message.gen)]):
            return  # a handshake-only message, or the sender already gave up on this generation
        self._fail_incoming(FailureReason.PEER_GONE, f"superseded by g{message.gen}")
        self._drop_group(f"superseded by g{message.gen}")
        self.gen = message.gen
        self._num_posted = 0
        deadline = time.monotonic() + self.host.config.connect_timeout_s
        assert self._store is not None
        group_store = self._group_store(self._store, self.prefix, message.gen)
        with socket.create_server((self.host.config.host, 0)) as listener:
            self._pair_store.set(channel_key(message.gen), str(listener.getsockname()[1]))
            try:
                group = self.host.ops.create_group(group_store, 0, self.host.config.connect_timeout_s)
            except Exception as exc:
                self._mark_dead(message.gen, "receiver could not join")
                log.warning("KV transport: joining g%d from %s failed: %s", message.gen, self.peer.name, exc)
                return
            self.group, self.seq = group, 0
            self.host.note_group(built=True)
            probe = torch.zeros(2, dtype=torch.int64, device=self.host.rows.device)
            self.host.ops.wait(self.host.ops.recv(group, probe, 0), deadline, self._is_dead)
            if probe.tolist() != [PROBE_MAGIC, message.gen]:
                raise CommError(FailureReason.PROTOCOL_ERROR, f"connect probe {probe.tolist()} for g{message.gen}")
            self.chan = self._accept_channel(listener, message.gen, deadline)
        log.info("KV transport: recv group g%d with %s is up", message.gen, self.peer.name)

    def _accept_channel(self, listener: socket.socket, gen: int, deadline: float) -> socket.socket:
        listener.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chan, _ = listener.accept()
        except OSError as exc:
            raise CommError(FailureReason.TIMEOUT, f"no control channel for g{gen}: {exc}") from exc
        try:
            chan.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first = read_frame(chan, max(0.05, deadline - time.monotonic()))
        except ChannelClosed as exc:
            chan.close()
            raise CommError(FailureReason.PEER_GONE, f"control channel of g{gen}: {exc}") from exc
        if not isinstance(first, Open) or first.gen != gen:
            chan.close()
            raise CommError(FailureReason.PROTOCOL_ERROR, f"control channel of g{gen} opened with {first!r}")
        return chan

    # ------------------------------------------------------------------ the receive pipeline
    def _on_header(self, header: Header) -> None:
        """Admit a transfer into the pipeline (its chunks are posted as staging slots free up)."""
        if self.group is None or header.gen != self.gen:
            stale = self._take(header.transfer_id)
            if stale is not None:
                stale.fail(FailureReason.PEER_GONE, f"the group carrying it (g{header.gen}) was reset")
            return
        transfer = self._take(header.transfer_id)
        if header.seq != self.seq:
            detail = f"header seq {header.seq}, expected {self.seq} in g{self.gen}"
            if transfer is not None:
                transfer.fail(FailureReason.PROTOCOL_ERROR, detail)
            raise CommError(FailureReason.PROTOCOL_ERROR, detail)
        self.seq += 1
        problems = check_header(header, self.host.spec)
        if problems:
            if transfer is not None:
                transfer.fail(FailureReason.PROTOCOL_ERROR, "; ".join(problems))
            raise CommError(FailureReason.PROTOCOL_ERROR, "; ".join(problems))
        if transfer is None:
            self.host.note_orphan(header.transfer_id)
        elif transfer.num_tokens != header.num_tokens or len(transfer.block_ids) != header.num_blocks:
            transfer.fail(
                FailureReason.PROTOCOL_ERROR,
                f"sender has {header.num_tokens} tokens in {header.num_blocks} blocks, expected "
                f"{transfer.num_tokens} in {len(transfer.block_ids)}",
            )
            transfer = None
        elif not transfer.activate(time.monotonic() + header.deadline_s):
            transfer = None
        else:
            transfer.mark("header")
        deadline = transfer.deadline if transfer is not None else time.monotonic() + header.deadline_s
        incoming = _Incoming(header, transfer, list(header.chunks), deadline)
        if transfer is not None:
            ops, group = self.host.ops, self.group
            with transfer.lock:
                transfer.abort_group = lambda: abort_group_async(ops, group)
            incoming.index = self._device_index(transfer)
        self._incoming.append(incoming)
        self._post_ready()

    def _on_end(self, message: End) -> None:
        """The sender's verdict on a transfer's payload (False: filler after a cancel)."""
        for incoming in self._incoming:
            if (incoming.header.gen, incoming.header.seq) == (message.gen, message.seq):
                incoming.end_ok = message.ok
                return
        # Otherwise it belongs to a transfer that already failed here.

    def _post_ready(self) -> None:
        """Post receives, oldest transfer first, while staging slots are free: the next transfer's
        first chunks go out while the last one's are still on the wire, so back-to-back transfers
        leave the link no gap. Slot k of the pair's `depth` buffers takes every depth-th chunk in
        wire order; a chunk's slot is free once the chunk `depth` before it was scattered (the
        scatter is ordered before the new receive on the device)."""
        assert self._staging is not None
        ops, rows = self.host.ops, self.host.rows
        depth = self._staging.depth
        for incoming in self._incoming:
            num_blocks = incoming.header.num_blocks
            while not incoming.posted_all and self._num_in_flight < depth:
                i = incoming.next_post
                words = kv_io.chunk_words(rows, incoming.chunks[i], num_blocks)
                if words > self._staging.num_words:
                    if self._num_in_flight:
                        return  # the buffers grow only once nothing is in flight
                    self._staging.reserve(max(kv_io.chunk_words(rows, c, num_blocks) for c in incoming.chunks))
                slot = self._num_posted % depth
                view = kv_io.staging_view(self._staging.buffers[slot], rows, incoming.chunks[i], num_blocks)
                incoming.works[i] = (ops.recv(self.group, view, incoming.tag), view)
                self._num_posted += 1
                self._num_in_flight += 1
                incoming.next_post = i + 1
                if i == 0 and incoming.transfer is not None:
                    incoming.transfer.mark("posted")
            if not incoming.posted_all:
                return

    def _pump(self) -> None:
        """One step of the pipeline: take what the channel holds, post, then finish the oldest chunk."""
        while self._message_waiting():
            message = read_frame(self.chan, _DEAD_CHECK_S) if self.chan is not None else None
            if message is None:
                break
            self._handle(message)
            if not self._incoming:
                return
        self._post_ready()
        head = self._incoming[0]
        i = head.next_done
        last = i == len(head.chunks) - 1
        if last and head.end_ok is None:
            self._await_end(head)  # the sender sent it before the last chunk
            return
        if i >= head.next_post:
            self._post_ready()  # (only when the buffers had to wait to grow)
            if i >= head.next_post:
                raise CommError(FailureReason.PROTOCOL_ERROR, f"chunk {i} of {head.header.transfer_id} not posted")
        work, view = head.works[i]
        if not self._await_work(work, head.deadline):
            return  # a control message came first: handle it, then come back
        del head.works[i]
        head.next_done = i + 1
        self._num_in_flight -= 1
        transfer = head.transfer
        if transfer is not None:
            transfer.mark(f"recv{i}")
            with transfer.lock:
                if transfer.state is State.ACTIVE and (head.end_ok or not last):
                    kv_io.scatter(self.host.rows, head.chunks[i], head.index, view)
                    transfer.last_event = self.host.ops.record(self._stream)
            transfer.future.num_layers_done = head.chunks[i][1]
            transfer.mark(f"scatter{i}")
        if last:
            self._incoming.popleft()
            self._finish(head)
        self._post_ready()

    def _finish(self, head: _Incoming) -> None:
        transfer = head.transfer
        if transfer is None:
            return
        if not head.end_ok:
            transfer.fail(FailureReason.ABORTED, "the sender cancelled the transfer")
            return
        with transfer.lock:
            last_event = transfer.last_event
        self.host.ops.synchronize(last_event)
        transfer.mark("synced")
        transfer.complete()

    def _message_waiting(self) -> bool:
        """Is a control frame (or the channel's end: reading it raises ChannelClosed) ready to read?"""
        return self.chan is not None and _readable(self.chan)

    def _await_work(self, work: Any, deadline: float) -> bool:
        """True once `work` completed; False as soon as a control message is waiting instead (its
        chunks may need posting first). Raises CommError on failure, deadline or a dropped group."""
        ops = self.host.ops
        if not ops.can_poll:
            ops.wait(work, deadline, self._is_dead)
            return True
        start = time.monotonic()
        next_dead_check = start + _DEAD_CHECK_S
        sleep = 0.0
        while not ops.poll(work):
            if self._message_waiting():
                return False
            now = time.monotonic()
            if now >= deadline:
                raise CommError(FailureReason.TIMEOUT, "deadline passed before the chunk arrived")
            if now >= next_dead_check:
                if self._is_dead():
                    raise CommError(FailureReason.PEER_GONE, "the peer dropped the process group")
                next_dead_check = now + _DEAD_CHECK_S
            if now - start > _SPIN_S:
                sleep = min(_MAX_SLEEP_S, sleep * 2 or 20e-6)
            time.sleep(sleep)
        ops.wait(work, deadline, self._is_dead)  # raises if it failed; orders this thread's stream
        return True

    def _await_end(self, head: _Incoming) -> None:
        try:
            message = self._next_message(max(0.0, head.deadline - time.monotonic()))
        except ChannelClosed as exc:
            raise CommError(FailureReason.PEER_GONE, f"before the end of {head.header.transfer_id}: {exc}") from exc
        if message is None:
            raise CommError(FailureReason.TIMEOUT, f"no end marker for {head.header.transfer_id} by the deadline")
        if not isinstance(message, End) or (message.gen, message.seq) != (head.header.gen, head.header.seq):
            raise CommError(
                FailureReason.PROTOCOL_ERROR, f"expected the end of {head.header.transfer_id}, got {message!r}"
            )
        head.end_ok = message.ok

    def _fail_incoming(self, reason: FailureReason, detail: str) -> None:
        """The group is going: every transfer in the pipeline fails (their receives die with it)."""
        incoming, self._incoming = self._incoming, deque()
        self._num_in_flight = 0
        for item in incoming:
            if item.transfer is not None:
                item.transfer.fail(reason, detail)
