"""Gather paged KV blocks into a contiguous staging buffer and scatter them back, with index ops.

The cache `kv[L, 2, N, B, Hkv, D]` is viewed as rows, one row per (layer, K|V, block):

    rows[L * 2, N, W]          W = B * Hkv * D * itemsize / word   (a block's K or V, as words)

so a chunk of layers [l0, l1) of blocks `ids` is one `index_select` on dim 1 of
`rows[2*l0 : 2*l1]`, written into a staging view `[2 * (l1 - l0), len(ids), W]`; the receiver
undoes it with one `index_copy_`. Words are the widest integer type that divides a row (int64
for every real shape), so a copy moves 8 bytes per element and is bit-exact for any KV dtype.
Never a Python loop over blocks.
"""

from __future__ import annotations

import torch

_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def kv_rows(kv: torch.Tensor) -> torch.Tensor:
    """The cache as `[L * 2, N, W]` words (a view: writes go to `kv`)."""
    if kv.dim() != 6 or kv.shape[1] != 2:
        raise ValueError(f"KV cache must be [L, 2, N, B, Hkv, D], got shape {tuple(kv.shape)}")
    if not kv.is_contiguous():
        raise ValueError(f"KV cache must be contiguous, got strides {kv.stride()}")
    num_layers, _, num_blocks = kv.shape[:3]
    flat = kv.view(num_layers * 2, num_blocks, -1)
    row_bytes = flat.shape[2] * kv.element_size()
    word = next(w for w in _WORDS if row_bytes % torch.empty((), dtype=w).element_size() == 0)
    return flat.view(word)


def plan_chunks(
    num_layers: int, bytes_per_layer: int, chunk_bytes: int, max_layers: int | None = None
) -> list[tuple[int, int]]:
    """Split layers into contiguous groups of about `chunk_bytes` (and at most `max_layers`) each.

    At least one layer each; groups are as even as possible, e.g. 28 layers in 3 groups -> 10, 9, 9.
    """
    per_chunk = max(1, chunk_bytes // max(1, bytes_per_layer))
    if max_layers is not None:
        per_chunk = min(per_chunk, max(1, max_layers))
    num_chunks = -(-num_layers // per_chunk)
    base, extra = divmod(num_layers, num_chunks)
    chunks, start = [], 0
    for index in range(num_chunks):
        end = start + base + (1 if index < extra else 0)
        chunks.append((start, end))
        start = end
    return chunks


def split_edges(chunks: list[tuple[int, int]], bytes_per_layer: int, min_bytes: int) -> list[tuple[int, int]]:
    """Cut a quarter of the layers (at least one) off the front of the first chunk and off the back
    of the last, where that chunk holds at least `min_bytes` (0: never), e.g. [(0, 28)] -> [(0, 7),
    (7, 21), (21, 28)]. The first gather and the last scatter are the copies that cannot overlap
    the wire; this makes them small."""
    if not min_bytes or not chunks:
        return list(chunks)

    def edge(chunk: tuple[int, int], pieces: int) -> int:
        layers = chunk[1] - chunk[0]
        if layers < pieces or layers * bytes_per_layer < min_bytes:
            return 0
        return max(1, layers // 4)

    if len(chunks) == 1:
        (start, end), cut = chunks[0], edge(chunks[0], 3)
        return [(start, start + cut), (start + cut, end - cut), (end - cut, end)] if cut else list(chunks)
    out = list(chunks)
    (start, end), cut = out[0], edge(out[0], 2)
    if cut:
        out[0:1] = [(start, start + cut), (start + cut, end)]
    (start, end), cut = out[-1], edge(out[-1], 2)
    if cut:
        out[-1:] = [(start, end - cut), (end - cut, end)]
    return out


def chunk_words(rows: torch.Tensor, layers: tuple[int, int], num_blocks: int) -> int:
    return 2 * (layers[1] - layers[0]) * num_blocks * rows.shape[2]


def staging_view(buffer: torch.Tensor, rows: torch.Tensor, layers: tuple[int, int], num_blocks: int) -> torch.Tensor:
    """The front of `buffer` shaped as one chunk `[2 * layers, num_blocks, W]`."""
    num_rows, width = 2 * (layers[1] - layers[0]), rows.shape[2]
    if buffer.numel() < num_rows * num_blocks * width:
        raise ValueError(f"staging buffer of {buffer.numel()} words is too small for {num_rows * num_blocks * width}")
    return buffer.as_strided((num_rows, num_blocks, width), (num_blocks * width, width, 1))  # one call, not two


def _layer_rows(rows: torch.Tensor, layers: tuple[int, int]) -> torch.Tensor:
    """rows[2 * layers] (every layer, as a whole-prompt chunk usually is: no slicing call)."""
    start, end = 2 * layers[0], 2 * layers[1]
    return rows if start == 0 and end == rows.shape[0] else rows[start:end]


def gather(rows: torch.Tensor, layers: tuple[int, int], block_index: torch.Tensor, out: torch.Tensor) -> None:
    """out[2 * layers, len(block_index), W] <- rows[layers, block_index] (one kernel)."""
    torch.index_select(_layer_rows(rows, layers), 1, block_index, out=out)


def scatter(rows: torch.Tensor, layers: tuple[int, int], block_index: torch.Tensor, src: torch.Tensor) -> None:
    """rows[layers, block_index] <- src (one kernel)."""
    _layer_rows(rows, layers).index_copy_(1, block_index, src)


class StagingBuffers:
    """`depth` reusable flat buffers per pair (chunk k uses buffer k % depth), grown on demand, never shrunk.

    Grow only between transfers (no communication in flight reads them).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, depth: int = 2) -> None:
        self.dtype = dtype
        self.device = device
        self.depth = depth
        self._buffers: list[torch.Tensor] = []

    def reserve(self, num_words: int) -> list[torch.Tensor]:
        if not self._buffers or self._buffers[0].numel() < num_words:
            self._buffers = []  # free the old ones before allocating their successors
            self._buffers = [torch.empty(num_words, dtype=self.dtype, device=self.device) for _ in range(self.depth)]
        return self._buffers

    @property
    def buffers(self) -> list[torch.Tensor]:
        return self._buffers

    @property
    def num_words(self) -> int:
        return self._buffers[0].numel() if self._buffers else 0
