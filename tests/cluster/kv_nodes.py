"""Worker processes for the KV transport tests: each hosts a transport, a KV cache and a block manager.

A test drives a `Node` in a child process through `NodeHandle.call(method, ...)`. The node plays a
role the way the prefill / decode roles will: it allocates blocks with the real torch-free
`BlockManager` for a `Request`, hands their ids to the transport, and frees them when told
(`release`), so tests can check the block-manager invariant and that nothing leaks.

Every call has a timeout on the parent side, and children are daemons killed at teardown, so a
broken transport fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
import traceback
from typing import Any

TINY_SHAPE = {"num_layers": 4, "num_blocks": 64, "block_size": 4, "num_kv_heads": 2, "head_dim": 8}


class Node:
    """One worker: KV cache + block manager + transport. Runs in a child process."""

    def __init__(
        self,
        worker_id: str,
        incarnation: str,
        seed: int,
        backend: str = "gloo",
        device: str = "cpu",
        model_hash: str = "tiny-model",
        shape: dict[str, int] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from cluster.kv_transport import PeerRef, TransportConfig, make_transport
        from engine.block_manager import BlockManager

        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        shape = {**TINY_SHAPE, **(shape or {})}
        generator = torch.Generator().manual_seed(seed)
        dims = (
            shape["num_layers"],
            2,
            shape["num_blocks"],
            shape["block_size"],
            shape["num_kv_heads"],
            shape["head_dim"],
        )
        self.kv = torch.randn(dims, generator=generator).to(torch.bfloat16).to(device)
        self.initial = self.kv.clone()
        self.blocks = BlockManager(shape["num_blocks"], shape["block_size"], enable_prefix_caching=False)
        self.transport = make_transport(
            backend,
            kv=self.kv,
            local=PeerRef(worker_id, incarnation),
            model_hash=model_hash,
            config=TransportConfig(**(config or {})),
        )
        self.requests: dict[str, Any] = {}
        self.futures: dict[str, Any] = {}
        self.streams: dict[str, Any] = {}
        self.receiving: set[str] = set()
        self.landed: set[int] = set()  # blocks a completed receive wrote since `reset_baseline`

    # ------------------------------------------------------------------ roles
    def address(self) -> Any:
        return self.transport.local

    def allocate(self, transfer_id: str, num_tokens: int) -> list[int]:
        from engine.request import Request

        request = Request(transfer_id, list(range(num_tokens)))
        if self.blocks.allocate(request, num_tokens) is None:
            raise RuntimeError(f"no room for {num_tokens} tokens")
        self.requests[transfer_id] = request
        return list(request.block_ids)

    def expect(self, peer: Any, transfer_id: str, num_tokens: int, timeout_s: float | None = None) -> list[int]:
        block_ids = self.allocate(transfer_id, num_tokens)
        self.receiving.add(transfer_id)
        self.futures[transfer_id] = self.transport.expect(peer, transfer_id, block_ids, num_tokens, timeout_s)
        return block_ids

    def send(self, peer: Any, transfer_id: str, num_tokens: int) -> list[int]:
        block_ids = self.allocate(transfer_id, num_tokens)
        self.futures[transfer_id] = self.transport.send(peer, transfer_id, block_ids, num_tokens)
        return block_ids

    def send_burst(self, peer: Any, transfers: list[tuple[str, int]]) -> dict[str, list[int]]:
        """Allocate every transfer's blocks, then submit the whole sends back to back (as a prefill
        that finishes several prompts in one step does)."""
        blocks = {tid: self.allocate(tid, num_tokens) for tid, num_tokens in transfers}
        for tid, num_tokens in transfers:
            self.futures[tid] = self.transport.send(peer, tid, blocks[tid], num_tokens)
        return blocks

    def open_send(self, peer: Any, transfer_id: str, num_tokens: int) -> list[int]:
        block_ids = self.allocate(transfer_id, num_tokens)
        stream = self.transport.open_send(peer, transfer_id, block_ids, num_tokens)
        self.streams[transfer_id] = stream
        self.futures[transfer_id] = stream.future
        return block_ids

    def layer_ready(self, transfer_id: str, layers: list[int]) -> None:
        for layer in layers:
            self.streams[transfer_id].layer_ready(layer)

    def finish(self, transfer_id: str) -> None:
        self.streams[transfer_id].finish()

    def write_and_stream(self, peer: Any, transfer_id: str, num_tokens: int, sleep_cycles: int = 0) -> list[int]:
        """GPU: write each layer's KV on the compute stream (after a spin), then mark it ready."""
        import torch

        block_ids = self.open_send(peer, transfer_id, num_tokens)
        index = torch.tensor(block_ids, device=self.kv.device)
        for layer in range(self.kv.shape[0]):
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            self.kv[layer].index_fill_(1, index, float(layer + 1))
            self.streams[transfer_id].layer_ready(layer)
        self.streams[transfer_id].finish()
        return block_ids

    def progress(self, transfer_id: str) -> int:
        return self.futures[transfer_id].num_layers_done

    def wait(self, transfer_id: str, wait_s: float = 20.0) -> dict[str, Any]:
        """Wait for a transfer; report ok / reason (or "running") / how long the wait took."""
        from cluster.kv_transport import KVTransferError

        start = time.monotonic()
        future = self.futures[transfer_id]
        try:
            result = future.result(wait_s)
        except TimeoutError:
            return {"ok": False, "reason": "running", "waited": time.monotonic() - start}
        except KVTransferError as exc:
            return {"ok": False, "reason": exc.reason.value, "detail": exc.detail, "waited": time.monotonic() - start}
        if transfer_id in self.receiving:
            self.landed.update(self.requests[transfer_id].block_ids)
        return {"ok": True, "bytes": result.num_bytes, "waited": time.monotonic() - start}

    def abort(self, transfer_id: str) -> bool:
        return self.transport.abort(transfer_id)

    def release(self, transfer_id: str) -> int:
        """Free the request's blocks (idempotent), as a role does once a transfer ends."""
        request = self.requests.get(transfer_id)
        return self.blocks.free(request) if request is not None else 0

    def block_stats(self) -> dict[str, int]:
        self.blocks.check_invariants()
        stats = self.blocks.stats()
        return {"num_used": stats.num_used, "num_free": stats.num_free, "num_total": stats.num_total}

    # ------------------------------------------------------------------ checks
    def digest(self, block_ids: list[int]) -> str:
        import torch

        data = self.kv[:, :, torch.tensor(block_ids, device=self.kv.device)].contiguous().view(torch.uint8).cpu()
        return hashlib.sha256(data.numpy().tobytes()).hexdigest()

    def reset_baseline(self) -> None:
        self.initial = self.kv.clone()
        self.landed = set()

    def untouched_ok(self) -> bool:
        """Every block no completed receive wrote still holds its initial bytes."""
        import torch

        others = [b for b in range(self.kv.shape[2]) if b not in self.landed]
        index = torch.tensor(others, device=self.kv.device)
        return bool(torch.equal(self.kv[:, :, index].view(torch.int16), self.initial[:, :, index].view(torch.int16)))

    def transport_stats(self) -> dict[str, Any]:
        return vars(self.transport.stats())

    def close(self) -> None:
        self.transport.close()


def _serve(conn: multiprocessing.connection.Connection, kwargs: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"[{kwargs['worker_id']} %(name)s] %(message)s")
    try:
        node = Node(**kwargs)
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ok", node.address()))
    while True:
        try:
            name, args, kw = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            conn.send(("ok", getattr(node, name)(*args, **kw)))
        except BaseException:
            conn.send(("err", traceback.format_exc()))


class NodeHandle:
    """Parent-side handle of a `Node` child process."""

    def __init__(self, **kwargs: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = kwargs["worker_id"]
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, kwargs), daemon=True, name=self.name)
        self.process.start()
        child.close()
        self.peer: Any = None

    def ready(self, timeout: float = 120.0) -> Any:
        self.peer = self._reply("start", timeout)
        return self.peer

    def call(self, method: str, *args: Any, timeout: float = 30.0, **kwargs: Any) -> Any:
        self._conn.send((method, args, kwargs))
        return self._reply(method, timeout)

    def _reply(self, what: str, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer to {what} within {timeout} s")
        status, value = self._conn.recv()
        if status == "err":
            raise RuntimeError(f"{self.name}.{what} failed in the child:\n{value}")
        return value

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.call("close", timeout=5)
        self.kill()


def start_nodes(specs: list[dict[str, Any]], timeout: float = 120.0) -> list[NodeHandle]:
    """Start several nodes in parallel (each pays a torch import) and wait until all serve."""
    handles = [NodeHandle(**spec) for spec in specs]
    try:
        for handle in handles:
            handle.ready(timeout)
    except BaseException:
        for handle in handles:
            handle.kill()
        raise
    return handles
