"""The decode role: reserve KV first, have a prefill worker fill it, then decode and stream.

Per request (the `Decode` RPC):

    preallocated ──expect(KV)──▶ receiving ──KV landed──▶ running ──▶ finished
         │                            │                                 ▲
         │              P's first token: streamed to the client at once  │
         └── no prefill peer: the request is prefilled here (mixed / conditional disaggregation)

P streams the first token before the KV has landed, and this worker passes it on right away, so
the transfer stays off the time to first token. If the transfer then fails, the RPC ends with
ABORTED after that token, and the router continues the request elsewhere from prompt + token.

Admission: when the blocks aren't there, the request waits (bounded by `admission_timeout_s`)
and then fails with RESOURCE_EXHAUSTED. A failed prefill or transfer frees the blocks and fails
the RPC with UNAVAILABLE so the router retries on another pair. A cancelled RPC aborts the
request here, cancels the transfer and tells the prefill worker, freeing every block.

Images (VL models): the `EngineRequest` arrives with its images' bytes and is forwarded to the
prefill peer unchanged; this engine's request keeps the items without bytes (their grids place
the 3D positions, their hashes key the blocks). A local prefill keeps the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from cluster.convert import (
    FINISH_REASONS,
    MultiModalError,
    SamplingParamsError,
    logprobs_from_proto,
    logprobs_to_proto,
    mm_items_from_proto,
    sampling_from_proto,
)
from cluster.engine_loop import EngineLoop
from cluster.kv_transport import KVTransferError, KVTransport, PeerRef, TransferFuture, TransferResult
from cluster.role_support import OutputQueue, RoleError, on_engine, transfer_error_status, wait_transfer
from engine.request import Request
from engine.scheduler import RequestOutput, SampledToken
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class _RemotePrefill:
    """The Prefill call of one request (set once started, for cancelling it) and its reader."""

    call: grpc.aio.UnaryStreamCall | None = None
    tail: asyncio.Future | None = None


async def _read_to_end(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError | None:
    """Read a stream to its end: None when it ended OK, else its error (returned, not raised)."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


@dataclass(frozen=True)
class DecodeRoleConfig:
    admission_timeout_s: float = 30.0
    admission_poll_s: float = 0.01
    prefill_timeout_s: float = 120.0


class DecodeRole:
    def __init__(
        self,
        engine_loop: EngineLoop,
        transport: KVTransport,
        self_ref: common_pb2.WorkerRef,
        config: DecodeRoleConfig | None = None,
    ) -> None:
        self.loop = engine_loop
        self.transport = transport
        self.self_ref = self_ref
        self.config = config or DecodeRoleConfig()
        self._peers: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = {}
        self._streams: dict[str, OutputQueue] = {}  # request id -> its output queue, while streaming
        self.num_remote_prefills = 0
        self.num_local_prefills = 0
        self.num_transfer_failures = 0
        self.on_transfer: Callable[[str, float], None] | None = None  # (direction, seconds), for metrics

    async def close(self) -> None:
        for channel, _ in self._peers.values():
            await channel.close()

    def _peer_stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if address not in self._peers:
            channel = grpc.aio.insecure_channel(address)
            self._peers[address] = (channel, worker_pb2_grpc.WorkerStub(channel))
        return self._peers[address][1]

    async def decode(self, msg: worker_pb2.DecodeRequest, context) -> AsyncIterator[worker_pb2.DecodeResponse]:
        spec = msg.request
        try:
            params = sampling_from_proto(spec.sampling)
            # A peer prefills: it gets the images' bytes (the request is forwarded as is); this
            # engine keeps only their grids and hashes (positions, block hashes).
            items = mm_items_from_proto(
                spec.mm_items, len(spec.prompt_token_ids), keep_data=not msg.HasField("prefill_peer")
            )
        except (SamplingParamsError, MultiModalError) as exc:
            raise RoleError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        request: Request = await on_engine(
            self.loop,
            lambda e: e.make_request(
                spec.request_id, list(spec.prompt_token_ids), params, list(spec.output_token_ids), mm_items=items
            ),
        )
        queue = OutputQueue()
        finished = False
        remote = _RemotePrefill()
        self._streams[request.request_id] = queue
        try:
            if msg.HasField("prefill_peer"):
                responses = self._remote_prefill(msg, request, queue, remote)
            else:
                responses = self._local_prefill(request, queue)
            async for response in responses:
                yield response
                finished = response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield self._response(output)
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                await self._abort(request, msg, remote.call)

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def evict_all(self, reason: str) -> int:
        """End every stream here with UNAVAILABLE; the router continues each elsewhere from the
        prompt plus the tokens it already streamed (no token lost or repeated)."""
        for queue in self._streams.values():
            queue.fail(RoleError(grpc.StatusCode.UNAVAILABLE, reason))
        return len(self._streams)

    # ----------------------------------------------------------------------------- prefill paths
    async def _local_prefill(self, request: Request, queue: OutputQueue) -> AsyncIterator[worker_pb2.DecodeResponse]:
        start = time.monotonic()

        def submit(engine) -> None:
            self.loop.sinks[request.request_id] = queue.push
            engine.submit(request)

        await on_engine(self.loop, submit)
        self.num_local_prefills += 1
        output = await queue.get()
        response = self._response(output)
        response.prefill.CopyFrom(
            worker_pb2.PrefillInfo(
                worker_id=self.self_ref.worker_id,
                is_remote=False,
                num_prefilled_tokens=request.num_prompt_tokens - request.num_cached_tokens,
                num_cached_tokens=request.num_cached_tokens,
                prefill_seconds=time.monotonic() - start,
            )
        )
        yield response

    async def _remote_prefill(
        self, msg: worker_pb2.DecodeRequest, request: Request, queue: OutputQueue, remote: _RemotePrefill
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        """Yield the first token the moment P sampled it; once the KV has landed, join the batch
        (and yield the finish, if that first token ended the request)."""
        start = time.monotonic()
        await self._preallocate(request)
        queue_seconds = time.monotonic() - start
        peer = msg.prefill_peer
        block_size = self.transport.spec.block_size
        num_hit_blocks = request.num_cached_tokens // block_size
        transfer_id = f"{request.request_id}/{msg.transfer_id}"
        future = self.transport.expect(
            PeerRef(peer.worker_id, peer.incarnation_id),
            transfer_id,
            request.block_ids[num_hit_blocks:],
            request.num_tokens - request.num_cached_tokens,
        )
        local = self.transport.local
        prefill_msg = worker_pb2.PrefillRequest(
            request=msg.request,
            destination=worker_pb2.KVDestination(
                worker=self.self_ref,
                kv_store_host=local.host,
                kv_store_port=local.port,
                block_ids=request.block_ids,
                num_cached_tokens=request.num_cached_tokens,
            ),
            transfer_id=msg.transfer_id,
        )
        stub = self._peer_stub(peer.grpc_address)
        remote.call = call = stub.Prefill(prefill_msg, timeout=self.config.prefill_timeout_s)
        try:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise RoleError(grpc.StatusCode.ABORTED, f"prefill on {peer.worker_id} ended without a token")
            token = SampledToken(
                response.first_token_id,
                logprobs_from_proto(response.first_token_logprobs)
                if response.HasField("first_token_logprobs")
                else None,
            )
            num_blocks_received = len(request.block_ids) - num_hit_blocks
            first = worker_pb2.DecodeResponse(token_ids=[token.token_id], logprobs=self._first_logprobs(response))
            first.prefill.CopyFrom(
                worker_pb2.PrefillInfo(
                    worker_id=peer.worker_id,
                    is_remote=True,
                    num_prefilled_tokens=response.num_prefilled_tokens,
                    num_cached_tokens=request.num_cached_tokens,
                    queue_seconds=queue_seconds,
                    prefill_seconds=response.prefill_seconds,
                    transfer=worker_pb2.KVTransferStats(
                        num_bytes=self.transport.spec.transfer_bytes(num_blocks_received),
                        num_blocks=num_blocks_received,
                    ),
                ),
            )
            yield first  # before the KV lands: the client has its first token now
            result = await self._kv_landed(future, call, remote)
        except grpc.aio.AioRpcError as exc:
            # ABORTED (retryable) says "the prefill side failed": the router retries with another
            # prefill worker (or, once the first token is out, continues the request elsewhere)
            # and keeps this decode worker in rotation.
            future.cancel()
            raise RoleError(
                grpc.StatusCode.ABORTED, f"prefill on {peer.worker_id} failed: {exc.code().name}: {exc.details()}"
            ) from None
        except KVTransferError as exc:
            self.num_transfer_failures += 1
            raise RoleError(grpc.StatusCode.ABORTED, transfer_error_status(exc).message) from None
        self.num_remote_prefills += 1
        if self.on_transfer is not None:
            self.on_transfer("recv", result.elapsed_s)

        def adopt(engine) -> RequestOutput:
            self.loop.sinks[request.request_id] = queue.push
            return engine.adopt(request, token)

        output = await on_engine(self.loop, adopt)
        if output.finished:  # the first token ended it: say so (the token itself is already out)
            last = self._response(output)
            del last.token_ids[:]
            del last.logprobs[:]
            yield last

    async def _kv_landed(
        self, future: TransferFuture, call: grpc.aio.UnaryStreamCall, remote: _RemotePrefill
    ) -> TransferResult:
        """The receive's result; fails as soon as P's stream does (P died, or its send failed).

        The rest of P's stream is read by `remote.tail` (kept running after the KV landed, so P
        ends its RPC normally rather than seeing it cancelled)."""
        landed = asyncio.ensure_future(wait_transfer(future))
        remote.tail = tail = asyncio.ensure_future(_read_to_end(call))
        try:
            done, _ = await asyncio.wait({landed, tail}, return_when=asyncio.FIRST_COMPLETED)
            if landed not in done and tail.result() is not None:
                raise tail.result()
            return await landed
        finally:
            landed.cancel()

    def _first_logprobs(self, response: worker_pb2.PrefillResponse) -> list:
        if not response.HasField("first_token_logprobs"):
            return []
        return [response.first_token_logprobs]

    async def _preallocate(self, request: Request) -> None:
        deadline = time.monotonic() + self.config.admission_timeout_s
        while await on_engine(self.loop, lambda e: e.preallocate(request)) is None:
            if time.monotonic() >= deadline:
                raise RoleError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"no KV room for {request.num_tokens} tokens after {self.config.admission_timeout_s:.0f} s",
                )
            await asyncio.sleep(self.config.admission_poll_s)

    # ----------------------------------------------------------------------------- outputs
    def _response(self, output: RequestOutput) -> worker_pb2.DecodeResponse:
        request = output.request
        response = worker_pb2.DecodeResponse(
            token_ids=list(output.new_token_ids), logprobs=[logprobs_to_proto(lp) for lp in output.new_logprobs]
        )
        if output.finished:
            response.finish_reason = FINISH_REASONS.get(
                request.finish_reason or "error", common_pb2.FINISH_REASON_ERROR
            )
            if isinstance(request.stop_reason, int):
                response.matched_stop_token_id = request.stop_reason
            response.usage.CopyFrom(
                common_pb2.Usage(
                    prompt_tokens=request.num_prompt_tokens,
                    completion_tokens=request.num_output_tokens,
                    cached_prompt_tokens=request.num_cached_tokens,
                )
            )
        return response

    async def _abort(
        self, request: Request, msg: worker_pb2.DecodeRequest, prefill_call: grpc.aio.UnaryStreamCall | None
    ) -> None:
        """Free everything this request holds here and on its prefill worker (idempotent)."""
        self.loop.sinks.pop(request.request_id, None)
        self.transport.abort(f"{request.request_id}/{msg.transfer_id}")
        with contextlib.suppress(RuntimeError):
            await asyncio.shield(
                on_engine(self.loop, lambda e: e.abort(request.request_id) or e.scheduler.abort(request))
            )
        if msg.HasField("prefill_peer"):
            if prefill_call is not None:
                prefill_call.cancel()
            stub = self._peer_stub(msg.prefill_peer.grpc_address)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                await asyncio.shield(
                    stub.AbortRequest(
                        worker_pb2.WorkerAbortRequest(
                            request_id=request.request_id, transfer_id=msg.transfer_id, reason="decode aborted"
                        ),
                        timeout=2.0,
                    )
                )
