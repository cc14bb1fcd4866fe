"""Block manager: exact block ids, prefix sharing, eviction order and the accounting invariant."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, hash_block, prompt_block_hashes
from engine.multimodal import IMAGE, MultiModalItem, block_extra_keys, content_hash
from engine.request import Request


def make_request(rid: str, tokens: list[int], salt: str = "") -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens), cache_salt=salt)


def admit(bm: BlockManager, req: Request) -> list[int]:
    """Allocate like the scheduler does on admission; returns the prefix-hit block ids."""
    hits = bm.get_computed_blocks(req)
    num_computed = len(hits) * bm.block_size
    assert bm.allocate(req, req.num_tokens - num_computed, hits) is not None
    req.num_computed_tokens = req.num_tokens
    bm.cache_blocks(req)
    return hits


def test_allocates_lowest_free_ids_in_order_and_frees_them():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", range(10))
    alloc = bm.allocate(a, 10)
    assert alloc is not None and alloc.block_ids == (0, 1, 2)
    assert a.block_ids == [0, 1, 2]
    b = make_request("b", range(4))
    assert bm.allocate(b, 4).block_ids == (3,)
    assert bm.stats().num_used == 4 and bm.stats().num_free == 4
    bm.check_invariants()
    assert bm.free(a) == 3
    assert bm.free(a) == 0  # idempotent
    assert bm.stats().num_used == 1
    bm.free(b)
    bm.check_invariants()
    assert bm.stats().num_free == 8


def test_growing_a_request_allocates_only_when_crossing_a_block_boundary():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    req = make_request("r", range(4))
    bm.allocate(req, 4)
    req.num_computed_tokens = 4
    req.append_token(99)
    assert bm.allocate(req, 1).block_ids == (1,)
    req.num_computed_tokens = 5
    for t in range(3):
        req.append_token(t)
        assert bm.allocate(req, 1).block_ids == ()
        req.num_computed_tokens += 1
    assert req.block_ids == [0, 1]


def test_allocation_is_check_then_commit():
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    big = make_request("big", range(13))  # needs 4 blocks
    assert not bm.can_allocate(big, 13)
    assert bm.allocate(big, 13) is None
    assert big.block_ids == [] and bm.stats().num_free == 3
    bm.check_invariants()


def test_prefix_hit_shares_blocks_and_caps_before_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request("a", range(12))
    admit(bm, a)
    assert a.block_ids == [0, 1, 2]
    b = make_request("b", list(range(12)))  # identical prompt: last block must be recomputed
    hits = admit(bm, b)
    assert hits == [0, 1]
    assert b.block_ids == [0, 1, 3]
    c = make_request("c", list(range(8)) + [100, 101, 102, 103, 104])
    assert admit(bm, c) == [0, 1]
    assert c.block_ids == [0, 1, 4, 5]
    stats = bm.stats()
    assert stats.num_used == 6 and stats.prefix_hits == 4
    bm.check_invariants()


def test_freed_blocks_stay_cached_until_evicted_lru_tail_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    admit(bm, a)
    assert a.block_ids == [0, 1, 2, 3]
    bm.free(a)
    s = bm.stats()
    assert (s.num_free, s.num_cached, s.num_used) == (1, 3, 0)  # block 3 held a partial block: not cached
    bm.check_invariants()
    # Reuse: same prefix hits blocks 0 and 1 even after a free.
    b = make_request("b", [1, 2, 3, 4, 9])
    assert admit(bm, b) == [0, 1]
    # b took free block 3 for its third block; the next allocation must evict cached block 2 (the only one left).
    assert b.block_ids == [0, 1, 3]
    c = make_request("c", [50, 51])
    assert bm.allocate(c, 2).block_ids == (2,)
    s = bm.stats()
    assert (s.num_free, s.num_cached, s.num_used) == (0, 0, 4)
    bm.check_invariants()
    d = make_request("d", [1, 2, 3, 4, 5, 6, 0])
    assert bm.get_computed_blocks(d) == [0, 1]  # block 2's hash was evicted


def test_cache_salt_separates_equal_tokens():
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, make_request("a", [1, 2, 3, 4, 5], salt="img-A"))
    assert bm.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5], salt="img-B")) == []
    assert bm.get_computed_blocks(make_request("c", [1, 2, 3, 4, 5], salt="img-A")) == [0, 1]


def test_prompt_block_hashes_match_the_managers_chain():
    tokens = list(range(10))
    hashes = prompt_block_hashes(tokens, 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block(None, tokens[:4])
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])


def _image(data: bytes, offset: int, num_tokens: int) -> MultiModalItem:
    return MultiModalItem(IMAGE, data, content_hash(data), (1, 2, 2 * num_tokens), offset, num_tokens)


def test_same_text_with_another_image_shares_only_the_blocks_before_the_image():
    bm = BlockManager(num_blocks=16, block_size=2)
    tokens = [5, 6, 7, 9, 9, 9, 8, 3, 1]  # image placeholders at [3, 6)
    first = make_request("a", tokens)
    first.mm_items = (_image(b"cat", 3, 3),)
    admit(bm, first)
    other = make_request("b", tokens)
    other.mm_items = (_image(b"dog", 3, 3),)
    assert bm.get_computed_blocks(other) == [0]  # block 1 holds token 3, a placeholder
    same = make_request("c", tokens)
    same.mm_items = (_image(b"cat", 3, 3),)
    assert bm.get_computed_blocks(same) == [0, 1, 2, 3]
    text_only = make_request("d", tokens)
    assert bm.get_computed_blocks(text_only) == [0]


def test_prompt_block_hashes_with_image_keys_match_the_managers_chain():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(3)) + [9] * 5 + list(range(6))  # placeholders at [3, 8): blocks 0 and 1
    request = make_request("a", tokens)
    request.mm_items = (_image(b"png bytes", 3, 5),)
    admit(bm, request)
    keys = block_extra_keys(request.mm_items, len(tokens), 4)
    assert keys == [content_hash(b"png bytes")] * 2 + [""]
    assert prompt_block_hashes(tokens, 4, extra_keys=keys) == request.block_hashes
    assert prompt_block_hashes(tokens, 4) != request.block_hashes
    assert hash_block(None, tokens[:4], extra_key="") == prompt_block_hashes(tokens, 4)[0]


def test_duplicate_content_computed_twice_keeps_one_cache_entry():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = make_request("a", [1, 2, 3]), make_request("b", [1, 2, 3])
    for r in (a, b):  # both admitted before either is computed: no hit for b
        assert bm.allocate(r, 3, bm.get_computed_blocks(r)) is not None
    for r in (a, b):
        r.num_computed_tokens = 3
        bm.cache_blocks(r)
    bm.free(a)
    bm.free(b)
    s = bm.stats()
    assert s.num_cached == 1 and s.num_free == 7
    bm.check_invariants()


def test_release_more_than_taken_is_an_invariant_error():
    bm = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=False)
    r = make_request("r", [1])
    bm.allocate(r, 1)
    r.block_ids.append(r.block_ids[0])  # corrupt: the same reference listed twice
    with pytest.raises(RuntimeError, match="released more often"):
        bm.free(r)
