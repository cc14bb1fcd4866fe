"""The prefill role: compute a prompt's KV (chunked, under the shared token budget), sample the
first token, and push the KV into the decode worker's pre-allocated blocks.

Per request (the `Prefill` RPC, called by the decode worker that owns the request):

    waiting ──▶ running (chunks) ──first token──▶ sending_kv ──sent──▶ done (blocks freed)
                                       │                        │
                                 1st message: token      2nd message: transfer stats

The RPC streams the first token the moment it is sampled, while the KV goes out, so the decode
worker can hand it to the client before the KV lands (the transfer stays off the time to first
token); the second message says the send completed. An error after the first message is a
failed transfer.

The request carries `keep_kv`, so the scheduler parks it in SENDING_KV with its blocks instead of
freeing them; this role frees them once the transfer is over, whatever its outcome. The blocks
the decode worker already had cached (`destination.num_cached_tokens`) are not sent.
`AbortRequest` (or a cancelled RPC) cancels the transfer and frees the blocks, idempotently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

import grpc

from cluster.convert import (
    MultiModalError,
    SamplingParamsError,
    logprobs_to_proto,
    mm_items_from_proto,
    sampling_from_proto,
)
from cluster.engine_loop import EngineLoop
from cluster.kv_transport import KVTransferError, KVTransport, PeerRef, TransferFuture, TransferResult
from cluster.role_support import OutputQueue, RoleError, on_engine, transfer_error_status, wait_transfer
from engine.request import Request, RequestStatus
from protos.pdserve.v1 import worker_pb2


class PrefillRole:
    def __init__(self, engine_loop: EngineLoop, transport: KVTransport) -> None:
        self.loop = engine_loop
        self.transport = transport
        # request id -> (request, transfer id, the task serving its Prefill RPC)
        self._active: dict[str, tuple[Request, str, asyncio.Task]] = {}
        self.num_prefills = 0
        self.num_transfer_failures = 0
        self.on_transfer: Callable[[str, float], None] | None = None  # (direction, seconds), for metrics

    async def prefill(self, msg: worker_pb2.PrefillRequest, context) -> AsyncIterator[worker_pb2.PrefillResponse]:
        spec = msg.request
        dest = msg.destination
        try:
            params = sampling_from_proto(spec.sampling)
            items = mm_items_from_proto(spec.mm_items, len(spec.prompt_token_ids))  # with their bytes
        except (SamplingParamsError, MultiModalError) as exc:
            raise RoleError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        num_outputs = len(spec.output_token_ids)
        # Exactly one new token here: the decode worker samples the rest.
        params = dataclasses.replace(
            params, max_tokens=num_outputs + 1, min_tokens=min(params.min_tokens, num_outputs + 1)
        )
        request: Request = await on_engine(
            self.loop,
            lambda e: e.make_request(
                spec.request_id, list(spec.prompt_token_ids), params, list(spec.output_token_ids), mm_items=items
            ),
        )
        request.keep_kv = True
        transfer_id = f"{spec.request_id}/{msg.transfer_id}"
        self._active[request.request_id] = (request, transfer_id, asyncio.current_task())
        queue = OutputQueue()
        start = time.monotonic()
        try:

            def submit(engine) -> None:
                self.loop.sinks[request.request_id] = queue.push
                engine.submit(request)

            await on_engine(self.loop, submit)
            output = await queue.get()
            prefill_seconds = time.monotonic() - start
            future, num_blocks = self._start_send(request, dest, transfer_id)
            try:
                first = worker_pb2.PrefillResponse(
                    first_token_id=output.new_token_ids[0],
                    num_prefilled_tokens=request.num_prompt_tokens + num_outputs - request.num_cached_tokens,
                    num_cached_tokens=request.num_cached_tokens,
                    prefill_seconds=prefill_seconds,
                )
                if output.new_logprobs:
                    first.first_token_logprobs.CopyFrom(logprobs_to_proto(output.new_logprobs[0]))
                yield first
                result = await self._wait_sent(future)
            finally:
                future.cancel()  # no-op when done; on cancellation, stops the transport touching the blocks
            self.num_prefills += 1
            yield worker_pb2.PrefillResponse(
                transfer=worker_pb2.KVTransferStats(
                    num_bytes=result.num_bytes, num_blocks=num_blocks, seconds=result.elapsed_s
                )
            )
        finally:
            await self._finish(request, transfer_id)

    def _start_send(
        self, request: Request, dest: worker_pb2.KVDestination, transfer_id: str
    ) -> tuple[TransferFuture, int]:
        """Start sending every KV block D does not hold; the future and the number of blocks sent."""
        block_size = self.transport.spec.block_size
        num_skip = dest.num_cached_tokens // block_size
        num_tokens = request.num_tokens - 1  # the KV of every token before the one just sampled
        peer = PeerRef(dest.worker.worker_id, dest.worker.incarnation_id, dest.kv_store_host, dest.kv_store_port)
        block_ids = request.block_ids[num_skip:]
        try:
            future = self.transport.send(peer, transfer_id, block_ids, num_tokens - num_skip * block_size)
        except ValueError as exc:  # a destination that cannot be reached or does not fit
            raise RoleError(grpc.StatusCode.INVALID_ARGUMENT, f"KV destination: {exc}") from None
        return future, len(block_ids)

    async def _wait_sent(self, future: TransferFuture) -> TransferResult:
        try:
            result = await wait_transfer(future)
        except KVTransferError as exc:
            self.num_transfer_failures += 1
            raise transfer_error_status(exc) from None
        if self.on_transfer is not None:
            self.on_transfer("send", result.elapsed_s)
        return result

    async def _finish(self, request: Request, transfer_id: str) -> None:
        """Free the request's blocks whatever happened (idempotent)."""
        if self._active.pop(request.request_id, None) is None:
            return
        self.loop.sinks.pop(request.request_id, None)
        self.transport.abort(transfer_id)

        def release(engine) -> None:
            if request.status is RequestStatus.SENDING_KV:
                engine.release(request)
            elif not engine.abort(request.request_id):
                engine.scheduler.abort(request)

        with contextlib.suppress(RuntimeError):
            await asyncio.shield(on_engine(self.loop, release))

    @property
    def num_active(self) -> int:
        return len(self._active)

    async def abort(self, request_id: str) -> bool:
        """Cancel the request's Prefill RPC; its cleanup frees the blocks. Idempotent."""
        entry = self._active.get(request_id)
        if entry is None:
            return False
        request, transfer_id, task = entry
        task.cancel()
        await self._finish(request, transfer_id)
        return True
