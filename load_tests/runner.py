"""Sends a workload on an arrival schedule and collects one `RequestRecord` per request.

One client process runs one asyncio loop: a single scheduler coroutine walks the schedule in
order (sleeping until each send time, then waiting for a concurrency slot if there is a cap)
and starts one task per request. Bounds: no request is sent after `max_duration_s`; requests
still in flight `drain_timeout_s` later are cancelled and recorded as INCOMPLETE.

Several client processes (`num_procs`) split the schedule round-robin and share one start time
on the machine's monotonic clock; each returns its records to the parent, which draws the
progress bar. How far one process goes is measured against the fake server
(`load_tests.fake_server`) and stated in the README; `p99_client_send_lag_ms` in every summary
says whether the client kept up with the schedule (tens of ms or more: use more processes).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import queue
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from load_tests.backends import BackendConfig, RequestRecord, make_backend
from load_tests.workload import RequestSpec


@dataclass(frozen=True)
class RunLimits:
    """Every run is bounded in requests and seconds."""

    max_requests: int = 1000
    max_duration_s: float = 60.0  # no request is sent later than this after the start
    drain_timeout_s: float = 30.0  # then in-flight requests get this long before they are cancelled

    def __post_init__(self) -> None:
        if self.max_requests < 1 or not self.max_duration_s > 0 or self.drain_timeout_s < 0:
            raise ValueError(f"run limits must be positive: {self}")


@dataclass(frozen=True)
class LoadPlan:
    """What one client process sends: specs with their send offsets (s from the start)."""

    specs: tuple[RequestSpec, ...]
    offsets: tuple[float, ...]
    max_concurrency: int | None  # in flight at once from this process (None: no cap)


class Progress:
    """A one-line progress bar on stderr (a line per 10 % when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.done = 0
        self._last_draw = 0.0
        self._last_decile = -1
        self._tty = self.stream.isatty()

    def update(self, done: int, failed: int = 0) -> None:
        self.done = done
        now = time.monotonic()
        if not self.enabled:
            return
        if self._tty:
            if now - self._last_draw < 0.1 and done < self.total:
                return
            self._last_draw = now
            width = 30
            filled = int(width * done / max(1, self.total))
            elapsed = now - self.start
            rate = done / elapsed if elapsed > 0 else 0.0
            text = f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}"
            text += f" {rate:.1f} req/s {elapsed:.0f} s" + (f" {failed} failed" if failed else "")
            self.stream.write(text)
            self.stream.flush()
            return
        decile = 10 * done // max(1, self.total)
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(f"{self.label}: {done}/{self.total} done, {now - self.start:.1f} s\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()


async def run_plan(
    backend_config: BackendConfig,
    plan: LoadPlan,
    start: Callable[[], float],
    limits: RunLimits,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[float, list[RequestRecord]]:
    """Connect, then send `plan` from monotonic time `start()` (asked once connected); returns
    the start and a record per spec (NOT_SENT if the time limit cut it off)."""
    backend = make_backend(backend_config)
    await backend.open()
    return await _send_all(backend, plan, start(), limits, on_done)


async def _send_all(
    backend, plan: LoadPlan, start: float, limits: RunLimits, on_done
) -> tuple[float, list[RequestRecord]]:
    records = [RequestRecord(s.index, s.prompt_len, s.max_tokens) for s in plan.specs]
    slots = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
    tasks: list[asyncio.Task] = []
    stop_sending = start + limits.max_duration_s

    async def one(spec: RequestSpec, record: RequestRecord) -> None:
        try:
            await backend.send(spec, record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a client-side bug must not stop the run: record it
            record.status, record.error = "CLIENT_ERROR", repr(exc)
            record.ended_at = record.ended_at or time.monotonic()
        finally:
            if slots is not None:
                slots.release()
            if on_done is not None:
                on_done(record)

    try:
        for spec, offset, record in zip(plan.specs, plan.offsets, records, strict=True):
            record.scheduled_at = start + offset
            if record.scheduled_at > stop_sending:
                break
            delay = record.scheduled_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
                if time.monotonic() > stop_sending:
                    slots.release()
                    break
                # A closed loop: a request released by a slot counts from when it could go.
                record.scheduled_at = max(record.scheduled_at, time.monotonic())
            tasks.append(asyncio.create_task(one(spec, record)))
        if tasks:
            deadline = max(time.monotonic(), stop_sending) + limits.drain_timeout_s
            _done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.close()
    for record in records:
        if record.status == "NOT_SENT":
            record.scheduled_at = record.scheduled_at or start
    return start, records


def split_plan(
    specs: Sequence[RequestSpec], offsets: Sequence[float], concurrency: int | None, num_procs: int
) -> list[LoadPlan]:
    """Round-robin shares of the schedule (so each process's load is spread over the whole run)."""
    plans = []
    for k in range(num_procs):
        cap = None if concurrency is None else max(1, math.ceil(concurrency / num_procs))
        if concurrency is not None and k >= concurrency:
            break
        plans.append(LoadPlan(tuple(specs[k::num_procs]), tuple(float(o) for o in offsets[k::num_procs]), cap))
    return plans


def run_load(
    backend_config: BackendConfig,
    specs: Sequence[RequestSpec],
    offsets: Sequence[float] | np.ndarray,
    limits: RunLimits,
    max_concurrency: int | None = None,
    num_procs: int = 1,
    progress: Progress | None = None,
) -> tuple[float, list[RequestRecord]]:
    """Run the load (in this process, or in `num_procs` client processes); returns (start, records)."""
    specs = list(specs)[: limits.max_requests]
    offsets = [float(o) for o in offsets][: len(specs)]
    if num_procs <= 1:
        return _run_here(backend_config, specs, offsets, limits, max_concurrency, progress)
    return _run_in_processes(backend_config, split_plan(specs, offsets, max_concurrency, num_procs), limits, progress)


def _run_here(backend_config, specs, offsets, limits, max_concurrency, progress) -> tuple[float, list[RequestRecord]]:
    counts = {"done": 0, "failed": 0}

    def on_done(record: RequestRecord) -> None:
        counts["done"] += 1
        counts["failed"] += not record.success
        if progress is not None:
            progress.update(counts["done"], counts["failed"])

    async def main() -> tuple[float, list[RequestRecord]]:
        plan = LoadPlan(tuple(specs), tuple(offsets), max_concurrency)
        return await run_plan(backend_config, plan, lambda: time.monotonic() + 0.01, limits, on_done)

    try:
        return asyncio.run(main())
    finally:
        if progress is not None:
            progress.close()


def _child(backend_config, plan, limits, start_value, go, done_counter, results, slot) -> None:
    """One client process: wait for the shared start time, run its share, send records back."""

    def on_done(record: RequestRecord) -> None:
        with done_counter.get_lock():
            done_counter.value += 1

    def start() -> float:
        results.put(("ready", slot, None))
        go.wait(120)
        return start_value.value

    try:
        _start, records = asyncio.run(run_plan(backend_config, plan, start, limits, on_done))
        results.put(("records", slot, [r.to_dict() for r in records]))
    except BaseException as exc:  # report, so the parent does not wait forever
        results.put(("error", slot, repr(exc)))


def _run_in_processes(backend_config, plans: list[LoadPlan], limits, progress) -> tuple[float, list[RequestRecord]]:
    ctx = mp.get_context("spawn")  # grpc does not survive fork
    results = ctx.Queue()
    go = ctx.Event()
    start_value = ctx.Value("d", 0.0)
    done_counter = ctx.Value("i", 0)
    procs = [
        ctx.Process(
            target=_child, args=(backend_config, plan, limits, start_value, go, done_counter, results, k), daemon=True
        )
        for k, plan in enumerate(plans)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, list[RequestRecord]] = {}
    errors: list[str] = []
    try:
        ready = 0
        deadline = time.monotonic() + 120
        while ready < len(procs):
            try:
                kind, slot, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [k for k, p in enumerate(procs) if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"client processes {dead} exited before the start (run from a __main__ guard?)"
                    ) from None
                continue
            if kind != "ready":
                raise RuntimeError(f"client process {slot} failed to start: {payload}")
            ready += 1
        start = time.monotonic() + 0.2
        start_value.value = start
        go.set()
        budget = limits.max_duration_s + limits.drain_timeout_s + 60
        deadline = time.monotonic() + budget
        while len(collected) + len(errors) < len(procs):
            if progress is not None:
                progress.update(done_counter.value)
            try:
                kind, slot, payload = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError("client processes did not finish within the run's bounds") from None
                continue
            if kind == "records":
                collected[slot] = [RequestRecord.from_dict(d) for d in payload]
            else:
                errors.append(f"client process {slot}: {payload}")
        if progress is not None:
            progress.update(done_counter.value)
    finally:
        if progress is not None:
            progress.close()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    if errors:
        raise RuntimeError("; ".join(errors))
    records = sorted((r for rs in collected.values() for r in rs), key=lambda r: r.index)
    return start, records
