"""Paged KV block manager with reference counts and prefix caching. Plain Python, no torch.

Every block is in exactly one of three states:

    free    ref_count == 0, no hash        in `_free` (FIFO)
    cached  ref_count == 0, hash set       in `_evictable` (LRU), findable by hash
    used    ref_count  > 0                 owned by one or more requests

so `num_free + num_cached + num_used == num_blocks` always (`check_invariants`).

Prefix caching: a full block's hash chains its parent's hash with its token ids, the request's
`cache_salt` and the block's extra key (the content hashes of the images whose placeholders
overlap it, `engine.multimodal.block_extra_keys`), so equal hashes mean equal prefixes: the same
text with another image never shares KV. A request's
leading blocks whose hashes are known are shared (ref_count + 1) instead of recomputed. A cached
block is reused until a new allocation evicts it (least recently freed first, after plain free
blocks run out).

Allocation is check-then-commit: `allocate` returns `None` when the blocks aren't there, and
changes nothing in that case; the scheduler then preempts or waits.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from engine.multimodal import block_extra_keys
from engine.request import Request


@dataclass(frozen=True)
class KVAllocation:
    """Blocks newly given to a request by one `allocate` call (opaque to callers but for the ids)."""

    block_ids: tuple[int, ...]
    num_prefix_hit_blocks: int = 0


@dataclass(frozen=True)
class BlockStats:
    num_total: int
    num_free: int
    num_cached: int
    num_used: int
    prefix_queries: int
    prefix_hits: int  # blocks served from the prefix cache

    @property
    def usage(self) -> float:
        return self.num_used / self.num_total if self.num_total else 0.0


def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: str = "", extra_key: str = "") -> bytes:
    """Chained, process-independent hash of one full block (sha256; Python's hash() is salted).

    `extra_key` is content the block's tokens do not show (its images' hashes); an empty key
    leaves the hash of a text-only block as it always was.
    """
    h = hashlib.sha256()
    h.update(parent or b"\0" * 32)
    h.update(salt.encode())
    h.update(b"|")
    h.update(",".join(map(str, token_ids)).encode())
    if extra_key:  # token ids are digits and commas, so '#' cannot be confused with them
        h.update(b"#")
        h.update(extra_key.encode())
    return h.digest()


def prompt_block_hashes(
    token_ids: Sequence[int], block_size: int, salt: str = "", extra_keys: Sequence[str] = ()
) -> list[bytes]:
    """Hashes of every full block of `token_ids` (what a router uses to find cached prefixes).

    `extra_keys[i]` is block i's extra key (`engine.multimodal.block_extra_keys`); blocks past
    its end have none.
    """
    hashes: list[bytes] = []
    parent = None
    for index, start in enumerate(range(0, len(token_ids) - block_size + 1, block_size)):
        extra_key = extra_keys[index] if index < len(extra_keys) else ""
        parent = hash_block(parent, token_ids[start : start + block_size], salt, extra_key)
        hashes.append(parent)
    return hashes


class BlockManager:
    """Owns block state; requests own their `block_ids`. Not thread-safe: one engine thread calls it."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[bytes, int] = {}
        self._prefix_queries = 0
        self._prefix_hits = 0

    # ----------------------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    def stats(self) -> BlockStats:
        num_used = self.num_blocks - len(self._free) - len(self._evictable)
        return BlockStats(
            num_total=self.num_blocks,
            num_free=len(self._free),
            num_cached=len(self._evictable),
            num_used=num_used,
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
        )

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Leading blocks of `request` already in the prefix cache (not yet referenced by it).

        At most `(num_tokens - 1) // block_size` blocks, so at least the last token is computed
        and produces logits.
        """
        if not self.enable_prefix_caching or request.block_ids:
            return []
        self._update_hashes(request)
        limit = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in request.block_hashes[:limit]:
            block_id = self._by_hash.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self._prefix_queries += limit
        return hits

    def can_allocate(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        return self._num_new_blocks(request, num_new_tokens, computed_blocks) <= self._available(computed_blocks)

    # ----------------------------------------------------------------------------- commits
    def allocate(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> KVAllocation | None:
        """Give `request` blocks for `num_new_tokens` more tokens after its computed ones.

        `computed_blocks` (from `get_computed_blocks`, first allocation only) are shared, and
        the caller then counts their tokens as computed. Returns None, changing nothing, when
        there is not enough room.
        """
        if computed_blocks and request.block_ids:
            raise RuntimeError(f"request {request.request_id}: prefix blocks offered after its first allocation")
        num_new = self._num_new_blocks(request, num_new_tokens, computed_blocks)
        if num_new > self._available(computed_blocks):
            return None
        for block_id in computed_blocks:
            self._take(block_id)
        self._prefix_hits += len(computed_blocks)
        new_ids = [self._pop_free() for _ in range(num_new)]
        for block_id in new_ids:
            self._ref_counts[block_id] = 1
        request.block_ids.extend(computed_blocks)
        request.num_hashed_blocks = max(request.num_hashed_blocks, len(computed_blocks))
        request.block_ids.extend(new_ids)
        return KVAllocation(block_ids=tuple(new_ids), num_prefix_hit_blocks=len(computed_blocks))

    def cache_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache (after a step)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= request.num_hashed_blocks:
            return
        self._update_hashes(request)
        for index in range(request.num_hashed_blocks, num_full):
            block_id = request.block_ids[index]
            block_hash = request.block_hashes[index]
            if block_hash not in self._by_hash and self._hashes[block_id] is None:
                self._hashes[block_id] = block_hash
                self._by_hash[block_hash] = block_id
        request.num_hashed_blocks = num_full

    def free(self, request: Request) -> int:
        """Release the request's blocks (idempotent). Returns how many references were dropped."""
        block_ids = request.block_ids
        request.block_ids = []
        request.num_hashed_blocks = 0
        # Release the tail first so, among one request's cached blocks, its prefix is evicted last.
        for block_id in reversed(block_ids):
            self._release(block_id)
        return len(block_ids)

    def reset_prefix_cache(self) -> int:
        """Forget every cached (unreferenced) block; returns how many were dropped."""
        dropped = list(self._evictable)
        for block_id in dropped:
            self._forget_hash(block_id)
            del self._evictable[block_id]
            self._free.append(block_id)
        return len(dropped)

    def check_invariants(self) -> None:
        """Raise if block accounting is broken (cheap enough for tests and idle workers)."""
        stats = self.stats()
        if stats.num_free + stats.num_cached + stats.num_used != stats.num_total:
            raise RuntimeError(f"block accounting broken: {stats}")
        used = sum(1 for count in self._ref_counts if count > 0)
        if used != stats.num_used:
            raise RuntimeError(f"{used} blocks referenced but {stats.num_used} counted used")
        for block_hash, block_id in self._by_hash.items():
            if self._hashes[block_id] != block_hash:
                raise RuntimeError(f"hash index points at block {block_id} whose hash differs")

    # ----------------------------------------------------------------------------- internals
    def _update_hashes(self, request: Request) -> None:
        tokens = request.all_token_ids
        num_full = len(tokens) // self.block_size
        hashes = request.block_hashes
        if len(hashes) >= num_full:
            return
        extra_keys = block_extra_keys(request.mm_items, len(tokens), self.block_size) if request.mm_items else ()
        while len(hashes) < num_full:
            index = len(hashes)
            start = index * self.block_size
            parent = hashes[-1] if hashes else None
            extra_key = extra_keys[index] if extra_keys else ""
            block_tokens = tokens[start : start + self.block_size]
            hashes.append(hash_block(parent, block_tokens, request.cache_salt, extra_key))

    def _num_new_blocks(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int]) -> int:
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = self.num_blocks_for(num_computed + num_new_tokens)
        return max(0, needed - len(request.block_ids) - len(computed_blocks))

    def _available(self, computed_blocks: Sequence[int]) -> int:
        # Sharing a cached block takes it out of the evictable pool.
        reused_from_pool = sum(1 for block_id in computed_blocks if self._ref_counts[block_id] == 0)
        return self.num_free_blocks - reused_from_pool

    def _take(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            del self._evictable[block_id]
        self._ref_counts[block_id] += 1

    def _pop_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        self._forget_hash(block_id)
        return block_id

    def _forget_hash(self, block_id: int) -> None:
        block_hash = self._hashes[block_id]
        if block_hash is not None:
            self._hashes[block_id] = None
            if self._by_hash.get(block_hash) == block_id:
                del self._by_hash[block_hash]

    def _release(self, block_id: int) -> None:
        count = self._ref_counts[block_id]
        if count <= 0:
            raise RuntimeError(f"block {block_id} released more often than taken")
        self._ref_counts[block_id] = count - 1
        if count == 1:
            if self._hashes[block_id] is not None:
                self._evictable[block_id] = None
            else:
                self._free.append(block_id)
