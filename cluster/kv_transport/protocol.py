"""The pair protocol: store keys, control messages, and the order things happen in.

Rendezvous. The receiving worker hosts a `TCPStore` (its address is in its `PeerRef`); senders
connect as clients. Everything about one (sender, receiver) pair lives under a prefix built from
both workers' ids *and* incarnation ids, so a restarted peer gets a brand-new namespace and can
never be confused with its previous life:

    kvt/hello                                 receiver identity + KVSpec (written once at start)
    kvt/pair/<S>/<S inc>/<R>/<R inc>/gen      group generation counter (the sender add()s 1)
    kvt/pair/.../ctl                          queue of Open messages (new generations), S -> R
    kvt/pair/.../ctl/g<gen>                   port of the generation's control channel (R listens)
    kvt/pair/.../g<gen>/*                     the generation's process group rendezvous keys
    kvt/pair/.../dead/g<gen>                  set by whichever side drops generation <gen>

Pair ranks: the receiver (store host) is rank 0, the sender rank 1, in every generation.

Order of events (S = the sender: its pair thread, or for a whole send to an idle pair the caller's
thread up to the first busy staging buffer; R = receiver pair thread; `ctl` is the queue, `pg` the
generation's 2-rank process group, `chan` its control channel: one TCP connection, S -> R, of
length-prefixed frames; payload only ever goes S -> R):

    S: get hello; check incarnation (PEER_RESTARTED) and spec (HANDSHAKE_MISMATCH) -- no payload
    S: gen = add(gen, 1); push Open(gen, S spec); build pg(rank 1); pg connect probe [gen]
    R: pop Open; check spec; listen, set ctl/g<gen>; build pg(rank 0); recv connect probe, check
       gen; accept chan
    S: get ctl/g<gen>; connect chan; write Open(gen) on it (R checks gen)
    per transfer (seq = 0, 1, 2, ... within a generation), on chan:
    S: write Header(gen, seq, transfer id, layers, tokens, blocks, dtype, block size, layout,
       chunks, deadline); then per chunk: [wait for its layers] gather -> send
    R: read Header; check seq, ids and shapes against its `expect`; per chunk: recv -> scatter.
       R reads the next Header while this transfer's chunks are still arriving and posts its
       receives as staging buffers free up (a pipeline across transfers, see pairs.py)
    S: write End(gen, seq, ok) right after the last chunk's send is posted (ok=False: cancelled,
       the payload after the cancel is filler); R reads it before the last scatter. A transfer's
       End always comes before the next transfer's Header.

Why a channel of its own: a header through the store costs a store round trip on S and a queue
wake-up on R (0.3 ms together, measured on H200 hosts: longer than moving 4096 tokens' KV), a
frame on an open socket tens of microseconds. Either side dropping the generation closes chan,
so R learns at once that S is gone (end of stream) and goes back to the queue for the next Open.

A header R cannot match (expect aborted or never posted) is still received into the staging
buffers and dropped, so the stream stays in step. A seq that is not the next one fails loudly
(PROTOCOL_ERROR) and resets the pair.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from cluster.kv_transport.api import KVSpec, PeerRef

PROTOCOL_VERSION = 2
HELLO_KEY = "kvt/hello"
CTL_KEY = "ctl"
GEN_KEY = "gen"
# Bytes of the connect probe: [magic, generation].
PROBE_MAGIC = 0x6B76_7470  # "kvtp"


def pair_prefix(sender: PeerRef, receiver: PeerRef) -> str:
    parts = (sender.worker_id, sender.incarnation, receiver.worker_id, receiver.incarnation)
    return "kvt/pair/" + "/".join(quote(p, safe="") for p in parts)


def group_prefix(gen: int) -> str:
    return f"g{gen}"


def dead_key(gen: int) -> str:
    return f"dead/g{gen}"


def channel_key(gen: int) -> str:
    return f"ctl/g{gen}"


@dataclass(frozen=True)
class Hello:
    worker_id: str
    incarnation: str
    spec: KVSpec
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        body = {"worker_id": self.worker_id, "incarnation": self.incarnation, "spec": self.spec.to_dict()}
        return json.dumps({**body, "version": self.version}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Hello:
        data = json.loads(raw)
        return cls(data["worker_id"], data["incarnation"], KVSpec.from_dict(data["spec"]), data["version"])


@dataclass(frozen=True)
class Open:
    gen: int
    sender_id: str
    sender_incarnation: str
    spec: KVSpec
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Header:
    gen: int
    seq: int
    transfer_id: str
    num_layers: int
    num_tokens: int
    num_blocks: int
    dtype: str
    block_size: int
    layout: str
    chunks: tuple[tuple[int, int], ...]
    deadline_s: float  # the sender's remaining budget for this transfer when it sent the header


@dataclass(frozen=True)
class End:
    gen: int
    seq: int
    ok: bool


@dataclass(frozen=True)
class Wake:
    """Pushed by the receiver to its own queue to wake its pair thread (closing)."""


Message = Open | Header | End | Wake


def encode(message: Message) -> bytes:
    if isinstance(message, Open):
        body: dict[str, Any] = {
            "op": "open",
            "gen": message.gen,
            "sender_id": message.sender_id,
            "sender_incarnation": message.sender_incarnation,
            "spec": message.spec.to_dict(),
            "version": message.version,
        }
    elif isinstance(message, Header):
        body = {"op": "xfer", **{name: getattr(message, name) for name in Header.__dataclass_fields__}}
    elif isinstance(message, End):
        body = {"op": "end", "gen": message.gen, "seq": message.seq, "ok": message.ok}
    else:
        body = {"op": "wake"}
    return json.dumps(body).encode()


def decode(raw: bytes) -> Message:
    """Parse one control message; raises ValueError on anything malformed."""
    try:
        data = json.loads(raw)
        op = data["op"]
        if op == "open":
            spec = KVSpec.from_dict(data["spec"])
            return Open(int(data["gen"]), data["sender_id"], data["sender_incarnation"], spec, int(data["version"]))
        if op == "xfer":
            fields = {name: data[name] for name in Header.__dataclass_fields__}
            fields["chunks"] = tuple((int(a), int(b)) for a, b in fields["chunks"])
            return Header(**fields)
        if op == "end":
            return End(int(data["gen"]), int(data["seq"]), bool(data["ok"]))
        if op == "wake":
            return Wake()
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed control message {raw[:200]!r}: {exc}") from exc
    raise ValueError(f"unknown control message op {op!r}")


def check_header(header: Header, spec: KVSpec) -> list[str]:
    """Differences between a header and this side's spec (empty when consistent)."""
    problems = []
    if header.num_layers != spec.num_layers:
        problems.append(f"num_layers {header.num_layers} != {spec.num_layers}")
    if header.dtype != spec.dtype:
        problems.append(f"dtype {header.dtype} != {spec.dtype}")
    if header.block_size != spec.block_size:
        problems.append(f"block_size {header.block_size} != {spec.block_size}")
    if header.layout != spec.layout:
        problems.append(f"layout {header.layout} != {spec.layout}")
    covered = [layer for start, end in header.chunks for layer in range(start, end)]
    if covered != list(range(spec.num_layers)):
        problems.append(f"chunks {header.chunks} do not cover layers 0..{spec.num_layers - 1} in order")
    return problems


# ---------------------------------------------------------------------------------- channel frames
_LENGTH = struct.Struct("!I")
MAX_FRAME_BYTES = 1 << 20
_REST_OF_FRAME_S = 5.0  # a frame's bytes arrive together; a peer stalling mid-frame is broken


class ChannelClosed(ConnectionError):
    """The control channel ended (the peer closed it, reset it, or broke a frame)."""


def write_frame(sock: socket.socket, message: Message) -> None:
    """Send one message (raises OSError when the channel is gone)."""
    body = encode(message)
    sock.sendall(_LENGTH.pack(len(body)) + body)


def read_frame(sock: socket.socket, timeout_s: float) -> Message | None:
    """The next message; None if none started within `timeout_s`. Raises ChannelClosed."""
    sock.settimeout(max(timeout_s, 1e-3))
    try:
        first = sock.recv(_LENGTH.size)
    except TimeoutError:
        return None
    except OSError as exc:
        raise ChannelClosed(f"control channel: {exc}") from exc
    if not first:
        raise ChannelClosed("control channel closed by the peer")
    sock.settimeout(_REST_OF_FRAME_S)
    try:
        (length,) = _LENGTH.unpack(first + _read_exact(sock, _LENGTH.size - len(first)))
        if length > MAX_FRAME_BYTES:
            raise ChannelClosed(f"control frame of {length} bytes")
        return decode(_read_exact(sock, length))
    except (OSError, ValueError) as exc:
        raise ChannelClosed(f"control channel: {exc}") from exc


def _read_exact(sock: socket.socket, size: int) -> bytes:
    parts, left = [], size
    while left:
        part = sock.recv(left)
        if not part:
            raise ChannelClosed("control channel closed mid-frame")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)
