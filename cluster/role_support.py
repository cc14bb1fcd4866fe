"""Plumbing shared by the prefill and decode roles: asyncio ↔ engine thread ↔ transport threads.

Roles run their gRPC handlers on the worker's asyncio loop; the engine lives on the engine thread
(`EngineLoop`); KV transfers complete on transport threads. These helpers turn each of those into
something a coroutine can await, without blocking the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc

from cluster.engine_loop import EngineLoop
from cluster.kv_transport import KVTransferError, TransferFuture, TransferResult
from engine.llm_engine import InvalidRequestError, LLMEngine
from engine.scheduler import RequestOutput

T = TypeVar("T")


class RoleError(Exception):
    """Ends an RPC with `code` and `message` (the servicer turns it into a gRPC status)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def on_engine(loop: EngineLoop, fn: Callable[[LLMEngine], T]) -> T:
    """Run `fn(engine)` on the engine thread; InvalidRequestError becomes INVALID_ARGUMENT."""
    try:
        return await asyncio.wrap_future(loop.call(fn))
    except InvalidRequestError as exc:
        raise RoleError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


async def wait_transfer(future: TransferFuture) -> TransferResult:
    """Await a transport future from asyncio (it resolves on a transport thread)."""
    aio_loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = aio_loop.create_future()

    def wake(_: TransferFuture) -> None:
        aio_loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    future.add_done_callback(wake)
    await waiter
    return future.result(timeout=0)


class OutputQueue:
    """A request's outputs, pushed on the engine thread and awaited on the asyncio loop.

    `fail(error)` (loop thread) makes the next `get` raise `error`: how a role evicts a stream.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()

    def push(self, output: RequestOutput) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    def fail(self, error: Exception) -> None:
        self._queue.put_nowait(error)

    async def get(self) -> RequestOutput:
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item


def transfer_error_status(exc: KVTransferError) -> RoleError:
    """Retryable transfer failures become UNAVAILABLE (the router retries on another pair)."""
    code = grpc.StatusCode.UNAVAILABLE if exc.reason.retryable else grpc.StatusCode.INTERNAL
    return RoleError(code, f"KV transfer failed ({exc.reason.value}): {exc.detail}")
