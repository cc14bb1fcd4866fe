"""`DistTransport`: the real KV transport over torch.distributed (gloo on CPU, NCCL on GPU).

One per worker. It hosts this worker's `TCPStore` (the receiving side of every pair it is part
of), keeps one `SendPair` per receiver and one `RecvPair` per sender (each a thread; see
`pairs.py`), and runs a watchdog thread that fails any transfer whose deadline passed and aborts
the group carrying it. A peer's new incarnation replaces its pairs: the old pairs' transfers
fail with PEER_RESTARTED and the new one starts from a fresh store namespace.

GPU deployment note: c10d's own NCCL watchdog tears the whole process down when an operation
outlives the group's timeout, so the groups here get `config.comm_timeout_s` (an hour) and this
transport's deadlines (seconds) always act first.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from cluster.kv_transport import kv_io
from cluster.kv_transport.api import (
    FailureReason,
    KVSpec,
    KVTransport,
    PeerRef,
    SendStream,
    TransferFuture,
    TransportConfig,
    TransportStats,
    validate_blocks,
)
from cluster.kv_transport.backends import CommOps, make_ops
from cluster.kv_transport.pairs import RecvPair, SendPair
from cluster.kv_transport.protocol import CTL_KEY, HELLO_KEY, Hello
from cluster.kv_transport.transfer import Direction, State, Transfer

log = logging.getLogger(__name__)

_MAX_ORPHANS = 4096


class DistTransport(KVTransport):
    """KV transport over 2-rank torch.distributed groups, one per (sender, receiver) pair."""

    def __init__(
        self,
        kv: torch.Tensor,
        local: PeerRef,
        model_hash: str,
        config: TransportConfig | None = None,
        backend: str = "gloo",
    ) -> None:
        self.backend = backend
        self.config = config or TransportConfig()
        self.ops: CommOps = make_ops(backend, kv.device, self.config)
        self.rows = kv_io.kv_rows(kv)
        self._spec = KVSpec.for_cache(kv, model_hash)
        self._num_cache_blocks = kv.shape[2]
        timeout = datetime.timedelta(seconds=self.config.connect_timeout_s)
        self._store = dist.TCPStore(self.config.host, self.config.port, None, True, timeout, wait_for_workers=False)
        self._local = PeerRef(local.worker_id, local.incarnation, self.config.host, self._store.port)
        self._store.set(HELLO_KEY, Hello(local.worker_id, local.incarnation, self._spec).encode())
        self._control = self._store.clone()
        self._control_lock = threading.Lock()
        self._lock = threading.Lock()
        self._send_pairs: dict[str, SendPair] = {}
        self._recv_pairs: dict[str, RecvPair] = {}
        self._active: dict[tuple[Direction, str], Transfer] = {}
        self._orphans: OrderedDict[str, None] = OrderedDict()
        self._stats = TransportStats()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="kvt-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def local(self) -> PeerRef:
        return self._local

    @property
    def spec(self) -> KVSpec:
        return self._spec

    # ------------------------------------------------------------------ sending
    def open_send(self, peer: PeerRef, transfer_id: str, block_ids: Sequence[int], num_tokens: int) -> SendStream:
        return self._open_send(peer, transfer_id, block_ids, num_tokens, whole=False)

    def send(self, peer: PeerRef, transfer_id: str, block_ids: Sequence[int], num_tokens: int) -> TransferFuture:
        # Whole: the pair may cut it into big chunks (a stream is cut small, see pairs.py).
        return self._open_send(peer, transfer_id, block_ids, num_tokens, whole=True).future

    def _open_send(
        self, peer: PeerRef, transfer_id: str, block_ids: Sequence[int], num_tokens: int, whole: bool
    ) -> _Stream:
        if not peer.host or peer.port <= 0:
            raise ValueError(f"cannot send to {peer.name}: no address (host {peer.host!r}, port {peer.port})")
        blocks = validate_blocks(self.spec, self._num_cache_blocks, block_ids, num_tokens)
        num_bytes = self.spec.transfer_bytes(len(blocks))
        deadline = time.monotonic() + self.config.stream_timeout_s + self.config.transfer_timeout_s(num_bytes)
        transfer = Transfer(
            Direction.SEND,
            transfer_id,
            peer,
            blocks,
            num_tokens,
            self.spec.num_layers,
            num_bytes,
            deadline,
            self._final,
            whole=whole,
        )
        transfer.index = torch.from_numpy(blocks)  # (shares the array: no copy on the path to the wire)
        stream = _Stream(self, transfer)
        if whole:  # every layer is written: say so before the pair thread picks it up
            stream.finish()
        with self._lock:
            self._admit(transfer)
            pair, stale = self._pair_for(self._send_pairs, peer, SendPair)
        self._close_pairs(stale, peer)
        pair.submit(transfer)
        return stream

    # ------------------------------------------------------------------ receiving
    def expect(
        self,
        peer: PeerRef,
        transfer_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float | None = None,
    ) -> TransferFuture:
        blocks = validate_blocks(self.spec, self._num_cache_blocks, block_ids, num_tokens)
        num_bytes = self.spec.transfer_bytes(len(blocks))
        wait_s = self.config.expect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        transfer = Transfer(
            Direction.RECV,
            transfer_id,
            peer,
            blocks,
            num_tokens,
            self.spec.num_layers,
            num_bytes,
            deadline,
            self._final,
        )
        transfer.index = torch.from_numpy(blocks)  # (shares the array: no copy on the path to the wire)
        with self._lock:
            self._admit(transfer)
            arrived_early = transfer_id in self._orphans
            self._orphans.pop(transfer_id, None)
            pair, stale = self._pair_for(self._recv_pairs, peer, RecvPair)
        self._close_pairs(stale, peer)
        if arrived_early:
            transfer.fail(FailureReason.PROTOCOL_ERROR, "its data arrived before this expect was posted; dropped")
        else:
            pair.post(transfer)
        return transfer.future

    # ------------------------------------------------------------------ control
    def abort(self, transfer_id: str) -> bool:
        with self._lock:
            victims = [self._active.get((d, transfer_id)) for d in Direction]
        return any([t.cancel() for t in victims if t is not None])

    def drop_peer(self, worker_id: str, reason: FailureReason = FailureReason.PEER_GONE) -> int:
        with self._lock:
            pairs = [p for p in (self._send_pairs.pop(worker_id, None), self._recv_pairs.pop(worker_id, None)) if p]
            victims = [t for t in self._active.values() if t.peer.worker_id == worker_id]
        for pair in pairs:
            pair.close(reason, f"{worker_id} dropped by this worker")
        return sum(t.fail(reason, f"{worker_id} dropped by this worker") for t in victims)

    def stats(self) -> TransportStats:
        with self._lock:
            stats = TransportStats(**{**vars(self._stats), "num_failed": dict(self._stats.num_failed)})
            stats.num_active = len(self._active)
        return stats

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            pairs = [*self._send_pairs.values(), *self._recv_pairs.values()]
            self._send_pairs.clear()
            self._recv_pairs.clear()
            victims = list(self._active.values())
        for pair in pairs:
            pair.close(FailureReason.ABORTED, "transport closed")
        for transfer in victims:
            transfer.fail(FailureReason.ABORTED, "transport closed")
        deadline = time.monotonic() + 2.0  # threads stuck in a library call are daemons: leave them
        for thread in [*(pair.thread for pair in pairs), self._watchdog]:
            if thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ PairHost
    def new_store_client(self) -> dist.Store:
        return self._store.clone()

    def push_control(self, prefix: str, raw: bytes) -> None:
        with self._control_lock:
            dist.PrefixStore(prefix, self._control).queue_push(CTL_KEY, raw)

    def note_group(self, built: bool) -> None:
        with self._lock:
            if built:
                self._stats.num_groups_built += 1
            else:
                self._stats.num_groups_dropped += 1

    def note_orphan(self, transfer_id: str) -> None:
        with self._lock:
            self._orphans[transfer_id] = None
            while len(self._orphans) > _MAX_ORPHANS:
                self._orphans.popitem(last=False)

    # ------------------------------------------------------------------ internals
    def _admit(self, transfer: Transfer) -> None:
        if self._closed.is_set():
            raise RuntimeError("KV transport is closed")
        existing = self._active.get(transfer.key)
        if existing is not None and not existing.is_final:
            raise ValueError(f"transfer {transfer.transfer_id!r} is already {transfer.direction.value}ing")
        self._active[transfer.key] = transfer

    def _pair_for(self, pairs: dict[str, Any], peer: PeerRef, cls: type) -> tuple[Any, Any]:
        """The live pair for `peer` (creating it); also the pair it replaces, to close outside the lock."""
        pair = pairs.get(peer.worker_id)
        if pair is not None and pair.peer == peer and not pair.closed:
            return pair, None
        stale = pairs.pop(peer.worker_id, None)
        pair = cls(self, peer)
        pairs[peer.worker_id] = pair
        pair.start()
        return pair, stale

    @staticmethod
    def _close_pairs(stale: SendPair | RecvPair | None, peer: PeerRef) -> None:
        if stale is None or stale.closed:
            return
        if stale.peer.incarnation != peer.incarnation:
            stale.close(FailureReason.PEER_RESTARTED, f"{peer.worker_id} is now incarnation {peer.incarnation}")
        else:
            stale.close(FailureReason.PEER_GONE, f"{peer.worker_id} moved to {peer.host}:{peer.port}")

    def _final(self, transfer: Transfer, reason: FailureReason | None) -> None:
        transfer.device_index = None
        with self._lock:
            if self._active.get(transfer.key) is transfer:
                del self._active[transfer.key]
            stats = self._stats
            if reason is not None:
                stats.num_failed[reason.value] = stats.num_failed.get(reason.value, 0) + 1
            elif transfer.direction is Direction.SEND:
                stats.num_sent += 1
                stats.bytes_sent += transfer.num_bytes
            else:
                stats.num_received += 1
                stats.bytes_received += transfer.num_bytes

    def _watch(self) -> None:
        while not self._closed.wait(self.config.watchdog_interval_s):
            now = time.monotonic()
            with self._lock:
                overdue = [t for t in self._active.values() if now >= t.deadline and not t.is_final]
            for transfer in overdue:
                with transfer.lock:
                    abort, state = transfer.abort_group, transfer.state
                waited = "on the wire" if state is State.ACTIVE else "before it started"
                if transfer.fail(FailureReason.TIMEOUT, f"deadline passed {waited}") and abort is not None:
                    abort()


class _Stream(SendStream):
    def __init__(self, transport: DistTransport, transfer: Transfer) -> None:
        self._transport = transport
        self._transfer = transfer
        self.future = transfer.future

    def layer_ready(self, layer: int) -> None:
        if not 0 <= layer < self._transfer.num_layers:
            raise ValueError(f"layer {layer} outside 0..{self._transfer.num_layers - 1}")
        self._mark(range(layer, layer + 1))

    def finish(self) -> TransferFuture:
        self._mark(range(self._transfer.num_layers))
        transfer = self._transfer
        with transfer.lock:
            if not transfer.finished and not transfer.is_final:
                transfer.finished = True
                transfer.deadline = time.monotonic() + self._transport.config.transfer_timeout_s(transfer.num_bytes)
        return self.future

    def _mark(self, layers: range) -> None:
        event = stream = None
        if self._transport.rows.is_cuda:
            stream = torch.cuda.current_stream(self._transport.rows.device)
            event = torch.cuda.Event()
            event.record(stream)
        self._transfer.mark_ready(layers, event, stream)
