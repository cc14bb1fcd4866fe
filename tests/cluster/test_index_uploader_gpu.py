"""The KV transport's index uploader on a GPU: a ring of pinned / device slots, reused only when safe.

A reused slot must never change the ids a gather or scatter already issued (but not yet run)
reads, nor overwrite a pinned row whose copy has not run: the tests hold the pair's stream behind
a spin kernel so that every copy and kernel is still pending when the next uploads come.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from cluster.kv_transport.backends import IndexUploader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# ~1 s of spin kernels on an H100 / H200 (one `_sleep` takes at most 2**31 cycles): long enough for
# the host to race ahead.
SPIN_CYCLES, SPINS = 200_000_000, 10


def _ids(rng: random.Random, count: int) -> torch.Tensor:
    return torch.tensor(rng.sample(range(100_000), count), dtype=torch.int64)


@pytest.fixture()
def stream() -> torch.cuda.Stream:
    torch.cuda.set_device(0)
    return torch.cuda.Stream()


def test_uploads_arrive_intact_and_reuse_the_ring(stream):
    upload, rng = IndexUploader(torch.device("cuda", 0), stream), random.Random(0)
    with torch.cuda.stream(stream):
        for count in [1, 7, 256, 1024, 3, 900] * 8:  # 48 uploads through 16 slots, each dropped after use
            ids = _ids(rng, count)
            got = upload(ids)
            assert torch.equal(got.cpu(), ids)
    assert upload.num_fresh == 0


def test_a_slot_still_held_is_not_reused(stream):
    upload, rng = IndexUploader(torch.device("cuda", 0), stream), random.Random(1)
    with torch.cuda.stream(stream):
        held = [(ids, upload(ids)) for ids in (_ids(rng, 100) for _ in range(IndexUploader.NUM_SLOTS + 3))]
        stream.synchronize()
        for ids, got in held:
            assert torch.equal(got.cpu(), ids)
    assert upload.num_fresh == 3  # the ring was full: the last three took fresh buffers


def test_a_slot_held_long_is_passed_over_not_waited_for(stream):
    """A receiver's upload stays lent from its expect to its header: the ring must go around it."""
    upload, rng = IndexUploader(torch.device("cuda", 0), stream), random.Random(3)
    with torch.cuda.stream(stream):
        kept_ids = _ids(rng, 64)
        kept = upload(kept_ids)
        for _ in range(3 * IndexUploader.NUM_SLOTS):  # every later upload is dropped after use
            ids = _ids(rng, 64)
            got = upload(ids)
            stream.synchronize()
            assert torch.equal(got.cpu(), ids)
        assert torch.equal(kept.cpu(), kept_ids)
    assert upload.num_fresh == 0


def test_pending_kernels_read_the_ids_they_were_issued_with(stream):
    """Every upload and gather waits behind a spin kernel; the host drops each index at once and
    uploads again (more uploads than slots). A reused row would change what a pending gather reads."""
    upload, rng = IndexUploader(torch.device("cuda", 0), stream), random.Random(2)
    table = torch.arange(100_000, device="cuda") * 3 + 1
    expected, results, slowest = [], [], 0.0
    with torch.cuda.stream(stream):
        # Warm up what waits for the device the first time: loading the gather's kernel (lazy module
        # loading), the ring's first rows, and pinned blocks for the fallback (allocating pinned
        # memory may wait, reusing the host allocator's blocks does not).
        table.index_select(0, upload(_ids(rng, 64)))
        warm = [torch.empty(64, dtype=torch.int64, pin_memory=True) for _ in range(4 * IndexUploader.NUM_SLOTS)]
        del warm
        torch.cuda.synchronize()
        for _ in range(SPINS):
            torch.cuda._sleep(SPIN_CYCLES)
        for _ in range(3 * IndexUploader.NUM_SLOTS):
            ids = _ids(rng, 64)
            start = time.monotonic()
            results.append(table.index_select(0, upload(ids)))  # the index tensor dies right here
            slowest = max(slowest, time.monotonic() - start)
            expected.append(ids * 3 + 1)
        assert not stream.query(), f"the spin ended before the host finished (slowest upload {slowest:.3f} s)"
        stream.synchronize()
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got.cpu(), want)
    assert upload.num_fresh > 0  # copies were still pending, so the ring was bypassed, not reused


def test_rows_grow_for_a_long_prompt_and_held_indices_stay_valid(stream):
    upload, rng = IndexUploader(torch.device("cuda", 0), stream), random.Random(3)
    with torch.cuda.stream(stream):
        small_ids = _ids(rng, 10)
        small = upload(small_ids)
        big_ids = _ids(rng, 5000)  # > 4096: every row is replaced by rows of 8192
        big = upload(big_ids)
        stream.synchronize()
        assert torch.equal(small.cpu(), small_ids)
        assert torch.equal(big.cpu(), big_ids)
