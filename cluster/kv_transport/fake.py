"""`FakeTransport`: the KV transport's contract in one process, for unit tests of the roles.

Transports attached to one `FakeHub` reach each other by worker id; there are no threads and no
sockets. Work happens inside the calls: a layer is copied (with the same index ops as the real
thing) as soon as it is ready on the sender *and* the receiver's `expect` is posted; both futures
resolve when the last layer lands. Deadlines are checked whenever a future is polled
(`done()`, `result()`), so tests control time by waiting, not by threads. Same failure reasons
as the real transport, plus fault injection: `hub.fail_transfer`, `hub.kill`.

    hub = FakeHub()
    prefill = make_transport("fake", kv=kv_p, local=PeerRef("p0", "1"), model_hash="h", hub=hub)
    decode = make_transport("fake", kv=kv_d, local=PeerRef("d0", "1"), model_hash="h", hub=hub)
    fut_d = decode.expect(prefill.local, "t1", [4, 5], num_tokens=20)
    fut_p = prefill.send(decode.local, "t1", [0, 1], num_tokens=20)
    assert fut_p.done() and fut_d.done()
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence

import torch

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
from cluster.kv_transport.transfer import Direction, State, Transfer

_Id = tuple[str, str]  # (worker id, incarnation)
_Key = tuple[_Id, _Id, str]  # (sender, receiver, transfer id)


def _id(peer: PeerRef) -> _Id:
    return (peer.worker_id, peer.incarnation)


class FakeHub:
    """The shared 'network' of fake transports. Thread-safe (one re-entrant lock)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._workers: dict[str, FakeTransport] = {}
        self._ports = itertools.count(1)
        self._sends: dict[_Key, Transfer] = {}
        self._expects: dict[_Key, Transfer] = {}
        self._copied: dict[_Key, int] = {}  # layers already copied, in order
        self._drained: set[_Key] = set()  # no expect took the data: it went nowhere

    # ------------------------------------------------------------------ membership
    def attach(self, transport: FakeTransport) -> int:
        with self.lock:
            old = self._workers.get(transport.local.worker_id)
            self._workers[transport.local.worker_id] = transport
            if old is not None:  # the old process is dead: it can no longer be used
                self._drop_worker(old, FailureReason.PEER_RESTARTED, f"{old.local.worker_id} restarted")
                old.retire()
            return next(self._ports)

    def detach(self, transport: FakeTransport) -> None:
        with self.lock:
            if self._workers.get(transport.local.worker_id) is transport:
                del self._workers[transport.local.worker_id]
            self._drop_worker(transport, FailureReason.PEER_GONE, f"{transport.local.worker_id} went away")

    def kill(self, worker_id: str) -> None:
        """The worker dies: its peers' transfers with it fail PEER_GONE, its own ABORTED."""
        with self.lock:
            transport = self._workers.get(worker_id)
        if transport is not None:
            transport.close()

    def fail_transfer(self, transfer_id: str, reason: FailureReason, detail: str = "injected") -> int:
        """Fail both ends of `transfer_id` as a broken link would. Returns how many ends failed."""
        with self.lock:
            ends = [t for k, t in [*self._sends.items(), *self._expects.items()] if k[2] == transfer_id]
            for transfer in ends:
                transfer.fail(reason, detail)  # the first failure may already fail the other end
            return sum(t.state is State.FAILED for t in ends)

    def lookup(self, peer: PeerRef) -> tuple[FakeTransport | None, FailureReason | None, str]:
        transport = self._workers.get(peer.worker_id)
        if transport is None:
            return None, FailureReason.PEER_GONE, f"{peer.worker_id} is not attached"
        if transport.local.incarnation != peer.incarnation:
            return None, FailureReason.PEER_RESTARTED, f"{peer.worker_id} is now {transport.local.incarnation}"
        return transport, None, ""

    # ------------------------------------------------------------------ transfers
    def add(self, key: _Key, transfer: Transfer) -> None:
        with self.lock:
            if transfer.direction is Direction.RECV and key in self._drained:
                transfer.fail(FailureReason.PROTOCOL_ERROR, "its data arrived before this expect was posted; dropped")
                return
            table = self._sends if transfer.direction is Direction.SEND else self._expects
            table[key] = transfer
            self.advance(key)

    def advance(self, key: _Key) -> None:
        """Copy every layer that is ready on the sender and expected on the receiver."""
        with self.lock:
            send, expect = self._sends.get(key), self._expects.get(key)
            if send is None or send.is_final:
                return
            if expect is None or expect.is_final:
                # Nobody expects it (any more): a real receiver drains the data, the sender never knows.
                self._drained.add(key)
                if send.finished and send.activate():
                    send.complete()
                return
            send.activate()
            expect.activate(send.deadline)
            src, dst = self._workers[key[0][0]].rows, self._workers[key[1][0]].rows
            src_index = torch.tensor(send.block_ids, device=src.device)
            dst_index = torch.tensor(expect.block_ids, device=dst.device)
            done = self._copied.get(key, 0)
            while done < send.num_layers and send.layer_ready[done]:
                data = src[2 * done : 2 * done + 2].index_select(1, src_index).to(dst.device)
                kv_io.scatter(dst, (done, done + 1), dst_index, data)
                done += 1
                send.future.num_layers_done = expect.future.num_layers_done = done
            self._copied[key] = done
            if done == send.num_layers and send.finished:
                send.complete()
                expect.complete()

    def on_final(self, key: _Key, transfer: Transfer, reason: FailureReason | None) -> None:
        """Mirror what the real transport does to the other end when one end fails."""
        with self.lock:
            sending = transfer.direction is Direction.SEND
            table, others = (self._sends, self._expects) if sending else (self._expects, self._sends)
            if table.get(key) is transfer:
                del table[key]
            other = others.get(key)
            if reason is None or other is None or other.is_final:
                return
            if not sending:
                if other.state is State.ACTIVE and reason is not FailureReason.ABORTED:
                    other.fail(FailureReason.PEER_GONE, "the receiver reset the pair")
                else:
                    self.advance(key)
            elif other.state is State.ACTIVE:
                if reason is FailureReason.ABORTED:
                    other.fail(FailureReason.ABORTED, "the sender cancelled the transfer")
                else:
                    other.fail(FailureReason.PEER_GONE, "the sender reset the pair")

    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            overdue = [t for t in [*self._sends.values(), *self._expects.values()] if now >= t.deadline]
            for transfer in overdue:
                transfer.fail(FailureReason.TIMEOUT, "deadline passed")

    def _drop_worker(self, transport: FakeTransport, reason: FailureReason, detail: str) -> None:
        own = transport.owned()
        for transfer in own:
            transfer.fail(FailureReason.ABORTED, "transport closed")
        me = _id(transport.local)
        for key, transfer in [*self._sends.items(), *self._expects.items()]:
            if me in (key[0], key[1]) and transfer not in own:
                transfer.fail(reason, detail)


class FakeTransport(KVTransport):
    backend = "fake"

    def __init__(
        self,
        kv: torch.Tensor,
        local: PeerRef,
        model_hash: str,
        config: TransportConfig | None = None,
        hub: FakeHub | None = None,
    ) -> None:
        if hub is None:
            raise ValueError("the fake transport needs a FakeHub shared by the transports that talk")
        self.hub = hub
        self.config = config or TransportConfig()
        self.rows = kv_io.kv_rows(kv)
        self._spec = KVSpec.for_cache(kv, model_hash)
        self._num_cache_blocks = kv.shape[2]
        self._stats = TransportStats()
        self._mine: dict[tuple[Direction, str], tuple[_Key, Transfer]] = {}
        self._closed = False
        self._local = local
        port = hub.attach(self)
        self._local = PeerRef(local.worker_id, local.incarnation, "fake", port)

    @property
    def local(self) -> PeerRef:
        return self._local

    @property
    def spec(self) -> KVSpec:
        return self._spec

    def open_send(self, peer: PeerRef, transfer_id: str, block_ids: Sequence[int], num_tokens: int) -> SendStream:
        blocks = validate_blocks(self._spec, self._num_cache_blocks, block_ids, num_tokens)
        key = (_id(self._local), _id(peer), transfer_id)
        deadline = time.monotonic() + self.config.stream_timeout_s
        transfer = self._new(Direction.SEND, key, peer, blocks, num_tokens, deadline)
        with self.hub.lock:
            receiver, reason, detail = self.hub.lookup(peer)
            if receiver is not None and self._spec.mismatches(receiver.spec):
                reason, detail = FailureReason.HANDSHAKE_MISMATCH, "; ".join(self._spec.mismatches(receiver.spec))
            if reason is not None:
                transfer.fail(reason, detail)
            else:
                self.hub.add(key, transfer)
        return _FakeStream(self, key, transfer)

    def expect(
        self,
        peer: PeerRef,
        transfer_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float | None = None,
    ) -> TransferFuture:
        blocks = validate_blocks(self._spec, self._num_cache_blocks, block_ids, num_tokens)
        key = (_id(peer), _id(self._local), transfer_id)
        wait_s = self.config.expect_timeout_s if timeout_s is None else timeout_s
        transfer = self._new(Direction.RECV, key, peer, blocks, num_tokens, time.monotonic() + wait_s)
        with self.hub.lock:
            sender, reason, detail = self.hub.lookup(peer)
            if sender is not None and self._spec.mismatches(sender.spec):
                reason, detail = FailureReason.HANDSHAKE_MISMATCH, "; ".join(self._spec.mismatches(sender.spec))
            if reason is not None:
                transfer.fail(reason, detail)
            else:
                self.hub.add(key, transfer)
        return transfer.future

    def abort(self, transfer_id: str) -> bool:
        with self.hub.lock:
            victims = [self._mine.get((d, transfer_id)) for d in Direction]
        return any([entry[1].cancel() for entry in victims if entry is not None])

    def drop_peer(self, worker_id: str, reason: FailureReason = FailureReason.PEER_GONE) -> int:
        with self.hub.lock:
            victims = [t for _, t in self._mine.values() if t.peer.worker_id == worker_id]
        return sum(t.fail(reason, f"{worker_id} dropped by this worker") for t in victims)

    def stats(self) -> TransportStats:
        with self.hub.lock:
            stats = TransportStats(**{**vars(self._stats), "num_failed": dict(self._stats.num_failed)})
            stats.num_active = len(self._mine)
        return stats

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.hub.detach(self)

    def retire(self) -> None:
        """This worker was replaced by a new incarnation (called by the hub)."""
        self._closed = True

    # ------------------------------------------------------------------ internals
    def owned(self) -> list[Transfer]:
        with self.hub.lock:
            return [t for _, t in self._mine.values()]

    def _new(
        self, direction: Direction, key: _Key, peer: PeerRef, blocks: Sequence[int], num_tokens: int, deadline: float
    ) -> Transfer:
        if self._closed:
            raise RuntimeError("KV transport is closed")
        num_bytes = self._spec.transfer_bytes(len(blocks))

        def on_final(transfer: Transfer, reason: FailureReason | None) -> None:
            self._final(key, transfer, reason)

        transfer = Transfer(
            direction,
            key[2],
            peer,
            blocks,
            num_tokens,
            self._spec.num_layers,
            num_bytes,
            deadline,
            on_final,
            self.hub.expire,
        )
        with self.hub.lock:
            existing = self._mine.get(transfer.key)
            if existing is not None and not existing[1].is_final:
                raise ValueError(f"transfer {key[2]!r} is already {direction.value}ing")
            self._mine[transfer.key] = (key, transfer)
        return transfer

    def _final(self, key: _Key, transfer: Transfer, reason: FailureReason | None) -> None:
        with self.hub.lock:
            if self._mine.get(transfer.key, (None, None))[1] is transfer:
                del self._mine[transfer.key]
            stats = self._stats
            if reason is not None:
                stats.num_failed[reason.value] = stats.num_failed.get(reason.value, 0) + 1
            elif transfer.direction is Direction.SEND:
                stats.num_sent += 1
                stats.bytes_sent += transfer.num_bytes
            else:
                stats.num_received += 1
                stats.bytes_received += transfer.num_bytes
            self.hub.on_final(key, transfer, reason)


class _FakeStream(SendStream):
    def __init__(self, transport: FakeTransport, key: _Key, transfer: Transfer) -> None:
        self._transport = transport
        self._key = key
        self._transfer = transfer
        self.future = transfer.future

    def layer_ready(self, layer: int) -> None:
        if not 0 <= layer < self._transfer.num_layers:
            raise ValueError(f"layer {layer} outside 0..{self._transfer.num_layers - 1}")
        self._transfer.mark_ready(range(layer, layer + 1), None, None)
        self._transport.hub.advance(self._key)

    def finish(self) -> TransferFuture:
        transfer = self._transfer
        transfer.mark_ready(range(transfer.num_layers), None, None)
        with transfer.lock:
            if not transfer.finished and not transfer.is_final:
                transfer.finished = True
                transfer.deadline = time.monotonic() + self._transport.config.transfer_timeout_s(transfer.num_bytes)
        self._transport.hub.advance(self._key)
        return self.future
