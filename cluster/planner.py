"""The role planner: flips one worker at a time between prefill and decode as the load shifts.

Every `window_s` it reads the registry's load reports and classifies the window:

    prefill pressure   queued prefill tokens per prefill worker, or the oldest waiting prompt
                       against the TTFT SLO
    decode pressure    running + waiting sequences per decode worker, or KV usage, or the
                       inter-token latency against its SLO

A flip needs the same imbalance for `sustain_windows` windows in a row, no flip in the last
`cooldown_s`, and leaves at least one worker in each role. It picks the least-loaded worker of the
relieved role and asks it to switch (`SetRole`, epoch-fenced, drains first). Every decision is
logged with its reason and counted (`Planner.decisions`).

`decide()` is pure (records in, decision out) so the policy is unit-tested without processes;
`run()` applies it. `set_role()` is the operator's forced flip (`pdserve role set`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from cluster.registry import Registry, RegistryUnavailable
from protos.pdserve.v1 import common_pb2, registry_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

PREFILL, DECODE = common_pb2.WORKER_ROLE_PREFILL, common_pb2.WORKER_ROLE_DECODE
ROLE_IDS = {"prefill": PREFILL, "decode": DECODE, "mixed": common_pb2.WORKER_ROLE_MIXED}
ROLE_NAMES = {value: name for name, value in ROLE_IDS.items()}


@dataclass(frozen=True)
class PlannerConfig:
    window_s: float = 1.0
    sustain_windows: int = 3
    cooldown_s: float = 10.0
    # Prefill is overloaded above this many queued prompt tokens per prefill worker ...
    prefill_queue_tokens_high: int = 4096
    # ... or when a prompt has waited longer than this fraction of the TTFT SLO.
    ttft_slo_s: float = 1.0
    ttft_wait_fraction: float = 0.5
    # Decode is overloaded above this many sequences per decode worker, or this KV usage.
    decode_seqs_high: int = 48
    decode_kv_usage_high: float = 0.85
    itl_slo_s: float = 0.05
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.sustain_windows < 1 or self.cooldown_s < 0:
            raise ValueError("window_s must be > 0, sustain_windows >= 1 and cooldown_s >= 0")


@dataclass(frozen=True)
class Decision:
    worker_id: str
    address: str
    from_role: int
    to_role: int
    reason: str
    expected_epoch: int


@dataclass
class Planner:
    config: PlannerConfig = field(default_factory=PlannerConfig)
    streak: tuple[str, int] = ("balanced", 0)  # (pressure kind, windows in a row)
    last_flip_at: float = float("-inf")
    decisions: Counter = field(default_factory=Counter)  # (from, to, result) -> count

    # ----------------------------------------------------------------------------- policy
    def pressure(self, records: list[registry_pb2.WorkerRecord]) -> tuple[str, str]:
        """('prefill' | 'decode' | 'balanced', why) for one window's reports."""
        c = self.config
        ready = [r for r in records if r.info.state == common_pb2.WORKER_STATE_READY]
        prefill = [r.load for r in ready if r.info.role == PREFILL]
        decode = [r.load for r in ready if r.info.role == DECODE]
        if not prefill or not decode:
            return "balanced", "needs at least one prefill and one decode worker"
        queued = sum(p.num_queued_prefill_tokens for p in prefill) / len(prefill)
        oldest = max(p.oldest_waiting_seconds for p in prefill)
        seqs = sum(d.num_running_requests + d.num_waiting_requests for d in decode) / len(decode)
        usage = max(d.num_kv_blocks_used / d.num_kv_blocks_total if d.num_kv_blocks_total else 0.0 for d in decode)
        itl = max(d.avg_itl_seconds for d in decode)
        prefill_hot = queued > c.prefill_queue_tokens_high or oldest > c.ttft_slo_s * c.ttft_wait_fraction
        decode_hot = seqs > c.decode_seqs_high or usage > c.decode_kv_usage_high or itl > c.itl_slo_s
        facts = f"queued prefill tokens/worker {queued:.0f}, oldest wait {oldest:.2f} s, "
        facts += f"decode seqs/worker {seqs:.1f}, KV usage {usage:.2f}, ITL {itl * 1000:.1f} ms"
        if prefill_hot and not decode_hot:
            return "prefill", facts
        if decode_hot and not prefill_hot:
            return "decode", facts
        return "balanced", facts

    def decide(self, records: list[registry_pb2.WorkerRecord], now: float) -> Decision | None:
        """Feed one window; returns the flip to make, if the policy calls for one now."""
        kind, why = self.pressure(records)
        previous, count = self.streak
        self.streak = (kind, count + 1 if kind == previous else 1)
        if kind == "balanced" or self.streak[1] < self.config.sustain_windows:
            return None
        if now - self.last_flip_at < self.config.cooldown_s:
            return None
        if any(r.info.state != common_pb2.WORKER_STATE_READY for r in records):
            return None  # one flip at a time: someone is still draining
        donor_role, target_role = (DECODE, PREFILL) if kind == "prefill" else (PREFILL, DECODE)
        donors = [r for r in records if r.info.role == donor_role]
        if len(donors) < 2:
            return None  # keep at least one worker per role
        donor = min(donors, key=_busyness)
        return Decision(
            worker_id=donor.info.worker_id,
            address=f"{donor.info.host}:{donor.info.grpc_port}",
            from_role=donor_role,
            to_role=target_role,
            reason=f"{kind} pressure for {self.streak[1]} windows ({why})",
            expected_epoch=donor.info.role_epoch,
        )

    # ----------------------------------------------------------------------------- applying
    async def apply(self, decision: Decision, now: float) -> worker_pb2.SetRoleResponse | None:
        self.last_flip_at = now
        self.streak = ("balanced", 0)
        log.info(
            "planner: flip %s %s -> %s: %s",
            decision.worker_id,
            ROLE_NAMES[decision.from_role],
            ROLE_NAMES[decision.to_role],
            decision.reason,
        )
        response = await call_set_role(
            decision.address, decision.to_role, decision.expected_epoch, self.config.drain_timeout_s, decision.reason
        )
        result = worker_pb2.SetRoleResult.Name(response.result) if response else "UNREACHABLE"
        self.decisions[(ROLE_NAMES[decision.from_role], ROLE_NAMES[decision.to_role], result)] += 1
        log.info("planner: flip of %s finished: %s", decision.worker_id, result)
        return response

    async def run(self, registry: Registry) -> None:
        """Plan until cancelled; a registry outage skips windows."""
        while True:
            await asyncio.sleep(self.config.window_s)
            try:
                records = await registry.list_workers()
            except RegistryUnavailable:
                continue
            decision = self.decide(records, time.monotonic())
            if decision is not None:
                await self.apply(decision, time.monotonic())


def _busyness(record: registry_pb2.WorkerRecord) -> tuple[int, int]:
    load = record.load
    return (load.num_running_requests + load.num_waiting_requests, load.num_queued_prefill_tokens)


async def call_set_role(
    address: str, role: int, expected_epoch: int, drain_timeout_s: float, reason: str
) -> worker_pb2.SetRoleResponse | None:
    request = worker_pb2.SetRoleRequest(
        target_role=role, expected_role_epoch=expected_epoch, drain_timeout_seconds=drain_timeout_s, reason=reason
    )
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            return await worker_pb2_grpc.WorkerStub(channel).SetRole(request, timeout=drain_timeout_s + 15.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("SetRole on %s failed: %s %s", address, exc.code().name, exc.details())
            return None


async def set_role(registry: Registry, worker_id: str, role: str, drain_timeout_s: float = 30.0):
    """The operator's forced flip: find `worker_id` in the registry and switch it to `role`."""
    if role not in ROLE_IDS:
        raise ValueError(f"role must be one of {', '.join(ROLE_IDS)}, got {role!r}")
    records = {r.info.worker_id: r for r in await registry.list_workers()}
    if worker_id not in records:
        known = ", ".join(sorted(records)) or "none"
        raise ValueError(f"worker {worker_id!r} is not in the registry (known: {known})")
    info = records[worker_id].info
    response = await call_set_role(
        f"{info.host}:{info.grpc_port}", ROLE_IDS[role], info.role_epoch, drain_timeout_s, "operator request"
    )
    if response is None:
        raise RuntimeError(f"worker {worker_id} at {info.host}:{info.grpc_port} did not answer SetRole")
    return response
