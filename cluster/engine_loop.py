"""The engine thread: one thread owns an `LLMEngine` and runs its `step()` loop.

Everything else (gRPC handlers on the asyncio loop, transport threads) talks to the engine only
by `call(fn)`: `fn(engine)` runs on the engine thread between two steps and its result comes back
as a `concurrent.futures.Future`. Each live request has a sink that receives its `RequestOutput`s
on the engine thread; sinks must be quick (hand off to an asyncio queue, say).

    loop iteration:  run queued calls → run pollers (roles: transfers done?) → step() → dispatch

Thread-safety: `call`, `stop` and `wake` may be used from any thread; everything else belongs to
the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from engine.llm_engine import LLMEngine
from engine.request import RequestStatus
from engine.scheduler import RequestOutput

T = TypeVar("T")
OutputSink = Callable[[RequestOutput], None]
log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.005) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.sinks: dict[str, OutputSink] = {}
        self.pollers: list[Callable[[], bool]] = []  # each returns True while it still has work pending
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], object], Future]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.num_steps = 0
        self.last_step_seconds = 0.0
        # Made on the engine thread after every step or idle wait; readers (heartbeats) take the
        # latest without waiting for the engine. Replaced whole, never mutated: safe to read.
        self.snapshot_fn: Callable[[LLMEngine], object] | None = None
        self.snapshot: object | None = None
        # Told about every step: (seconds, batch size, whether it computed prompt tokens).
        self.step_listeners: list[Callable[[float, int, bool], None]] = []

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._calls.put((lambda engine: None, Future()))
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread; its result or exception lands in the future."""
        future: Future[T] = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError("engine loop is stopped"))
            return future
        self._calls.put((fn, future))
        return future

    # ----------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        self.engine.bind_device()  # this thread runs the model: its current device must be the engine's
        while not self._stop.is_set():
            busy = self._drain_calls()
            for poll in list(self.pollers):
                busy = poll() or busy
            if self.engine.has_unfinished:
                self._step()
            elif not busy:
                self._wait_for_call()
            if self.snapshot_fn is not None:
                self.snapshot = self.snapshot_fn(self.engine)

    def _drain_calls(self) -> bool:
        ran = False
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            self._run_call(fn, future)

    def _wait_for_call(self) -> None:
        try:
            fn, future = self._calls.get(timeout=self.idle_wait_s)
        except queue.Empty:
            return
        self._run_call(fn, future)

    def _run_call(self, fn: Callable[[LLMEngine], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as exc:  # handed to the caller, never kills the loop
            future.set_exception(exc)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception:
            # A failed step fails the requests it ran, not the worker.
            log.exception("engine step failed; failing the running requests")
            outputs = self._fail_running()
        self.last_step_seconds = time.perf_counter() - start
        self.num_steps += 1
        stats = self.engine.scheduler.stats
        is_prefill = stats.last_num_batched_tokens > stats.last_batch_size
        for listener in self.step_listeners:
            listener(self.last_step_seconds, stats.last_batch_size, is_prefill)
        for output in outputs:
            sink = self.sinks.get(output.request_id)
            if output.finished:
                self.sinks.pop(output.request_id, None)
            if sink is not None:
                try:
                    sink(output)
                except Exception:
                    log.exception("output sink of request %s failed", output.request_id)

    def _fail_running(self) -> list[RequestOutput]:
        failed = []
        for request in list(self.engine.scheduler.running):
            self.engine.finish(request, RequestStatus.FINISHED_ERROR)
            failed.append(RequestOutput(request, finished=True))
        return failed
