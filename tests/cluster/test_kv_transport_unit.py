"""KV transport pieces in one process: gather/scatter, chunk plans, messages, futures, the fake
transport, and two gloo transports talking over loopback (protocol edge cases, and the sender's
run-ahead path that NCCL takes, with gloo works made pollable)."""

from __future__ import annotations

import datetime
import pickle
import socket
import threading
import time

import pytest
import torch

from cluster.kv_transport import (
    FailureReason,
    KVSpec,
    KVTransferError,
    PeerRef,
    TransportConfig,
    kv_io,
    make_transport,
    protocol,
)
from cluster.kv_transport import dist as dist_module
from cluster.kv_transport.api import TransferFuture, TransferResult, validate_blocks
from cluster.kv_transport.backends import CommError, GlooOps
from cluster.kv_transport.fake import FakeHub

pytestmark = pytest.mark.timeout(60)


def cache(seed: int, dtype: torch.dtype = torch.bfloat16, shape=(4, 2, 32, 4, 2, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------- kv_io
@pytest.mark.parametrize(
    ("dtype", "shape", "word"),
    [
        (torch.bfloat16, (3, 2, 10, 16, 4, 128), torch.int64),
        (torch.float32, (2, 2, 7, 1, 1, 1), torch.int32),
        (torch.float16, (5, 2, 9, 3, 1, 3), torch.int16),
        (torch.uint8, (1, 2, 8, 1, 1, 7), torch.uint8),
    ],
)
def test_gather_then_scatter_moves_exactly_the_named_blocks(dtype, shape, word):
    src = torch.randint(0, 100, shape).to(dtype)
    dst = torch.full(shape, 7).to(dtype)
    src_rows, dst_rows = kv_io.kv_rows(src), kv_io.kv_rows(dst)
    assert src_rows.dtype == word
    src_ids, dst_ids = [4, 0, 2], [1, 6, 3]
    staging = torch.empty(kv_io.chunk_words(src_rows, (0, shape[0]), 3), dtype=word)
    for layers in kv_io.plan_chunks(shape[0], 1, 1):  # one layer per chunk
        view = kv_io.staging_view(staging, src_rows, layers, 3)
        kv_io.gather(src_rows, layers, torch.tensor(src_ids), view)
        kv_io.scatter(dst_rows, layers, torch.tensor(dst_ids), view)
    assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
    others = [b for b in range(shape[2]) if b not in dst_ids]
    assert bool((dst[:, :, others] == 7).all())


def test_kv_rows_rejects_wrong_layouts():
    with pytest.raises(ValueError, match="L, 2, N"):
        kv_io.kv_rows(torch.zeros(2, 3, 4, 4, 1, 1))
    with pytest.raises(ValueError, match="contiguous"):
        kv_io.kv_rows(torch.zeros(2, 2, 4, 4, 2, 2).transpose(4, 5))


@pytest.mark.parametrize(
    ("layers", "per_layer", "budget"), [(28, 8 << 20, 64 << 20), (28, 64 << 20, 1), (4, 10, 10**9), (7, 3, 7)]
)
def test_chunk_plans_cover_every_layer_once_in_even_groups(layers, per_layer, budget):
    chunks = kv_io.plan_chunks(layers, per_layer, budget)
    assert [layer for a, b in chunks for layer in range(a, b)] == list(range(layers))
    sizes = [b - a for a, b in chunks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert max(sizes) * per_layer <= max(budget, per_layer)


def test_a_stream_is_cut_into_at_most_max_layers_per_chunk():
    assert kv_io.plan_chunks(28, 1, 10**9) == [(0, 28)]
    assert kv_io.plan_chunks(28, 1, 10**9, max_layers=2) == [(i, i + 2) for i in range(0, 28, 2)]
    assert kv_io.plan_chunks(5, 100, 250, max_layers=4) == [(0, 2), (2, 4), (4, 5)]  # bytes still cap it


def test_edge_chunks_take_a_quarter_of_the_first_and_last_chunk_when_those_are_big_enough():
    assert kv_io.split_edges([(0, 28)], 8, 128) == [(0, 7), (7, 21), (21, 28)]
    assert kv_io.split_edges([(0, 14), (14, 28)], 16, 128) == [(0, 3), (3, 14), (14, 25), (25, 28)]
    fours = kv_io.plan_chunks(28, 64, 256)
    assert kv_io.split_edges(fours, 64, 256) == [(0, 1), (1, 4), *fours[1:-1], (24, 27), (27, 28)]
    assert kv_io.split_edges([(0, 28)], 4, 128) == [(0, 28)]  # 112 bytes: below the floor
    assert kv_io.split_edges([(0, 28)], 8, 0) == [(0, 28)]  # 0: never
    assert kv_io.split_edges([(0, 2)], 10**9, 1) == [(0, 2)]  # one chunk needs 3 layers for 3 pieces
    assert kv_io.split_edges([(0, 1), (1, 2)], 10**9, 1) == [(0, 1), (1, 2)]  # a layer is never split
    for layers in range(1, 30):
        for per_layer in (1, 3, 10):
            for chunks in (kv_io.plan_chunks(layers, per_layer, 4 * per_layer), [(0, layers)]):
                split = kv_io.split_edges(chunks, per_layer, 1)
                assert [layer for a, b in split for layer in range(a, b)] == list(range(layers))
                assert all(b > a for a, b in split) and len(split) <= len(chunks) + 2


def test_transport_config_rejects_a_negative_edge_split():
    with pytest.raises(ValueError, match="edge_split_bytes"):
        TransportConfig(edge_split_bytes=-1)


def test_staging_buffers_come_in_the_configured_depth_and_only_grow():
    staging = kv_io.StagingBuffers(torch.int64, torch.device("cpu"), depth=3)
    first = staging.reserve(10)
    assert len(first) == 3 and all(b.numel() == 10 for b in first)
    assert staging.reserve(4) is first and staging.num_words == 10
    assert [b.numel() for b in staging.reserve(11)] == [11, 11, 11]


# ---------------------------------------------------------------------------------- protocol and api
SPEC = KVSpec("m", 4, 2, 8, 4, "bfloat16")


def test_control_messages_round_trip_and_malformed_ones_are_rejected():
    header = protocol.Header(3, 7, "t", 4, 9, 3, "bfloat16", 4, "L2NBHD", ((0, 2), (2, 4)), 1.5)
    for message in (protocol.Open(2, "p", "i", SPEC), header, protocol.End(3, 7, False), protocol.Wake()):
        assert protocol.decode(protocol.encode(message)) == message
    for raw in (b"not json", b'{"op": "xfer"}', b'{"op": "teleport"}'):
        with pytest.raises(ValueError):
            protocol.decode(raw)
    assert protocol.check_header(header, SPEC) == []
    bad = protocol.Header(3, 7, "t", 4, 9, 3, "float16", 8, "L2NBHD", ((0, 3),), 1.5)
    assert len(protocol.check_header(bad, SPEC)) == 3


def test_pair_prefix_keys_both_incarnations_and_escapes_ids():
    a, b = PeerRef("p/0", "1"), PeerRef("d0", "1")
    assert protocol.pair_prefix(a, b) != protocol.pair_prefix(PeerRef("p/0", "2"), b)
    assert protocol.pair_prefix(a, b) != protocol.pair_prefix(a, PeerRef("d0", "2"))
    assert "p%2F0" in protocol.pair_prefix(a, b)


def test_spec_mismatches_name_every_differing_field():
    other = KVSpec("n", 4, 2, 8, 16, "float16")
    problems = SPEC.mismatches(other)
    assert [p.split(":")[0] for p in problems] == ["model_hash", "block_size", "dtype"]
    assert KVSpec.for_cache(cache(0), "m") == SPEC
    assert KVSpec.from_dict(SPEC.to_dict()) == SPEC


def test_config_and_inputs_are_validated_with_the_bad_value_named():
    with pytest.raises(ValueError, match=r"deadline_base_s.*-1"):
        TransportConfig(deadline_base_s=-1)
    with pytest.raises(ValueError, match="chunk_bytes"):
        TransportConfig(chunk_bytes=0)
    with pytest.raises(ValueError, match=r"staging_depth.*1"):
        TransportConfig(staging_depth=1)
    with pytest.raises(ValueError, match="stream_chunk_layers"):
        TransportConfig(stream_chunk_layers=0)
    assert TransportConfig(deadline_base_s=2, deadline_bandwidth=1e9).transfer_timeout_s(3 * 10**9) == 5
    with pytest.raises(ValueError, match="need 3 blocks"):
        validate_blocks(SPEC, 32, [1, 2], 9)
    assert validate_blocks(SPEC, 32, [5, 6, 7, 8], 9).tolist() == [5, 6, 7]  # a trailing spare block is ignored
    ids = [5, 6, 7]
    blocks = validate_blocks(SPEC, 32, ids, 9)
    ids[0] = 9
    assert blocks.tolist() == [5, 6, 7]  # a copy: the caller may reuse its list
    with pytest.raises(ValueError, match="integers"):
        validate_blocks(SPEC, 32, [1.0, 2, 3], 9)
    with pytest.raises(ValueError, match="integers"):
        validate_blocks(SPEC, 32, ["1", "2", "3"], 9)
    with pytest.raises(ValueError, match="integers"):
        validate_blocks(SPEC, 32, [1, 2, 2**70], 9)
    with pytest.raises(ValueError, match="outside"):
        validate_blocks(SPEC, 32, [1, 2, 40], 9)
    with pytest.raises(ValueError, match="repeat"):
        validate_blocks(SPEC, 32, [1, 1, 2], 9)
    with pytest.raises(ValueError, match="non-empty"):
        PeerRef("", "1")


def test_errors_carry_a_machine_readable_reason_and_survive_pickling():
    error = KVTransferError(FailureReason.PEER_RESTARTED, "t1", "d0#2", "restarted")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.reason is FailureReason.PEER_RESTARTED and copy.detail == "restarted" and str(copy) == str(error)
    assert {r for r in FailureReason if r.retryable} == {
        FailureReason.TIMEOUT,
        FailureReason.PEER_GONE,
        FailureReason.PEER_RESTARTED,
    }


def test_a_future_resolves_once_and_runs_callbacks():
    seen = []
    future = TransferFuture("t", "peer", 4, cancel=lambda: False)
    future.add_done_callback(seen.append)
    assert not future.done() and future.reason is None
    with pytest.raises(TimeoutError):
        future.result(0.01)
    assert future._resolve(TransferResult("t", "peer", 10, 0.1), None)
    assert not future._resolve(None, KVTransferError(FailureReason.TIMEOUT, "t"))
    assert future.result().num_bytes == 10 and seen == [future]
    future.add_done_callback(seen.append)
    assert seen == [future, future]


# ---------------------------------------------------------------------------------- fake transport
@pytest.fixture
def fake_pair():
    hub = FakeHub()
    config = TransportConfig(deadline_base_s=0.2, expect_timeout_s=0.2, stream_timeout_s=0.2)
    kv_p, kv_d = cache(1), cache(2)
    prefill = make_transport("fake", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config, hub=hub)
    decode = make_transport("fake", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config, hub=hub)
    return hub, prefill, decode, kv_p, kv_d


def test_fake_moves_whole_and_layerwise_transfers_bit_exact(fake_pair):
    _, prefill, decode, kv_p, kv_d = fake_pair
    got = decode.expect(prefill.local, "t1", [5, 6, 7], 10)
    sent = prefill.send(decode.local, "t1", [0, 1, 2], 10)
    assert sent.result(1).num_bytes == got.result(1).num_bytes == SPEC.transfer_bytes(3)
    assert torch.equal(kv_d[:, :, [5, 6, 7]], kv_p[:, :, [0, 1, 2]])
    got = decode.expect(prefill.local, "t2", [9], 3)
    stream = prefill.open_send(decode.local, "t2", [4], 3)
    stream.layer_ready(0)
    assert got.num_layers_done == 1 and not got.done()
    assert torch.equal(kv_d[0, :, 9], kv_p[0, :, 4]) and not torch.equal(kv_d[1, :, 9], kv_p[1, :, 4])
    stream.finish().result(1)
    assert got.result(1) and torch.equal(kv_d[:, :, 9], kv_p[:, :, 4])
    assert decode.stats().num_received == 2 and prefill.stats().bytes_sent == SPEC.transfer_bytes(4)


def test_fake_aborts_before_during_and_after(fake_pair):
    _, prefill, decode, _, _ = fake_pair
    before = decode.expect(prefill.local, "b", [1], 2)
    assert decode.abort("b") and before.reason is FailureReason.ABORTED and not decode.abort("b")
    assert prefill.send(decode.local, "b", [1], 2).result(1)  # drained
    during = decode.expect(prefill.local, "d", [2, 3], 5)
    stream = prefill.open_send(decode.local, "d", [2, 3], 5)
    stream.layer_ready(0)
    assert stream.cancel() and stream.future.reason is FailureReason.ABORTED
    assert during.exception(1).detail == "the sender cancelled the transfer"
    after = decode.expect(prefill.local, "a", [4], 1)
    assert prefill.send(decode.local, "a", [4], 1).result(1) and after.result(1)
    assert not decode.abort("a") and not prefill.abort("a")


def test_fake_reports_timeouts_restarts_mismatches_and_injected_faults(fake_pair):
    hub, prefill, decode, _, _ = fake_pair
    waiting = decode.expect(prefill.local, "late", [1], 1)
    time.sleep(0.25)
    assert waiting.exception(1).reason is FailureReason.TIMEOUT
    pending = decode.expect(prefill.local, "p", [1], 1)
    reborn = make_transport("fake", kv=cache(3), local=PeerRef("p0", "2"), model_hash="m", hub=hub)
    assert pending.exception(1).reason is FailureReason.PEER_RESTARTED
    with pytest.raises(RuntimeError, match="closed"):
        prefill.send(decode.local, "x", [1], 1)  # the old process is gone
    assert decode.expect(prefill.local, "y", [1], 1).exception(1).reason is FailureReason.PEER_RESTARTED
    odd = make_transport("fake", kv=cache(4), local=PeerRef("o0", "1"), model_hash="other", hub=hub)
    assert odd.send(decode.local, "z", [1], 1).exception(1).reason is FailureReason.HANDSHAKE_MISMATCH
    got = decode.expect(reborn.local, "f", [1], 1)
    stream = reborn.open_send(decode.local, "f", [1], 1)
    assert hub.fail_transfer("f", FailureReason.PEER_GONE) == 2
    assert got.reason is stream.future.reason is FailureReason.PEER_GONE
    got = decode.expect(reborn.local, "k", [1], 1)
    hub.kill("p0")
    assert got.reason is FailureReason.PEER_GONE


# ---------------------------------------------------------------------------------- gloo in one process
@pytest.fixture
def gloo_pair():
    config = TransportConfig(chunk_bytes=1024, deadline_base_s=3.0, connect_timeout_s=3.0, expect_timeout_s=5.0)
    kv_p, kv_d = cache(1), cache(2)
    prefill = make_transport("gloo", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config)
    decode = make_transport("gloo", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config)
    yield prefill, decode, kv_p, kv_d
    prefill.close()
    decode.close()


def test_gloo_pair_reports_protocol_errors_and_keeps_working(gloo_pair):
    prefill, decode, kv_p, kv_d = gloo_pair
    # The two sides disagree about the prompt's length: the receiver fails, the stream stays in step.
    wrong = decode.expect(prefill.local, "w", [1, 2], 8)
    assert prefill.send(decode.local, "w", [3, 4, 5], 9).result(5)
    assert wrong.exception(5).reason is FailureReason.PROTOCOL_ERROR
    # Data for an id nobody expects is drained; a late expect for it fails at once.
    assert prefill.send(decode.local, "early", [6], 1).result(5)
    late = decode.expect(prefill.local, "early", [6], 1)
    assert late.exception(1).reason is FailureReason.PROTOCOL_ERROR
    # One id, one transfer at a time.
    decode.expect(prefill.local, "dup", [7], 1)
    with pytest.raises(ValueError, match="already"):
        decode.expect(prefill.local, "dup", [8], 1)
    assert prefill.send(decode.local, "dup", [9], 1).result(5)
    # And the pair still moves bits exactly.
    got = decode.expect(prefill.local, "ok", [10, 11, 12, 13], 13)
    assert prefill.send(decode.local, "ok", [20, 21, 22, 23], 13).result(5) and got.result(5)
    assert torch.equal(kv_d[:, :, [10, 11, 12, 13]], kv_p[:, :, [20, 21, 22, 23]])
    stats = decode.stats()
    assert stats.num_received == 2 and stats.num_failed == {"protocol_error": 2} and stats.num_active == 0


def test_a_closed_control_channel_is_seen_at_once_and_the_next_transfer_rebuilds_the_pair(gloo_pair):
    prefill, decode, kv_p, kv_d = gloo_pair
    got = decode.expect(prefill.local, "a", [1], 1)
    assert prefill.send(decode.local, "a", [2], 1).result(5) and got.result(5)
    assert decode.stats().num_groups_dropped == 0
    # The sender's end of the channel goes (as when it drops the generation, or dies): the
    # receiver reads the end of the stream and drops its group without waiting for a transfer.
    prefill._send_pairs[decode.local.worker_id].chan.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + 5
    while decode.stats().num_groups_dropped == 0:
        assert time.monotonic() < deadline, "the receiver did not notice the closed channel"
        time.sleep(0.01)
    # The sender sees its channel closed before the next transfer and builds generation 2.
    got = decode.expect(prefill.local, "b", [3, 4], 7)
    assert prefill.send(decode.local, "b", [5, 6], 7).result(5) and got.result(5)
    assert torch.equal(kv_d[:, :, [3, 4]], kv_p[:, :, [5, 6]])
    assert prefill.stats().num_groups_built == 2 and decode.stats().num_groups_built == 2


def test_closing_a_transport_fails_its_open_transfers_with_aborted(gloo_pair):
    prefill, decode, _, _ = gloo_pair
    waiting = decode.expect(prefill.local, "c", [1], 1)
    stream = prefill.open_send(decode.local, "c2", [1], 1)
    decode.close()
    prefill.close()
    assert waiting.reason is FailureReason.ABORTED and stream.future.reason is FailureReason.ABORTED
    with pytest.raises(RuntimeError, match="closed"):
        decode.expect(prefill.local, "d", [1], 1)


class _Waited:
    """A gloo work waited on by a helper thread, so its completion can be polled like NCCL's."""

    def __init__(self, work) -> None:
        self.error: Exception | None = None
        self.finished = threading.Event()
        threading.Thread(target=self._wait, args=(work,), daemon=True).start()

    def _wait(self, work) -> None:
        try:
            work.wait(datetime.timedelta(seconds=30))
        except Exception as exc:
            self.error = exc
        self.finished.set()


class PollingGlooOps(GlooOps):
    """gloo with NCCL's waiting model: completions can be polled without blocking."""

    can_poll = True

    def send(self, group, tensor, tag):
        return _Waited(super().send(group, tensor, tag))

    def recv(self, group, tensor, tag):
        return _Waited(super().recv(group, tensor, tag))

    def poll(self, work) -> bool:
        return work.finished.is_set()

    def wait(self, work, deadline, is_dead) -> None:
        if not work.finished.wait(max(0.0, deadline - time.monotonic())):
            raise CommError(FailureReason.TIMEOUT, "deadline")
        if work.error is not None:
            raise CommError(FailureReason.PEER_GONE, str(work.error))


def test_a_sender_that_can_poll_completions_runs_ahead_and_stays_bit_exact(monkeypatch):
    monkeypatch.setattr(dist_module, "make_ops", lambda backend, device, config: PollingGlooOps(device, config))
    # 20 s: c10d looks up the peer's name (reverse DNS) on every store connection, and a dropped
    # lookup costs the resolver's 5 s timeout (seen in the CI sandbox), so 5 s could fail a test.
    config = TransportConfig(chunk_bytes=1024, deadline_base_s=20.0, connect_timeout_s=20.0)
    kv_p, kv_d = cache(1, shape=(4, 2, 64, 4, 2, 8)), cache(2, shape=(4, 2, 64, 4, 2, 8))
    prefill = make_transport("gloo", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config)
    decode = make_transport("gloo", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config)
    try:
        plan = [(f"t{i}", n, list(range(8 * i, 8 * i + -(-n // 4)))) for i, n in enumerate([1, 29, 4, 32, 13, 7])]
        received = [decode.expect(prefill.local, tid, blocks, n) for tid, n, blocks in plan]
        sent = [prefill.send(decode.local, tid, [63 - b for b in blocks], n) for tid, n, blocks in plan[:-1]]
        tid, n, blocks = plan[-1]
        stream = prefill.open_send(decode.local, tid, [63 - b for b in blocks], n)
        for layer in (1, 0, 3, 2):
            stream.layer_ready(layer)
        sent.append(stream.finish())
        for future in sent + received:
            future.result(10)
        for _, _, blocks in plan:
            assert torch.equal(kv_d[:, :, blocks], kv_p[:, :, [63 - b for b in blocks]])
        assert prefill.stats().num_sent == decode.stats().num_received == len(plan)
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("ops", [GlooOps, PollingGlooOps])
def test_whole_sends_go_in_big_chunks_streams_in_small_ones_through_deep_staging(monkeypatch, ops):
    """Three staging buffers, a transfer of more chunks than buffers, and a stream cut per layer."""
    from cluster.kv_transport import pairs

    headers = []
    real_check = pairs.check_header
    monkeypatch.setattr(pairs, "check_header", lambda header, spec: headers.append(header) or real_check(header, spec))
    monkeypatch.setattr(dist_module, "make_ops", lambda backend, device, config: ops(device, config))
    # 256 bytes per block and layer: 8 blocks make 2 KiB a layer (2 layers a chunk), 32 blocks 8 KiB (1).
    config = TransportConfig(chunk_bytes=4096, stream_chunk_layers=1, staging_depth=3, deadline_base_s=5.0)
    kv_p, kv_d = cache(1, shape=(4, 2, 64, 4, 2, 8)), cache(2, shape=(4, 2, 64, 4, 2, 8))
    prefill = make_transport("gloo", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config)
    decode = make_transport("gloo", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config)
    try:
        plan = [("small", list(range(8)), 32), ("big", list(range(8, 40)), 128), ("stream", list(range(40, 48)), 30)]
        received = [decode.expect(prefill.local, tid, blocks, n) for tid, blocks, n in plan]
        sent = [prefill.send(decode.local, tid, [63 - b for b in blocks], n) for tid, blocks, n in plan[:2]]
        tid, blocks, n = plan[2]
        stream = prefill.open_send(decode.local, tid, [63 - b for b in blocks], n)
        for layer in (2, 0, 3, 1):
            stream.layer_ready(layer)
        sent.append(stream.finish())
        for future in sent + received:
            future.result(10)
        for _, blocks, _ in plan:
            assert torch.equal(kv_d[:, :, blocks], kv_p[:, :, [63 - b for b in blocks]])
        chunks = {h.transfer_id: h.chunks for h in headers}
        assert chunks == {
            "small": ((0, 2), (2, 4)),
            "big": ((0, 1), (1, 2), (2, 3), (3, 4)),
            "stream": ((0, 1), (1, 2), (2, 3), (3, 4)),
        }
    finally:
        prefill.close()
        decode.close()


def test_an_idle_pairs_whole_send_gets_small_edge_chunks_and_one_behind_another_does_not(monkeypatch):
    """Chunks as the headers announce them: the first send on a fresh pair, with a second queued
    behind it, keeps its one big chunk; the second (nothing left in flight: gloo waits for every
    send) and a later lone send are cut into edges. Every transfer lands bit-exact."""
    from cluster.kv_transport import pairs

    headers = []
    real_check = pairs.check_header
    monkeypatch.setattr(pairs, "check_header", lambda header, spec: headers.append(header) or real_check(header, spec))
    queued = threading.Event()
    real_ensure = pairs.SendPair._ensure_group

    def ensure_group(self, transfer):  # the group comes up only once the second send is queued
        assert queued.wait(10)
        real_ensure(self, transfer)

    monkeypatch.setattr(pairs.SendPair, "_ensure_group", ensure_group)
    # 256 bytes per block and layer: 16 blocks make 4 KiB a layer, 16 KiB a transfer (one chunk).
    config = TransportConfig(edge_split_bytes=8192, deadline_base_s=20.0, connect_timeout_s=20.0)
    kv_p, kv_d = cache(1, shape=(4, 2, 64, 4, 2, 8)), cache(2, shape=(4, 2, 64, 4, 2, 8))
    prefill = make_transport("gloo", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config)
    decode = make_transport("gloo", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config)
    try:
        plan = [(f"t{i}", list(range(16 * i, 16 * i + 16)), 64) for i in range(3)]
        received = [decode.expect(prefill.local, tid, blocks, n) for tid, blocks, n in plan]
        sent = [prefill.send(decode.local, tid, [63 - b for b in blocks], n) for tid, blocks, n in plan[:2]]
        queued.set()
        for future in sent:
            future.result(20)
        tid, blocks, n = plan[2]
        sent.append(prefill.send(decode.local, tid, [63 - b for b in blocks], n))
        for future in sent + received:
            future.result(20)
        for _, blocks, _ in plan:
            assert torch.equal(kv_d[:, :, blocks], kv_p[:, :, [63 - b for b in blocks]])
        edges = ((0, 1), (1, 3), (3, 4))
        assert {h.transfer_id: h.chunks for h in headers} == {"t0": ((0, 4),), "t1": edges, "t2": edges}
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("ops", [GlooOps, PollingGlooOps])
def test_a_whole_send_to_an_idle_pair_starts_on_the_callers_thread_and_the_pair_thread_finishes_it(monkeypatch, ops):
    """Header, indices and the chunks with a free staging buffer go out before `send` returns;
    chunks past the staging depth wait for the pair thread. Either way the bits land exactly."""
    from cluster.kv_transport import transfer as transfer_module

    stamped: dict[str, list[tuple[str, str]]] = {}
    real_mark = transfer_module.Transfer.mark

    def mark(self, stage):
        stamped.setdefault(self.transfer_id, []).append((stage, threading.current_thread().name))
        real_mark(self, stage)

    monkeypatch.setattr(transfer_module.Transfer, "mark", mark)
    monkeypatch.setattr(dist_module, "make_ops", lambda backend, device, config: ops(device, config))
    # 256 bytes per block and layer; 32 blocks make 8 KiB a layer: one layer a chunk, 4 chunks, 2 buffers.
    config = TransportConfig(chunk_bytes=4096, staging_depth=2, deadline_base_s=20.0, connect_timeout_s=20.0)
    kv_p, kv_d = cache(1, shape=(4, 2, 64, 4, 2, 8)), cache(2, shape=(4, 2, 64, 4, 2, 8))
    prefill = make_transport("gloo", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config)
    decode = make_transport("gloo", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config)
    try:
        first = decode.expect(prefill.local, "warm", [0], 1)  # builds the group on the pair thread
        assert prefill.send(decode.local, "warm", [1], 1).result(10) and first.result(10)
        assert ("start", "MainThread") not in stamped["warm"]
        for attempt in range(3):
            blocks = list(range(32)) if attempt % 2 else list(range(32, 64))
            got = decode.expect(prefill.local, f"t{attempt}", blocks, 128)
            sent = prefill.send(decode.local, f"t{attempt}", [63 - b for b in blocks], 128)
            by_caller = [stage for stage, thread in stamped[f"t{attempt}"] if thread == "MainThread"]
            assert by_caller[:3] == ["start", "header", "gather0"]
            if not ops.can_poll:  # chunk 2 reuses chunk 0's buffer, which cannot be seen free without a wait
                assert by_caller[-1] == "send1"
            assert sent.result(10) and got.result(10)
            assert torch.equal(kv_d[:, :, blocks], kv_p[:, :, [63 - b for b in blocks]])
            sends = [(stage, thread) for stage, thread in stamped[f"t{attempt}"] if stage.startswith("send")]
            assert [stage for stage, _ in sends] == ["send0", "send1", "send2", "send3"]
            assert {thread for _, thread in sends} <= {"MainThread", f"kvt-send-{decode.local.worker_id}"}
        # Back to back, small enough for the caller to post all of each (2 chunks, 2 buffers): the
        # second comes while the first is on the wire, where gloo cannot poll: it waits its turn.
        got = [decode.expect(prefill.local, f"b{i}", list(range(8 * i, 8 * i + 8)), 32) for i in range(4)]
        sent = [prefill.send(decode.local, f"b{i}", list(range(56 - 8 * i, 64 - 8 * i)), 32) for i in range(4)]
        assert all(f.result(10) for f in sent + got)
        for i in range(4):
            assert torch.equal(kv_d[:, :, 8 * i : 8 * i + 8], kv_p[:, :, 56 - 8 * i : 64 - 8 * i])
        assert prefill.stats().num_sent == decode.stats().num_received == 8
    finally:
        prefill.close()
        decode.close()


class _GatedRecvOps(PollingGlooOps):
    """Polling gloo whose receives of the first transfer (tag 1) do not report completion until a
    receive of the second (tag 2) is posted, or 3 s pass: the receiver must post the next transfer
    while the current one is still on the wire."""

    def __init__(self, device, config) -> None:
        super().__init__(device, config)
        self.log: list[str] = []
        self.opened = threading.Event()

    def recv(self, group, tensor, tag):
        self.log.append(f"post{tag}")
        if tag == 2:
            self.opened.set()
        work = super().recv(group, tensor, tag)
        work.tag, work.posted_at = tag, time.monotonic()
        return work

    def poll(self, work) -> bool:
        if getattr(work, "tag", None) == 1 and not self.opened.is_set():
            return time.monotonic() - work.posted_at > 3.0 and super().poll(work)
        return super().poll(work)

    def wait(self, work, deadline, is_dead) -> None:
        if getattr(work, "tag", None) == 1:
            self.opened.wait(3.0)
            self.log.append("done1")
        super().wait(work, deadline, is_dead)


def test_the_receiver_posts_the_next_transfer_while_the_last_one_is_still_arriving(monkeypatch):
    made: list[_GatedRecvOps] = []

    def make_ops(backend, device, config):
        made.append(_GatedRecvOps(device, config))
        return made[-1]

    monkeypatch.setattr(dist_module, "make_ops", make_ops)
    # 256 bytes per block and layer; 8 blocks make 2 KiB a layer: 2 layers a chunk, 2 chunks per transfer.
    config = TransportConfig(chunk_bytes=4096, staging_depth=4, deadline_base_s=10.0, connect_timeout_s=10.0)
    kv_p, kv_d = cache(1, shape=(4, 2, 64, 4, 2, 8)), cache(2, shape=(4, 2, 64, 4, 2, 8))
    prefill = make_transport("gloo", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config)
    decode = make_transport("gloo", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config)
    receiver_ops = made[1]
    try:
        plan = [("first", list(range(8))), ("second", list(range(8, 16))), ("third", list(range(16, 24)))]
        received = [decode.expect(prefill.local, tid, blocks, 32) for tid, blocks in plan]
        sent = [prefill.send(decode.local, tid, [63 - b for b in blocks], 32) for tid, blocks in plan]
        for future in sent + received:
            future.result(10)
        for _, blocks in plan:
            assert torch.equal(kv_d[:, :, blocks], kv_p[:, :, [63 - b for b in blocks]])
        log = [entry for entry in receiver_ops.log if entry != "post0"]  # the group's connect probe
        # Both chunks of the first transfer, then the second's, all posted before the first landed.
        assert log.index("post2") < log.index("done1"), log
        assert log.count("post1") == log.count("post2") == log.count("post3") == 2
    finally:
        prefill.close()
        decode.close()


class _SlowReapOps(PollingGlooOps):
    """Polling gloo whose sends of one tag report completion only once released, and whose polls on
    the sender's pair thread take 1 ms (host work done holding the post lock)."""

    def __init__(self, device, config) -> None:
        super().__init__(device, config)
        self.gated_tag = -1
        self.release = threading.Event()
        self.pair_polling = threading.Event()  # set while the pair thread is inside a poll

    def send(self, group, tensor, tag):
        work = super().send(group, tensor, tag)
        work.tag = tag
        return work

    def poll(self, work) -> bool:
        on_pair = threading.current_thread().name.startswith("kvt-send")
        if on_pair:
            self.pair_polling.set()
            time.sleep(0.001)
            self.pair_polling.clear()
        if getattr(work, "tag", None) == self.gated_tag and not self.release.is_set():
            return False
        return super().poll(work)

    def wait(self, work, deadline, is_dead) -> None:
        if getattr(work, "tag", None) == self.gated_tag:
            self.release.wait(max(0.0, deadline - time.monotonic()))
        super().wait(work, deadline, is_dead)


def _two_polling_transports(monkeypatch, ops_type):
    made = []

    def make_ops(backend, device, config):
        made.append(ops_type(device, config))
        return made[-1]

    monkeypatch.setattr(dist_module, "make_ops", make_ops)
    config = TransportConfig(chunk_bytes=1 << 20, deadline_base_s=20.0, connect_timeout_s=20.0)
    kv_p, kv_d = cache(1, shape=(4, 2, 64, 4, 2, 8)), cache(2, shape=(4, 2, 64, 4, 2, 8))
    prefill = make_transport("gloo", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config)
    decode = make_transport("gloo", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config)
    return prefill, decode, kv_p, kv_d, made[0]


def test_a_caller_waits_out_the_pair_threads_host_work_and_sends_on_its_own_thread(monkeypatch):
    """The pair thread holds the post lock while it reaps (here: 1 ms per poll). A whole send that
    arrives then waits for the lock instead of queueing behind a thread that, in Python, cannot run
    until the caller blocks."""
    from cluster.kv_transport import transfer as transfer_module

    threads: dict[str, str] = {}
    real_mark = transfer_module.Transfer.mark

    def mark(self, stage):
        if stage == "start":
            threads[self.transfer_id] = threading.current_thread().name
        real_mark(self, stage)

    monkeypatch.setattr(transfer_module.Transfer, "mark", mark)
    prefill, decode, kv_p, kv_d, sender_ops = _two_polling_transports(monkeypatch, _SlowReapOps)
    try:
        warm = decode.expect(prefill.local, "warm", [0], 1)  # builds the group (seq 0, tag 1)
        assert prefill.send(decode.local, "warm", [1], 1).result(10) and warm.result(10)
        plan = [("first", list(range(0, 8))), ("second", list(range(8, 16)))]
        got = [decode.expect(prefill.local, tid, blocks, 32) for tid, blocks in plan]
        sender_ops.gated_tag = 2  # "first" goes as seq 1
        first = prefill.send(decode.local, "first", [63 - b for b in plan[0][1]], 32)
        assert sender_ops.pair_polling.wait(5), "the pair thread never reaped the gated send"
        sender_ops.pair_polling.clear()
        assert sender_ops.pair_polling.wait(5)  # it is inside a poll now, holding the post lock
        second = prefill.send(decode.local, "second", [63 - b for b in plan[1][1]], 32)
        sender_ops.release.set()
        assert all(f.result(10) for f in [first, second, *got])
        for _, blocks in plan:
            assert torch.equal(kv_d[:, :, blocks], kv_p[:, :, [63 - b for b in blocks]])
        assert threads["second"] == "MainThread", threads
    finally:
        prefill.close()
        decode.close()


def test_a_caller_never_waits_for_a_lock_held_across_a_wait_for_the_compute(monkeypatch):
    """A layer-wise stream whose layers are not written yet holds the pair thread (and the post
    lock) in a wait for the compute; a whole send behind it is queued at once, not after it."""
    from cluster.kv_transport import pairs

    monkeypatch.setattr(pairs, "_CALLER_WAIT_S", 5.0)  # a caller that waited would stall 5 s
    prefill, decode, kv_p, kv_d, _ = _two_polling_transports(monkeypatch, PollingGlooOps)
    try:
        warm = decode.expect(prefill.local, "warm", [0], 1)
        assert prefill.send(decode.local, "warm", [1], 1).result(10) and warm.result(10)
        plan = [("stream", list(range(0, 8))), ("whole", list(range(8, 16)))]
        got = [decode.expect(prefill.local, tid, blocks, 32) for tid, blocks in plan]
        stream = prefill.open_send(decode.local, "stream", [63 - b for b in plan[0][1]], 32)
        pair = prefill._send_pairs[decode.local.worker_id]
        deadline = time.monotonic() + 5
        while not pair._holder_waits and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pair._holder_waits, "the pair thread never waited for the stream's layers"
        start = time.monotonic()
        whole = prefill.send(decode.local, "whole", [63 - b for b in plan[1][1]], 32)
        assert time.monotonic() - start < 1.0
        for layer in range(4):
            stream.layer_ready(layer)
        assert all(f.result(10) for f in [stream.finish(), whole, *got])
        for _, blocks in plan:
            assert torch.equal(kv_d[:, :, blocks], kv_p[:, :, [63 - b for b in blocks]])
    finally:
        prefill.close()
        decode.close()


class _GatedCountingOps(PollingGlooOps):
    """Polling gloo whose sends of one tag complete only once released; counts the pair thread's polls."""

    def __init__(self, device, config) -> None:
        super().__init__(device, config)
        self.gated_tag = -1
        self.release = threading.Event()
        self.num_pair_polls = 0

    def send(self, group, tensor, tag):
        work = super().send(group, tensor, tag)
        work.tag = tag
        return work

    def poll(self, work) -> bool:
        if threading.current_thread().name.startswith("kvt-send"):
            self.num_pair_polls += 1
        if getattr(work, "tag", None) == self.gated_tag and not self.release.is_set():
            return False
        return super().poll(work)


def test_a_sender_waiting_on_a_slow_send_backs_off_its_polling(monkeypatch):
    """Each poll of the pair thread takes the GIL from the caller's thread (which, on a burst, is
    posting the next transfers): while nothing completes, the polls thin out to one a millisecond
    (at a fixed 200 us there were 3-5 a millisecond) and the send still completes once it can."""
    prefill, decode, kv_p, kv_d, sender_ops = _two_polling_transports(monkeypatch, _GatedCountingOps)
    try:
        warm = decode.expect(prefill.local, "warm", [0], 1)  # builds the group (seq 0, tag 1)
        assert prefill.send(decode.local, "warm", [1], 1).result(10) and warm.result(10)
        got = decode.expect(prefill.local, "slow", list(range(8)), 32)
        sender_ops.gated_tag = 2  # "slow" goes as seq 1
        sent = prefill.send(decode.local, "slow", list(range(63, 55, -1)), 32)
        time.sleep(0.02)  # past the back-off's first steps
        before, start = sender_ops.num_pair_polls, time.monotonic()
        time.sleep(0.2)
        polls_per_ms = (sender_ops.num_pair_polls - before) / ((time.monotonic() - start) * 1e3)
        assert 0 < polls_per_ms <= 1.5, polls_per_ms
        assert not sent.done()
        sender_ops.release.set()
        assert sent.result(10) and got.result(10)
        assert torch.equal(kv_d[:, :, list(range(8))], kv_p[:, :, list(range(63, 55, -1))])
    finally:
        prefill.close()
        decode.close()


def test_the_pair_thread_takes_its_next_transfer_only_under_the_post_lock(monkeypatch):
    """NCCL matches sends to receives in posting order, so one transfer's chunks must never be
    interleaved with another's. A caller's thread that leaves a transfer part-posted hands the rest
    over at the end of its turn, under the post lock; were the pair thread to pick a transfer while
    a caller still held the lock, the next caller could begin a new transfer in the gap (seen on two
    H200s: a header went out before the last transfer's end marker, and both sides hung)."""
    prefill, decode, kv_p, kv_d, _ = _two_polling_transports(monkeypatch, PollingGlooOps)
    try:
        warm = decode.expect(prefill.local, "warm", [0], 1)
        assert prefill.send(decode.local, "warm", [1], 1).result(10) and warm.result(10)
        got = decode.expect(prefill.local, "queued", list(range(8)), 32)
        pair = prefill._send_pairs[decode.local.worker_id]
        with pair._post_lock:  # as a caller's thread part-way through its turn
            sent = prefill.send(decode.local, "queued", list(range(63, 55, -1)), 32)  # finds the lock taken: queued
            time.sleep(0.05)
            with pair._cv:
                assert list(pair._queue) and pair._current is None, "the pair thread took a transfer without the lock"
        assert sent.result(10) and got.result(10)
        assert torch.equal(kv_d[:, :, list(range(8))], kv_p[:, :, list(range(63, 55, -1))])
    finally:
        prefill.close()
        decode.close()


class _RecordingUploadOps(GlooOps):
    """gloo whose index uploads are recorded: which thread, which ids."""

    def __init__(self, device, config) -> None:
        super().__init__(device, config)
        self.uploads: list[tuple[str, list[int]]] = []

    def index_uploader(self, stream):
        def upload(index):
            self.uploads.append((threading.current_thread().name, index.tolist()))
            return index.clone()

        return upload


def test_a_receiver_puts_an_expected_transfers_indices_up_before_its_header_arrives(monkeypatch):
    """Decode allocates first, so its indices go up on expect's thread, off the path from the
    header to the first posted receive; the pair thread uses them, and the ended transfer drops them."""
    from cluster.kv_transport.transfer import Direction

    monkeypatch.setattr(dist_module, "make_ops", lambda backend, device, config: _RecordingUploadOps(device, config))
    # 20 s: c10d looks up the peer's name (reverse DNS) on every store connection, and a dropped
    # lookup costs the resolver's 5 s timeout (seen in the CI sandbox), so 5 s could fail a test.
    config = TransportConfig(chunk_bytes=1024, deadline_base_s=20.0, connect_timeout_s=20.0)
    kv_p, kv_d = cache(1), cache(2)
    prefill = make_transport("gloo", kv=kv_p, local=PeerRef("p0", "1"), model_hash="m", config=config)
    decode = make_transport("gloo", kv=kv_d, local=PeerRef("d0", "1"), model_hash="m", config=config)
    try:
        warm = decode.expect(prefill.local, "warm", [0], 1)  # starts the receiving pair and its thread
        prefill.send(decode.local, "warm", [0], 1).result(10)
        warm.result(10)
        decode.ops.uploads.clear()
        received = decode.expect(prefill.local, "t", [5, 9, 2], 12)
        transfer = decode._active[(Direction.RECV, "t")]
        assert decode.ops.uploads == [(threading.current_thread().name, [5, 9, 2])]
        assert transfer.device_index is not None
        prefill.send(decode.local, "t", [7, 1, 30], 12).result(10)
        received.result(10)
        assert decode.ops.uploads == [(threading.current_thread().name, [5, 9, 2])]  # none at the header
        assert transfer.device_index is None
        assert torch.equal(kv_d[:, :, [5, 9, 2]], kv_p[:, :, [7, 1, 30]])
        # An expect that fails before its header lets go of its indices too.
        doomed = decode.expect(prefill.local, "doomed", [3], 1)
        doomed_transfer = decode._active[(Direction.RECV, "doomed")]
        assert doomed_transfer.device_index is not None
        assert decode.abort("doomed")
        assert doomed.exception(5).reason is FailureReason.ABORTED
        assert doomed_transfer.device_index is None
    finally:
        prefill.close()
        decode.close()
