"""Continuous-batching scheduler with chunked prefill under a token budget. Plain Python, no torch.

Each step gives every running request `num_tokens - num_computed_tokens` new tokens (a decode
token, or the rest of its prompt in chunks), then admits waiting requests while the token budget,
the sequence limit and the KV blocks allow. When a running request cannot get a block, the most
recently admitted running request is preempted (its blocks freed; it recomputes later from prompt
+ output). Waiting requests are admitted in arrival order; a request at the head that does not fit
blocks the ones behind it (no starvation of long prompts).

    schedule() -> SchedulerOutput     what to compute this step
    update(output, sampled) -> [...]  advance num_computed_tokens, append sampled tokens, finish

Requests handed in by a role after their KV arrived (`add_running`) skip the waiting queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus, TokenLogprobs


@dataclass(frozen=True)
class ScheduledRequest:
    """`num_new_tokens` of `request` to compute this step; `samples` when they reach its last token."""

    request: Request
    num_new_tokens: int
    samples: bool

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> ScheduledRequest:
        return cls(request, num_new_tokens, request.num_computed_tokens + num_new_tokens == request.num_tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...] = ()
    preempted: tuple[Request, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request: tokens appended and, at the end, why it finished."""

    request: Request
    new_token_ids: tuple[int, ...] = ()
    new_logprobs: tuple[TokenLogprobs, ...] = ()
    finished: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_aborted: int = 0
    last_batch_size: int = 0
    last_num_batched_tokens: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)


class Scheduler:
    """Not thread-safe: the engine's step thread is the only caller."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self.token_budget = config.max_num_batched_tokens  # tokens per step (see set_prefill_only)

    def set_prefill_only(self, prefill_only: bool) -> None:
        """Whether the engine now serves the prefill role only: its steps may then carry up to
        `config.prefill_budget` tokens, otherwise `config.max_num_batched_tokens`."""
        self.token_budget = self.config.prefill_budget if prefill_only else self.config.max_num_batched_tokens

    # ----------------------------------------------------------------------------- admission
    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Adopt a request whose KV is already in its blocks (decode role, after the transfer)."""
        request.set_status(RequestStatus.RUNNING)
        self.running.append(request)

    def abort(self, request: Request) -> bool:
        """Drop a request wherever it is and free its blocks. Idempotent; True if it was known here."""
        known = request in self.running or request in self.waiting
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
        if not request.is_finished:
            request.set_status(RequestStatus.FINISHED_ABORTED)
            self.stats.num_aborted += 1
        return known

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        for request in list(self.running):
            if budget == 0:
                break
            if request in preempted:
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            if not self._allocate_or_preempt(request, num_new, scheduled, preempted):
                continue
            scheduled.append(ScheduledRequest.of(request, num_new))
            budget -= num_new

        if not preempted:
            budget = self._admit(budget, scheduled)
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _allocate_or_preempt(
        self, request: Request, num_new: int, scheduled: list[ScheduledRequest], preempted: list[Request]
    ) -> bool:
        while self.block_manager.allocate(request, num_new) is None:
            victim = self._pick_victim(request, scheduled)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _pick_victim(self, request: Request, scheduled: list[ScheduledRequest]) -> Request:
        """The latest-arrived running request not already scheduled this step (possibly `request`)."""
        taken = {id(s.request) for s in scheduled}
        candidates = [r for r in self.running if id(r) not in taken]
        return max(candidates, key=lambda r: r.arrival_time) if candidates else request

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.set_status(RequestStatus.WAITING)
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1

    def _admit(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit_blocks = self.block_manager.get_computed_blocks(request)
            num_computed = len(hit_blocks) * self.block_manager.block_size
            num_new = request.num_tokens - num_computed
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.block_manager.allocate(request, num_new, hit_blocks) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_computed
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_computed
            request.set_status(RequestStatus.RUNNING)
            self.running.append(request)
            scheduled.append(ScheduledRequest.of(request, num_new))
            budget -= num_new
        return budget

    # ----------------------------------------------------------------------------- update
    def update(self, output: SchedulerOutput, sampled: dict[str, SampledToken]) -> list[RequestOutput]:
        """Advance every scheduled request; append the tokens sampled for those that finished a pass."""
        results: list[RequestOutput] = []
        self.stats.last_batch_size = len(output.scheduled)
        self.stats.last_num_batched_tokens = output.num_batched_tokens
        for item in output.scheduled:
            request = item.request
            if request.is_finished:  # aborted while its step ran
                continue
            request.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_blocks(request)
            if not item.samples:
                continue
            token = sampled[request.request_id]
            if request.num_output_tokens == 0:
                self.stats.num_prompt_tokens += request.num_prompt_tokens
            self.stats.num_generation_tokens += 1
            request.append_token(token.token_id, token.logprobs)
            finished_status = request.check_stop(self.max_model_len)
            if finished_status is not None:
                self.finish(request, finished_status)
            results.append(
                RequestOutput(
                    request,
                    (token.token_id,),
                    (token.logprobs,) if token.logprobs else (),
                    finished=finished_status is not None,
                )
            )
        return results

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request and free its blocks; a `keep_kv` request goes to SENDING_KV holding them."""
        if request in self.running:
            self.running.remove(request)
        if request.keep_kv and status is not RequestStatus.FINISHED_ABORTED:
            request.stop_status = status
            request.set_status(RequestStatus.SENDING_KV)
            return
        request.set_status(status)
        self.block_manager.free(request)
        reason = request.finish_reason or status.value
        self.stats.finished_by_reason[reason] = self.stats.finished_by_reason.get(reason, 0) + 1

    def requests(self) -> Iterable[Request]:
        yield from self.running
        yield from self.waiting
