"""Expert parallelism: one worker's routed experts sharded over the ranks of a process group.

This is the only engine module that touches torch.distributed. A worker spanning N GPUs runs N
processes, one per GPU, that hold one model between them:

    rank 0          LLMEngine: scheduler, sampler, roles, KV transport, metrics
                      │ each step: header + StepInputs (ModelRunner.execute ─▶ receive_step)
                      ▼
    ranks 1..N-1    follower_loop(engine.runner): the same forward pass, nothing else

    on every rank   embeddings, attention, dense MLPs: replicated (same weights, same tokens)
                    MoE layer: route every token (the router is replicated), run the experts
                    this rank owns, [rank * E/N, (rank + 1) * E/N), all-reduce the partial sums

How a worker with N ranks starts (the worker process itself lives in cluster/):

    1. `config = engine.loader.load_config(source)`; the launcher picks a free port for the
       group's TCPStore and starts N processes, passing each `Rendezvous(host, port, rank, N,
       backend)` (NCCL on GPU, gloo on CPU);
    2. every rank: `ep = ExpertParallel.connect(rendezvous, num_experts=config.moe_num_experts,
       device=f"cuda:{local_rank}")`. A size that does not divide the experts fails here, before
       any connection, identically on every rank;
    3. every rank: `engine = LLMEngine.from_model(source, device=..., expert_parallel=ep)`. This
       is collective: each rank loads only its experts, and the ranks agree on one KV pool size;
    4. rank 0 hosts the roles over `engine` exactly as a one-GPU worker does; ranks 1..N-1 call
       `follower_loop(engine.runner)`, which returns once rank 0 calls
       `engine.runner.stop_followers()` (at shutdown).

    A rank that dies leaves the others blocked in a collective until the group's timeout
    (`Rendezvous.timeout_s`); the worker's supervisor then tears the whole worker down. An EP
    group is not repaired in place: it is restarted with its worker.

The group is a c10d backend built directly over a `PrefixStore` (`pdserve/<name>/`), never the
default process group: it shares no group, communicator or stream with the KV transport's pairwise
groups, and two groups can live in one process.

Dispatch / combine strategies (`ExpertParallel.mode`; `attach` installs one as every MoE layer's
`SparseMoE.combine`):

    replicated  Every rank holds the same tokens (what the engine does). Each rank computes its
                experts' partial sums for all tokens; rank 0 adds the shared experts to its part;
                one all-reduce sums them. Logits come out identical on every rank.
    allgather   Data-parallel attention: each rank holds its own tokens (counts may differ, zero
                included). All-gather the tokens (padded to the largest count, counts exchanged
                first), each rank computes its experts' partial sums for every gathered token,
                reduce-scatter hands each rank the sums for its own tokens; shared experts local.
    alltoall    Data-parallel attention, sending each token only where it is needed: route
                locally, send each token once to every rank that owns one of its top-k experts
                (with its top-k ids and weights; split sizes exchanged first), that rank runs the
                token through its experts and weights the outputs (the experts kernel's epilogue),
                one row per (token, rank) comes back and is summed locally; shared experts local.
                Per (token, rank) rather than per (token, expert): a token that picks two experts
                of one rank crosses the wire once each way, not twice.

The engine's scheduler runs one batch for the whole worker, so serving uses `replicated`, whose
forward pass has no host synchronisation (an all-reduce per MoE layer: CUDA-graph capturable).
`allgather` and `alltoall` are what data-parallel attention needs (tested at the model level);
they host-synchronise on the exchanged counts, so they cannot run under a CUDA graph.

Supported group sizes: those that divide the model's routed-expert count evenly (every rank holds
the same number of experts). For the 64 experts of ERNIE-4.5-21B-A3B and -VL-28B-A3B: 1, 2, 4, 8,
16, 32 and 64. Any other size raises ValueError naming the supported ones. An EP group spans one
host (a gloo group binds to the store's host name). With NCCL, the thread that runs the
collectives must have the rank's GPU current (`connect` sets it for the calling thread).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from engine.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM, MoECombine, SparseMoE

EP_MODES = ("replicated", "allgather", "alltoall")
BACKENDS = ("gloo", "nccl")


def supported_ep_sizes(num_experts: int) -> tuple[int, ...]:
    """The expert-parallel sizes that split `num_experts` evenly (64 -> 1, 2, 4, 8, 16, 32, 64)."""
    return tuple(size for size in range(1, num_experts + 1) if num_experts % size == 0)


def expert_range_for(num_experts: int, ep_size: int, rank: int) -> tuple[int, int]:
    """The experts `[start, end)` rank `rank` of an `ep_size`-rank group owns (contiguous, equal).

    Raises ValueError, naming the supported sizes, when `ep_size` does not divide `num_experts`.
    """
    if num_experts <= 0:
        raise ValueError(f"expert parallelism needs routed experts; the model has {num_experts}")
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert-parallel size must be a positive integer, got {ep_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < ep_size:
        raise ValueError(f"rank {rank!r} is outside the expert-parallel group of size {ep_size}")
    if num_experts % ep_size != 0:
        sizes = ", ".join(map(str, supported_ep_sizes(num_experts)))
        raise ValueError(
            f"expert-parallel size {ep_size} does not divide the model's {num_experts} experts evenly; "
            f"supported sizes for {num_experts} experts: {sizes}"
        )
    per_rank = num_experts // ep_size
    return rank * per_rank, (rank + 1) * per_rank


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one expert-parallel group meet: a `TCPStore` at `host:port`.

    `store_rank` hosts the store (its port must be free); None means it already runs elsewhere
    (e.g. in the launcher) and every rank connects as a client. `timeout_s` bounds connecting and
    every collective. `name` namespaces the group's keys, so several groups may share a store.
    """

    host: str
    port: int
    rank: int
    size: int
    backend: str = "gloo"
    store_rank: int | None = 0
    timeout_s: float = 120.0
    name: str = "ep"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"Rendezvous.size must be a positive integer, got {self.size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.size:
            raise ValueError(f"Rendezvous.rank {self.rank!r} is outside [0, {self.size})")
        if self.backend not in BACKENDS:
            raise ValueError(f"Rendezvous.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"Rendezvous.port must be in [1, 65535], got {self.port!r}")
        if self.store_rank is not None and not 0 <= self.store_rank < self.size:
            raise ValueError(f"Rendezvous.store_rank {self.store_rank!r} is outside [0, {self.size})")
        if not self.timeout_s > 0:
            raise ValueError(f"Rendezvous.timeout_s must be > 0, got {self.timeout_s!r}")


@dataclass(frozen=True)
class ExpertParallel:
    """One rank's view of an expert-parallel group: who it is, which experts it owns, how to talk.

    Build it with `connect`. Collectives block the calling thread (gloo) or order the current
    CUDA stream after the communication (NCCL); every rank must issue the same collectives in the
    same order. Not thread-safe: one thread (the engine's step thread) drives it.
    """

    group: Any = field(repr=False, compare=False)  # a c10d ProcessGroupGloo / ProcessGroupNCCL
    rank: int
    size: int
    num_experts: int
    device: torch.device
    mode: str = "replicated"
    store: Any = field(default=None, repr=False, compare=False)  # kept alive: NCCL connects lazily through it

    def __post_init__(self) -> None:
        if self.mode not in EP_MODES:
            raise ValueError(f"expert-parallel mode must be one of {EP_MODES}, got {self.mode!r}")
        expert_range_for(self.num_experts, self.size, self.rank)

    # ------------------------------------------------------------------ set-up
    @classmethod
    def connect(
        cls, rendezvous: Rendezvous, *, num_experts: int, device: str | torch.device = "cpu", mode: str = "replicated"
    ) -> ExpertParallel:
        """Join the group (blocks until every rank has joined, at most `rendezvous.timeout_s`).

        Checks first, before any connection: the size divides `num_experts`, the device suits the
        backend (gloo: cpu, nccl: cuda:N; NCCL also makes cuda:N this thread's current device).
        Then checks that every rank was given the same experts count, size and mode.
        """
        expert_range_for(num_experts, rendezvous.size, rendezvous.rank)
        if mode not in EP_MODES:
            raise ValueError(f"expert-parallel mode must be one of {EP_MODES}, got {mode!r}")
        device = _check_device(rendezvous.backend, torch.device(device))
        timeout = datetime.timedelta(seconds=rendezvous.timeout_s)
        store = dist.TCPStore(
            rendezvous.host,
            rendezvous.port,
            None,
            rendezvous.rank == rendezvous.store_rank,
            timeout,
            wait_for_workers=False,
        )
        group = _new_group(dist.PrefixStore(f"pdserve/{rendezvous.name}/", store), rendezvous)
        ep = cls(group, rendezvous.rank, rendezvous.size, num_experts, device, mode, store)
        ep._check_agreement()
        return ep

    def with_mode(self, mode: str) -> ExpertParallel:
        """The same group and rank with another dispatch/combine strategy."""
        return replace(self, mode=mode)

    def attach(self, model: Ernie4_5_MoeForCausalLM) -> None:
        """Make every MoE layer of `model` combine over this group with `self.mode`.

        Raises ValueError when the model does not hold exactly this rank's experts.
        """
        if model.config.moe_num_experts != self.num_experts:
            raise ValueError(
                f"the model has {model.config.moe_num_experts} experts but the expert-parallel group "
                f"was set up for {self.num_experts}"
            )
        if tuple(model.expert_range) != self.expert_range:
            raise ValueError(
                f"the model holds experts {tuple(model.expert_range)} but rank {self.rank} of {self.size} "
                f"owns {self.expert_range}; load it with expert_range=ep.expert_range"
            )
        model.set_moe_combine(self.make_combine())

    def make_combine(self) -> MoECombine:
        """This group's `self.mode` strategy, for one `SparseMoE.combine` (attach sets every layer's)."""
        return _COMBINES[self.mode](self)

    def join_engine(self, model: Ernie4_5_MoeForCausalLM, num_kv_blocks: int) -> int:
        """Every rank's engine calls this once (a collective): attaches `model` in `replicated`
        mode (the engine runs one batch on every rank) and returns the KV pool size all ranks
        use, the smallest any rank can hold (followers must hold every block id rank 0 hands out).
        """
        if self.mode != "replicated":
            raise ValueError(
                f"the engine runs every rank on the same batch, which needs mode 'replicated', not {self.mode!r}"
            )
        self.attach(model)
        return min(self.all_gather_ints(num_kv_blocks))

    def _check_agreement(self) -> None:
        mine = [self.num_experts, self.size, EP_MODES.index(self.mode)]
        everyone = self.all_gather(torch.tensor(mine, dtype=torch.long, device=self.device)).view(self.size, -1)
        rows = everyone.tolist()
        if any(row != mine for row in rows):
            listing = "; ".join(
                f"rank {r}: experts={e} size={s} mode={EP_MODES[m]}" for r, (e, s, m) in enumerate(rows)
            )
            raise ValueError(f"expert-parallel ranks were configured differently: {listing}")

    # ------------------------------------------------------------------ facts
    @property
    def expert_range(self) -> tuple[int, int]:
        return expert_range_for(self.num_experts, self.size, self.rank)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.size

    @property
    def is_leader(self) -> bool:
        """Rank 0: the rank that schedules, samples and broadcasts each step."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        self.group.allreduce([tensor]).wait()
        return tensor

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Overwrite `tensor` with rank 0's, in place; returns it."""
        self.group.broadcast([tensor]).wait()  # the default options: root rank 0
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        """[n, ...] from every rank -> [size * n, ...], rank r's rows at [r * n, (r + 1) * n)."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.size * tensor.shape[0], *tensor.shape[1:]))
        self.group._allgather_base(out, tensor).wait()
        return out

    def reduce_scatter(self, tensor: Tensor) -> Tensor:
        """[size * n, ...] summed over ranks; rank r keeps rows [r * n, (r + 1) * n) -> [n, ...]."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((tensor.shape[0] // self.size, *tensor.shape[1:]))
        self.group._reduce_scatter_base(out, tensor).wait()
        return out

    def all_to_all(self, tensor: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        """Rows [sum(send_counts[:r]), +send_counts[r]) go to rank r; returns the received rows,
        rank 0's first, `sum(recv_counts)` of them."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
        self.group.alltoall_base(out, tensor, recv_counts, send_counts).wait()
        return out

    def exchange_counts(self, send_counts: Tensor) -> list[int]:
        """`send_counts[r]` = rows this rank sends to rank r -> rows it receives from each rank."""
        ones = [1] * self.size
        return self.all_to_all(send_counts.to(device=self.device, dtype=torch.long), ones, ones).tolist()

    def all_gather_ints(self, value: int) -> list[int]:
        """One int from every rank, in rank order (a host synchronisation)."""
        return self.all_gather(torch.tensor([value], dtype=torch.long, device=self.device)).tolist()


def _check_device(backend: str, device: torch.device) -> torch.device:
    if backend == "gloo" and device.type != "cpu":
        raise ValueError(f"the gloo backend carries CPU tensors; device {str(device)!r} needs 'nccl'")
    if backend == "nccl":
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"the nccl backend needs a device 'cuda:N', got {str(device)!r}")
        torch.cuda.set_device(device)
    return device


def _new_group(store: dist.Store, rendezvous: Rendezvous) -> Any:
    timeout = datetime.timedelta(seconds=rendezvous.timeout_s)
    if rendezvous.backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=rendezvous.host)]
        return dist.ProcessGroupGloo(store, rendezvous.rank, rendezvous.size, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rendezvous.rank, rendezvous.size, options)


# ---------------------------------------------------------------------------------------------
# Dispatch / combine strategies: each is `SparseMoE.combine`, (moe, x [T, H]) -> the layer's output
# ---------------------------------------------------------------------------------------------


class ReplicatedCombine:
    """Every rank holds the same tokens: local experts' partial sums, all-reduced; shared once."""

    def __init__(self, ep: ExpertParallel) -> None:
        self.ep = ep

    def __call__(self, moe: SparseMoE, x: Tensor) -> Tensor:
        out = moe.routed(x)
        if self.ep.is_leader and moe.shared_experts is not None:
            out = out + moe.shared_experts(x)  # added on one rank only: the all-reduce spreads it
        return self.ep.all_reduce(out)


class AllGatherCombine:
    """Each rank holds its own tokens: gather all, compute local experts, reduce-scatter back.

    rank 0 tokens a a a .      all-gather      a a a . b b . .      (padded to the largest count)
    rank 1 tokens b b . .   ──────────────▶    same on every rank; routed partial sums of the
                                               valid rows; reduce-scatter: rank r gets its rows
    """

    def __init__(self, ep: ExpertParallel) -> None:
        self.ep = ep

    def __call__(self, moe: SparseMoE, x: Tensor) -> Tensor:
        num_tokens = x.shape[0]
        counts = self.ep.all_gather_ints(num_tokens)
        most = max(counts)
        if most == 0:  # every rank agrees: nothing to do anywhere
            return torch.zeros_like(x)
        padded = x if num_tokens == most else torch.cat([x, x.new_zeros(most - num_tokens, x.shape[1])])
        gathered = self.ep.all_gather(padded)  # [size * most, H]
        if all(count == most for count in counts):
            partial = moe.routed(gathered)
        else:  # route and compute only the real rows; padding rows stay zero
            rows = torch.cat([torch.arange(r * most, r * most + c, device=x.device) for r, c in enumerate(counts)])
            partial = torch.zeros_like(gathered).index_copy_(0, rows, moe.routed(gathered[rows]))
        out = self.ep.reduce_scatter(partial)[:num_tokens]
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(x)
        return out


class AllToAllCombine:
    """Each rank holds its own tokens; each token travels only to the ranks owning its experts.

    route locally ─▶ needs[t, r] = token t picked an expert of rank r
    send x[t] (+ its top-k ids and weights) to every r with needs[t, r], rank order then token order
    rank r: experts_fn over what it received (ids of other ranks add nothing) ─▶ weighted partial sums
    send the partial sums back the same way ─▶ index_add into out[t]
    """

    def __init__(self, ep: ExpertParallel) -> None:
        self.ep = ep

    def __call__(self, moe: SparseMoE, x: Tensor) -> Tensor:
        ep = self.ep
        topk_weights, topk_ids = moe.route(x)  # [T, k]
        top_k = topk_ids.shape[1]
        owners = topk_ids // ep.experts_per_rank
        needs = torch.zeros(x.shape[0], ep.size, dtype=torch.bool, device=x.device).scatter_(1, owners, True)
        _, tokens = needs.t().nonzero(as_tuple=True)  # ordered by destination rank, then token
        send_counts = needs.sum(dim=0)
        recv_counts = ep.exchange_counts(send_counts)
        send_counts = send_counts.tolist()
        # ids ride as fp32 (exact below 2**24) beside the weights: one message for both
        routing = torch.cat([topk_ids.float(), topk_weights.float()], dim=1)[tokens]
        recv_x = ep.all_to_all(x[tokens], send_counts, recv_counts)
        recv_routing = ep.all_to_all(routing, send_counts, recv_counts)
        if recv_x.shape[0] > 0:
            recv_ids = recv_routing[:, :top_k].long()
            recv_weights = recv_routing[:, top_k:].to(x.dtype)
            partial = moe.experts(recv_x, recv_weights, recv_ids)
        else:
            partial = recv_x
        back = ep.all_to_all(partial, recv_counts, send_counts)  # [len(tokens), H], in send order
        out = torch.zeros_like(x).index_add_(0, tokens, back)
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(x)
        return out


_COMBINES: dict[str, type[ReplicatedCombine | AllGatherCombine | AllToAllCombine]] = {
    "replicated": ReplicatedCombine,
    "allgather": AllGatherCombine,
    "alltoall": AllToAllCombine,
}
