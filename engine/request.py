"""The one `Request` object that flows through scheduler, block manager, runner and roles.

Lifecycle (a status changes only through `Request.set_status`, which checks the edge):

    WAITING ──schedule──▶ RUNNING ──(stop, length, abort)──▶ FINISHED_*
       ▲                     │
       └────preempt──────────┘          (blocks freed, recomputed from prompt + output)

    prefill role:  RUNNING ──first token──▶ SENDING_KV ──sent──▶ FINISHED_*
    decode role:   WAITING_FOR_KV ──KV received──▶ RUNNING

`num_computed_tokens` chases `num_tokens` (prompt + output): a step schedules
`num_tokens - num_computed_tokens` tokens (or a chunk of them); when they are all computed the
request samples its next token. There are no separate prefill and decode phases in the scheduler.
This module is torch-free.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.multimodal import MultiModalItem
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    SENDING_KV = "sending_kv"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    }
)

# Allowed status edges; anything else is a broken invariant.
_EDGES: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.WAITING: frozenset({RequestStatus.RUNNING, RequestStatus.WAITING_FOR_KV} | _FINISHED),
    RequestStatus.WAITING_FOR_KV: frozenset({RequestStatus.RUNNING, RequestStatus.WAITING} | _FINISHED),
    RequestStatus.RUNNING: frozenset({RequestStatus.WAITING, RequestStatus.SENDING_KV} | _FINISHED),
    RequestStatus.SENDING_KV: _FINISHED,
}

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of a generated token and the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    # Extra content that the prefix-cache hash of every block must include.
    cache_salt: str = ""
    # The prompt's images, in prompt order (ERNIE-4.5-VL); their content hashes enter the hashes
    # of the blocks their placeholders overlap. A decode worker gets them without `data`.
    mm_items: tuple[MultiModalItem, ...] = ()
    # A prefill role sets this: on its last token the request moves to SENDING_KV and keeps its
    # blocks until the role has sent them and frees them itself.
    keep_kv: bool = False

    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    stop_status: RequestStatus | None = None  # why a SENDING_KV request stopped generating
    # KV allocation state, maintained by the block manager only.
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def set_status(self, status: RequestStatus) -> None:
        if status is self.status:
            return
        if status not in _EDGES.get(self.status, frozenset()):
            raise RuntimeError(f"request {self.request_id}: illegal status change {self.status.name} -> {status.name}")
        self.status = status

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last appended token implies, or None to keep going."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
