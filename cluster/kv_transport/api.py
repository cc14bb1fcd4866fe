"""The KV transport's public surface: identities, the handshake spec, config, futures and errors.

Everything a role needs to move one prompt's KV cache between two workers, and nothing about how:

    sender (prefill role)                              receiver (decode role)
    ---------------------                              ----------------------
                                                       fut = t.expect(P, tid, block_ids, n)   # allocate first
    stream = t.open_send(D, tid, block_ids, n)
    stream.layer_ready(0) ... layer_ready(L - 1)       # as the forward pass writes each layer
    fut = stream.finish()                              # (or fut = t.send(...) for the whole prompt)
    ... poll fut.done() in the step loop ...           ... poll fut.done(); then run the request ...

Both calls return at once; the communication happens on a per-pair thread (and, on GPU, on a
per-pair CUDA stream). A future resolves exactly once, to a `TransferResult` or a
`KVTransferError` whose `reason` tells the caller what to do (`reason.retryable`).

Block ownership: the transport never allocates or frees blocks; it reads (sender) or writes
(receiver) the blocks it was given until the future is done. Once a future is done — including
right after `cancel()` / `KVTransport.abort()` returns — the transport will not touch those blocks
again, so the caller may free them at once. Aborting is idempotent.

This module is torch-free except for `KVSpec.for_cache`, which only reads a tensor's shape.
"""

from __future__ import annotations

import abc
import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# kv[layer, 0 = K | 1 = V, block_id, offset_in_block, kv_head, head_dim]; see engine/attention.py.
KV_LAYOUT = "L2NBHD"


class FailureReason(enum.Enum):
    """Why a transfer failed; machine-readable so roles can decide without parsing messages."""

    TIMEOUT = "timeout"  # the deadline passed (peer slow, stuck or dead); the pair was reset
    PEER_GONE = "peer_gone"  # the peer is unreachable, closed the connection or reset the pair
    PEER_RESTARTED = "peer_restarted"  # the peer came back as a new incarnation; old state is lost
    HANDSHAKE_MISMATCH = "handshake_mismatch"  # model hash / dtype / block size / layout differ
    PROTOCOL_ERROR = "protocol_error"  # a header disagreed with what this side expected
    ABORTED = "aborted"  # cancelled here or by the peer, or the transport closed

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed on a fresh attempt (same or another pair)."""
        return self in (FailureReason.TIMEOUT, FailureReason.PEER_GONE, FailureReason.PEER_RESTARTED)


class KVTransferError(Exception):
    """A transfer failed; `reason` is the machine-readable part, `detail` the human one."""

    def __init__(self, reason: FailureReason, transfer_id: str, peer: str = "", detail: str = "") -> None:
        self.reason = reason
        self.transfer_id = transfer_id
        self.peer = peer
        self.detail = detail
        super().__init__(f"KV transfer {transfer_id!r} with {peer or '?'} failed: {reason.value}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (tests, launchers)
        return (KVTransferError, (self.reason, self.transfer_id, self.peer, self.detail))


@dataclass(frozen=True)
class PeerRef:
    """One incarnation of a worker, and where it receives KV (its store's address).

    `incarnation` changes every time the worker process starts, so a restarted worker is a new
    peer. `host`/`port` are needed only to send to this peer; `expect` needs just the ids.
    """

    worker_id: str
    incarnation: str
    host: str = ""
    port: int = 0

    def __post_init__(self) -> None:
        if not self.worker_id or not self.incarnation:
            raise ValueError(
                f"worker_id and incarnation must be non-empty, got {self.worker_id!r}, {self.incarnation!r}"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")

    @property
    def name(self) -> str:
        return f"{self.worker_id}#{self.incarnation}"

    def same_incarnation(self, other: PeerRef) -> bool:
        return self.worker_id == other.worker_id and self.incarnation == other.incarnation


@dataclass(frozen=True)
class KVSpec:
    """What both ends of a pair must agree on before any payload moves (the handshake)."""

    model_hash: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    layout: str = KV_LAYOUT

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVSpec.{name} must be a positive integer, got {value!r}")

    @classmethod
    def for_cache(cls, kv: torch.Tensor, model_hash: str) -> KVSpec:
        """The spec of an engine KV tensor `kv[L, 2, N, B, Hkv, D]`."""
        if kv.dim() != 6 or kv.shape[1] != 2:
            raise ValueError(f"KV cache must be [L, 2, N, B, Hkv, D], got shape {tuple(kv.shape)}")
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv.shape
        dtype = str(kv.dtype).removeprefix("torch.")
        return cls(model_hash, num_layers, num_kv_heads, head_dim, block_size, dtype)

    @property
    def element_size(self) -> int:
        return _DTYPE_SIZES[self.dtype]

    @property
    def bytes_per_block_layer(self) -> int:
        """K and V of one block in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    def transfer_bytes(self, num_blocks: int) -> int:
        return self.num_layers * num_blocks * self.bytes_per_block_layer

    def mismatches(self, other: KVSpec) -> list[str]:
        """Human-readable differences, empty when the two specs agree."""
        return [
            f"{name}: {getattr(self, name)!r} here vs {getattr(other, name)!r} there"
            for name in ("model_hash", "num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "layout")
            if getattr(self, name) != getattr(other, name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVSpec:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


_DTYPE_SIZES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


@dataclass(frozen=True)
class TransportConfig:
    """Knobs of one worker's transport, validated once.

    Deadline of a transfer = `deadline_base_s + bytes / deadline_bandwidth` (a pessimistic
    bandwidth, so a healthy link never trips it); a layer-wise stream additionally gets
    `stream_timeout_s` between `open_send` and `finish`, and an `expect` waits at most
    `expect_timeout_s` for its transfer to start.
    """

    host: str = "127.0.0.1"  # address this worker's store listens on and advertises
    port: int = 0  # 0: pick a free port (read the chosen one from `KVTransport.local`)
    deadline_base_s: float = 5.0
    deadline_bandwidth: float = 1e9  # bytes per second
    expect_timeout_s: float = 120.0
    stream_timeout_s: float = 120.0
    connect_timeout_s: float = 10.0  # building a pair's process group (both sides must show up)
    # Payload per send of a whole-prompt transfer; a layer is never split. Each send and its
    # gather / scatter cost 0.1-0.2 ms of host time on the GPU hosts, as long as 64 MiB takes on
    # NVLink: with 256 MiB x 3 buffers, bursts of 4096-token transfers ran at 0.87 of raw NCCL on
    # two H200s, with 64 MiB x 4 at 0.56-0.71 (benchmarks/results/kv_transfer_NOTES.md). The
    # buffers grow to the largest chunk seen, so a pair holds at most depth x this, per side.
    chunk_bytes: int = 256 << 20
    # A whole send to an idle pair (nothing of it on the wire) cuts a quarter of the layers off
    # the front of its first chunk and off the back of its last, where that chunk holds at least
    # this many bytes (0: never). The sender's first byte then waits for a small gather, and the
    # receiver's last scatter is small; the rest of both copies overlaps the wire. On two H200s a
    # gather or scatter of 4096 tokens' KV (224 MiB) takes ~0.15 ms of device time before the
    # first byte and after the last. Below this size the extra chunks' host time costs more.
    edge_split_bytes: int = 128 << 20
    # A layer-wise stream sends at most this many layers per chunk, so the part left to send
    # after the prefill's last layer is small (the chunk is also capped by `chunk_bytes`).
    stream_chunk_layers: int = 2
    staging_depth: int = 3  # staging buffers per pair and side: chunks in flight at once (>= 2)
    watchdog_interval_s: float = 0.02
    comm_timeout_s: float = 3600.0  # c10d's own watchdog; ours fires long before (it would kill the process)

    def __post_init__(self) -> None:
        for name in (
            "deadline_base_s",
            "deadline_bandwidth",
            "expect_timeout_s",
            "stream_timeout_s",
            "connect_timeout_s",
            "watchdog_interval_s",
            "comm_timeout_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"TransportConfig.{name} must be positive, got {value!r}")
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes <= 0:
            raise ValueError(f"TransportConfig.chunk_bytes must be a positive integer, got {self.chunk_bytes!r}")
        if not isinstance(self.edge_split_bytes, int) or self.edge_split_bytes < 0:
            raise ValueError(
                f"TransportConfig.edge_split_bytes must be a non-negative integer, got {self.edge_split_bytes!r}"
            )
        if not isinstance(self.stream_chunk_layers, int) or self.stream_chunk_layers <= 0:
            raise ValueError(
                f"TransportConfig.stream_chunk_layers must be a positive integer, got {self.stream_chunk_layers!r}"
            )
        if not isinstance(self.staging_depth, int) or self.staging_depth < 2:
            raise ValueError(f"TransportConfig.staging_depth must be an integer >= 2, got {self.staging_depth!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"TransportConfig.port must be in [0, 65536), got {self.port}")

    def transfer_timeout_s(self, num_bytes: int) -> float:
        return self.deadline_base_s + num_bytes / self.deadline_bandwidth


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    peer: str
    num_bytes: int
    elapsed_s: float  # from the first byte posted to the future resolving
    # (stage, time.monotonic()) stamps of this side's steps, for diagnosing where time goes.
    timeline: tuple[tuple[str, float], ...] = ()


@dataclass
class TransportStats:
    """Counters since start; the metrics module turns them into `pdserve_kv_transfer_*`."""

    num_sent: int = 0
    num_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    num_failed: dict[str, int] = field(default_factory=dict)  # FailureReason.value -> count
    num_groups_built: int = 0
    num_groups_dropped: int = 0
    num_active: int = 0


class TransferFuture:
    """Handle of one transfer; thread-safe; resolves exactly once.

    `done()` never blocks (roles poll it from their step loop); `result()` blocks up to `timeout`
    and raises the `KVTransferError` on failure, or `TimeoutError` when still running.
    """

    def __init__(
        self,
        transfer_id: str,
        peer: str,
        num_layers: int,
        cancel: Callable[[], bool],
        poll: Callable[[], None] | None = None,
    ) -> None:
        self.transfer_id = transfer_id
        self.peer = peer
        self.num_layers = num_layers
        self.num_layers_done = 0  # layers sent (sender) or scattered into blocks (receiver)
        self._cancel = cancel
        self._poll = poll  # the fake transport advances deadlines when polled
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._result: TransferResult | None = None
        self._error: KVTransferError | None = None
        self._callbacks: list[Callable[[TransferFuture], None]] = []

    def done(self) -> bool:
        if self._poll is not None and not self._event.is_set():
            self._poll()
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._poll is None:
            return self._event.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            remaining = 0.01 if deadline is None else min(0.01, deadline - time.monotonic())
            if remaining <= 0:
                return False
            self._event.wait(remaining)
        return True

    def result(self, timeout: float | None = None) -> TransferResult:
        if not self.wait(timeout):
            raise TimeoutError(f"transfer {self.transfer_id!r} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self, timeout: float | None = None) -> KVTransferError | None:
        if not self.wait(timeout):
            raise TimeoutError(f"transfer {self.transfer_id!r} still running after {timeout} s")
        return self._error

    @property
    def reason(self) -> FailureReason | None:
        """The failure reason once failed, else None (also while running)."""
        return self._error.reason if self._error is not None else None

    def cancel(self) -> bool:
        """Abort the transfer (idempotent). True when this call ended it; the blocks are free to reuse."""
        return self._cancel()

    def add_done_callback(self, callback: Callable[[TransferFuture], None]) -> None:
        """Call `callback(self)` once resolved (at once if already); runs on the resolving thread."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    # ---------------------------------------------------------------- transport side
    def _resolve(self, result: TransferResult | None, error: KVTransferError | None) -> bool:
        with self._lock:
            if self._event.is_set():
                return False
            self._result, self._error = result, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)
        return True


class SendStream(abc.ABC):
    """The sender's side of one layer-wise transfer (see `KVTransport.open_send`)."""

    future: TransferFuture

    @abc.abstractmethod
    def layer_ready(self, layer: int) -> None:
        """Layer `layer`'s KV is written (on GPU: enqueued on the caller's current stream).

        On GPU this records a CUDA event on the caller's current stream; the pair's transfer
        stream waits on it, so call it right after enqueueing the layer's last KV write.
        Idempotent per layer; any order.
        """

    @abc.abstractmethod
    def finish(self) -> TransferFuture:
        """No more layers will be written; any layer not yet marked is ready now. Returns `future`."""

    def cancel(self) -> bool:
        return self.future.cancel()


class KVTransport(abc.ABC):
    """Moves KV blocks between workers. One per worker; every method is thread-safe and non-blocking.

    Implementations: `gloo` (CPU tensors), `nccl` (CUDA tensors), `fake` (in-process, tests);
    build one with `cluster.kv_transport.make_transport`.
    """

    backend: str = ""

    @property
    @abc.abstractmethod
    def local(self) -> PeerRef:
        """This worker's identity and the address peers send to (publish it in the registry)."""

    @property
    @abc.abstractmethod
    def spec(self) -> KVSpec: ...

    @abc.abstractmethod
    def open_send(self, peer: PeerRef, transfer_id: str, block_ids: Sequence[int], num_tokens: int) -> SendStream:
        """Start sending `num_tokens` tokens held in `block_ids` (this worker's) to `peer`, layer-wise.

        Token t lives in block `block_ids[t // block_size]`; ids past the last needed one are
        ignored. Transfers to one peer go in the order they were opened (one FIFO per pair).
        """

    def send(self, peer: PeerRef, transfer_id: str, block_ids: Sequence[int], num_tokens: int) -> TransferFuture:
        """Send the whole prompt's KV now (every layer is already written)."""
        return self.open_send(peer, transfer_id, block_ids, num_tokens).finish()

    @abc.abstractmethod
    def expect(
        self,
        peer: PeerRef,
        transfer_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float | None = None,
    ) -> TransferFuture:
        """Receive transfer `transfer_id` from `peer` into `block_ids` (this worker's, allocated).

        The future resolves when every layer is in the blocks. `timeout_s` (default
        `config.expect_timeout_s`) bounds the wait for the transfer to start; once it starts,
        the size-derived deadline applies. Post it before the sender starts (decode allocates first).
        """

    @abc.abstractmethod
    def abort(self, transfer_id: str) -> bool:
        """Cancel `transfer_id` in either direction (idempotent); True when something was cancelled.

        When it returns, the transport no longer touches the transfer's blocks.
        """

    @abc.abstractmethod
    def drop_peer(self, worker_id: str, reason: FailureReason = FailureReason.PEER_GONE) -> int:
        """Fail every transfer with `worker_id` (e.g. the registry says it is gone) and reset its pairs.

        Returns how many transfers were failed. The next transfer with it starts afresh.
        """

    @abc.abstractmethod
    def stats(self) -> TransportStats: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Fail every open transfer with ABORTED, stop threads, stop serving the store."""

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def validate_blocks(spec: KVSpec, num_cache_blocks: int, block_ids: Sequence[int], num_tokens: int) -> np.ndarray:
    """The blocks holding `num_tokens` tokens: the first ceil(num_tokens / block_size) of `block_ids`,
    as a fresh int64 array.

    Extra trailing ids (a request's block allocated for its next token) are ignored; too few, ids
    that are not integers, outside the cache, or repeated raise ValueError. Checked with numpy: a
    prompt's KV can be 2048 blocks, and this is on the caller's path to the first byte sent (a
    tuple of Python ints took ~60 us for 256 ids on the GPU hosts, numpy a third of that).
    """
    if not isinstance(num_tokens, int) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
    needed = -(-num_tokens // spec.block_size)
    if len(block_ids) < needed:
        raise ValueError(f"{num_tokens} tokens need {needed} blocks of {spec.block_size}, got {len(block_ids)} ids")
    try:
        blocks = np.array(block_ids[:needed])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"block ids must be integers: {exc}") from exc
    if blocks.ndim != 1 or blocks.dtype.kind not in "iu":
        raise ValueError(f"block ids must be a flat sequence of integers, got {blocks.dtype} of shape {blocks.shape}")
    blocks = blocks.astype(np.int64, copy=False)
    if blocks.min() < 0 or blocks.max() >= num_cache_blocks:
        bad = [b for b in blocks.tolist() if not 0 <= b < num_cache_blocks]
        raise ValueError(f"block ids {bad[:8]} outside the cache's {num_cache_blocks} blocks")
    ordered = np.sort(blocks)
    if (ordered[1:] == ordered[:-1]).any():
        raise ValueError(f"block ids repeat: {ordered.tolist()[:16]}")
    return blocks
