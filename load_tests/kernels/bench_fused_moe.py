"""Benchmark and tuner of the fused MoE kernels at the ERNIE-4.5 shapes (a script, not a test).

    python -m load_tests.kernels.bench_fused_moe [--tune] [--out benchmarks/results]
        [--config-out engine/kernels/configs] [--tokens 1,2,4,...] [--shapes text,vision]

For the routed experts of one MoE layer -- text (H 2560, 64 experts, top-6, I 1536) and the VL
vision experts (I 512) -- and T = 1, 2, 4, ..., 16384 bf16 tokens with uniformly random routing,
it reports:
  * the median time (CUDA events, L2 flushed by a 256 MB read before every run), and for small T
    the time per call of a replayed CUDA graph of 4 calls (how decode runs it);
  * TFLOP/s; GB/s of (touched experts' weights + activations in and out);
  * % of the copy bandwidth and of the bf16 matmul rate measured in the same run, and of the
    nominal H100 3.35 TB/s;
  * the alignment kernel alone;
  * baselines from the same run: `fused_moe_ref` and `torch._grouped_mm` where it exists.
It writes `fused_moe_bench_<gpu>.json` and `.md` to --out.

--tune first searches launch configs per token count (each stage timed alone: the pairs plan's
GEMVs, and for each block_m the alignment, both grouped GEMMs and the combine), then times the
best plans as whole calls and keeps the fastest; it writes `fused_moe_<gpu>.json` for
`engine/kernels/configs/` into --config-out (and every candidate's timing into --out).
Candidates are compiled in parallel processes first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton

from engine.kernels.fused_moe import (
    FusedMoeConfig,
    device_config_name,
    fused_moe,
    get_config,
    grouped_down,
    grouped_gate_up,
    pairs_down_fused,
    pairs_down_rows,
    pairs_gate_up,
    shape_key,
    sum_topk,
)
from engine.kernels.fused_moe_ref import fused_moe_ref
from engine.kernels.moe_align import moe_align

NOMINAL_HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet
DEFAULT_TOKENS = [2**i for i in range(15)]  # 1 .. 16384
VISION_TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]  # image tokens come in prefill-sized batches
NUM_ROUTING_SETS = 4  # rotated between calls so that no run finds the previous run's experts in L2
GRAPH_MAX_TOKENS = 1024
PAIRS_MAX_TOKENS = 32
# Without a GPU the script runs through the Triton interpreter (TRITON_INTERPRET=1) in float32, on
# the `tiny` shape with --max-candidates: a smoke test of the script itself, not a measurement.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

# pairs plan GEMV tiles: (block_n, block_k, warps)
PAIRS_TILES = [
    (4, 256, 2),
    (4, 512, 4),
    (8, 128, 2),
    (8, 256, 2),
    (8, 256, 4),
    (8, 512, 4),
    (16, 128, 4),
    (16, 256, 4),
    (16, 512, 8),
    (32, 128, 4),
    (32, 256, 8),
    (2, 1024, 4),
    (4, 1024, 4),
    (4, 1024, 8),
    (8, 1024, 8),
]
# grouped GEMM tiles: (block_n, block_k, warps, stages), kept per block_m where they fit (see _fits)
GROUPED_TILES = [
    (32, 128, 4, 4),
    (64, 64, 4, 4),
    (64, 64, 4, 5),
    (64, 128, 4, 4),
    (64, 256, 4, 3),
    (128, 64, 4, 4),
    (128, 128, 4, 3),
    (64, 64, 8, 4),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 8, 5),
    (64, 128, 8, 3),
    (128, 128, 8, 3),
    (256, 64, 8, 3),
    (256, 64, 8, 4),
]
SMEM_LIMIT = 226 * 1024  # of the H100's 227 KB per block (Triton adds a few barriers)
GROUP_M_CHOICES = [1, 4, 8, 16, 32]
MAX_CANDIDATES: int | None = None  # --max-candidates


@dataclass(frozen=True)
class MoeShape:
    name: str
    hidden_size: int
    inter_size: int
    num_experts: int
    top_k: int

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.inter_size * DTYPE.itemsize


SHAPES = {
    "text": MoeShape("text", 2560, 1536, 64, 6),  # ERNIE-4.5-21B-A3B / VL text experts
    "vision": MoeShape("vision", 2560, 512, 64, 6),  # ERNIE-4.5-VL vision experts
    "tiny": MoeShape("tiny", 64, 32, 8, 2),  # smoke runs on CPU
}


# ----------------------------------------------------------------------------------------------
# problem and timing
# ----------------------------------------------------------------------------------------------


class Problem:
    """One shape's weights plus, per token count, NUM_ROUTING_SETS routings."""

    def __init__(self, shape: MoeShape, seed: int = 0) -> None:
        self.shape = shape
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        h, i, e = shape.hidden_size, shape.inter_size, shape.num_experts
        self.w13 = (torch.randn(e, 2 * i, h, device=DEVICE, generator=gen) / h**0.5).to(DTYPE)
        self.w2 = (torch.randn(e, h, i, device=DEVICE, generator=gen) / i**0.5).to(DTYPE)
        self.gen = gen

    def inputs(self, num_tokens: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        s = self.shape
        hidden = torch.randn(num_tokens, s.hidden_size, device=DEVICE, generator=self.gen).to(DTYPE)
        routings = []
        for _ in range(NUM_ROUTING_SETS):
            scores = torch.rand(num_tokens, s.num_experts, device=DEVICE, generator=self.gen)
            ids = scores.topk(s.top_k, dim=1).indices  # uniform random distinct experts, int64
            weights = torch.rand(num_tokens, s.top_k, device=DEVICE, generator=self.gen)
            routings.append(((weights / weights.sum(1, keepdim=True)).to(DTYPE), ids.contiguous()))
        return hidden, routings


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


_L2_FLUSH: list[torch.Tensor] = []


def flush_l2() -> None:
    """Evicts L2 by reading 256 MB. (do_bench's flush writes instead, which leaves ~50 MB of dirty
    lines that the timed kernel then pays to write back -- 10-20 µs on a 50 µs kernel.)"""
    if not _L2_FLUSH:
        _L2_FLUSH.append(torch.ones(64 << 20, dtype=torch.float32, device=DEVICE))
    _L2_FLUSH[0].amax()


def median_ms(fn: Callable[[], Any], warmup_ms: float = 5, rep_ms: float = 20) -> float:
    """Median device time of fn() (CUDA events around each call), L2 flushed before every call."""
    if DEVICE == "cuda":
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(min(200, max(1, int(warmup_ms / estimate_ms)))):
            fn()
        num_reps = min(500, max(5, int(rep_ms / estimate_ms)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_reps)]
        for i in range(num_reps):
            flush_l2()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))[num_reps // 2]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def rotating(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    state = {"i": 0}

    def run() -> Any:
        state["i"] = (state["i"] + 1) % len(calls)
        return calls[state["i"]]()

    return run


def graph_ms(calls: list[Callable[[], Any]]) -> float:
    """Median time of one call when all of `calls` run back to back from a captured CUDA graph."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = median_ms(graph.replay, rep_ms=30) / len(calls)
    del graph
    return ms


def measure_peaks() -> dict[str, float]:
    num_bytes = 2 << 30 if DEVICE == "cuda" else 64 << 20
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    copy_s = median_ms(lambda: dst.copy_(src), rep_ms=200) / 1e3
    n = 8192 if DEVICE == "cuda" else 512
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    mm_s = median_ms(lambda: a @ b, rep_ms=300) / 1e3
    if DEVICE == "cuda":  # also back to back, as matmul peaks are usually quoted
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            a @ b
        end.record()
        torch.cuda.synchronize()
        mm_s = min(mm_s, start.elapsed_time(end) / 50 / 1e3)
    return {
        "copy_bytes_per_s": 2 * num_bytes / copy_s,  # read + write
        "matmul_flop_per_s": 2 * n**3 / mm_s,
        "nominal_hbm_bytes_per_s": NOMINAL_HBM_BYTES_PER_S,
    }


def grouped_mm_moe(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Baseline: sort by expert with torch ops, two `torch._grouped_mm`, weighted index_add."""
    top_k, num_experts = topk_ids.shape[1], w13.shape[0]
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    offs = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0).to(torch.int32)
    x = hidden.index_select(0, token)
    gate, up = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    y = y * topk_weights.flatten()[order, None].to(y.dtype)
    return torch.zeros_like(hidden).index_add_(0, token, y)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# tuning
# ----------------------------------------------------------------------------------------------


def block_m_candidates(num_tokens: int, shape: MoeShape) -> list[int]:
    rows_per_expert = num_tokens * shape.top_k / shape.num_experts
    if rows_per_expert <= 4:
        return [16]
    if rows_per_expert <= 12:
        return [16, 32]
    if rows_per_expert <= 40:
        return [16, 32, 64]
    if rows_per_expert <= 100:
        return [32, 64, 128]
    return [64, 128]


def pairs_configs() -> list[FusedMoeConfig]:
    return [
        FusedMoeConfig(
            path="pairs", up_block_n=n, up_block_k=k, up_warps=w, down_block_n=n, down_block_k=k, down_warps=w
        )
        for n, k, w in PAIRS_TILES
    ][:MAX_CANDIDATES]


def _fits(block_m: int, tile: tuple[int, int, int, int], down: bool) -> bool:
    """Shared memory of the pipeline, and fp32 accumulators per thread (gate/up keeps two)."""
    block_n, block_k, warps, stages = tile
    num_b_tiles = 1 if down else 2
    smem = stages * (block_m * block_k + num_b_tiles * block_n * block_k) * 2  # bf16 / fp16
    acc_regs = num_b_tiles * block_m * block_n // (32 * warps)
    small_m = block_m <= 32
    return (
        smem <= SMEM_LIMIT
        and acc_regs <= 128
        and (warps == 4 if small_m else warps == 8 or block_m == 64)
        and (block_n <= 128 or not small_m)
    )


def grouped_configs(block_m: int, *, down: bool) -> list[FusedMoeConfig]:
    tiles = [t for t in GROUPED_TILES if _fits(block_m, t, down)]
    return [
        FusedMoeConfig(
            path="grouped",
            block_m=block_m,
            up_block_n=n,
            up_block_k=k,
            up_warps=w,
            up_stages=s,
            down_block_n=n,
            down_block_k=k,
            down_warps=w,
            down_stages=s,
            tma=tma,
        )
        for tma in (False, True)
        for n, k, w, s in tiles
    ][:MAX_CANDIDATES]


def up_part(cfg: FusedMoeConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k.startswith("up_")}


def combined(path: str, up: FusedMoeConfig, down: FusedMoeConfig, **extra: Any) -> FusedMoeConfig:
    """One config from the best gate/up and the best down candidates. `tma` is one switch for both
    GEMMs: keep it if either wanted it; the whole-call comparison also sees the plan without it."""
    return FusedMoeConfig(path=path, **up_part(up), **down_part(down), tma=up.tma or down.tma, **extra)


def down_part(cfg: FusedMoeConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k.startswith("down_")}


class StageRunner:
    """Buffers for one (shape, T) problem and a timing function per stage of fused_moe."""

    def __init__(self, problem: Problem, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
        self.p, self.hidden, self.weights, self.ids = problem, hidden, weights, ids
        s = problem.shape
        self.num_tokens = hidden.shape[0]
        self.num_pairs = ids.numel()
        self.device = hidden.device
        self.act_pairs = torch.empty(self.num_pairs, s.inter_size, device=self.device, dtype=DTYPE)
        self.pair_out = torch.empty(self.num_pairs, s.hidden_size, device=self.device, dtype=DTYPE)
        self.out = torch.empty_like(hidden)
        self.aligns: dict[int, Any] = {}
        self.act_rows: dict[int, torch.Tensor] = {}

    def align(self, block_m: int):
        if block_m not in self.aligns:
            s = self.p.shape
            self.aligns[block_m] = moe_align(self.ids, s.num_experts, block_m)
            rows = self.aligns[block_m].num_blocks * block_m
            self.act_rows[block_m] = torch.empty(rows, s.inter_size, device=self.device, dtype=DTYPE)
        return self.aligns[block_m]

    def run(self, stage: str, cfg: FusedMoeConfig) -> None:
        p, s = self.p, self.p.shape
        if stage == "pairs_up":
            pairs_gate_up(self.hidden, p.w13, self.ids, self.act_pairs, expert_offset=0, cfg=cfg)
        elif stage == "pairs_down_fused":
            pairs_down_fused(self.act_pairs, p.w2, self.ids, self.weights, self.out, expert_offset=0, cfg=cfg)
        elif stage == "pairs_down_rows":
            pairs_down_rows(self.act_pairs, p.w2, self.ids, self.weights, self.pair_out, expert_offset=0, cfg=cfg)
        elif stage == "sum":
            sum_topk(self.pair_out, self.ids, self.out, num_experts=s.num_experts, expert_offset=0)
        elif stage == "align":
            moe_align(self.ids, s.num_experts, cfg.block_m)
        elif stage == "grouped_up":
            align = self.align(cfg.block_m)
            grouped_gate_up(self.hidden, p.w13, align, self.act_rows[cfg.block_m], top_k=s.top_k, cfg=cfg)
        elif stage == "grouped_down":
            align = self.align(cfg.block_m)
            if cfg.combine == "atomic":
                acc = torch.zeros(self.num_tokens, s.hidden_size, device=self.device, dtype=torch.float32)
                grouped_down(self.act_rows[cfg.block_m], p.w2, align, self.weights, acc, top_k=s.top_k, cfg=cfg)
                self.out.copy_(acc)
            else:
                down_out = self.pair_out
                grouped_down(self.act_rows[cfg.block_m], p.w2, align, self.weights, down_out, top_k=s.top_k, cfg=cfg)
        else:
            raise ValueError(stage)

    def time(self, stage: str, cfg: FusedMoeConfig) -> float | None:
        try:
            self.run(stage, cfg)
            synchronize()
            return median_ms(lambda: self.run(stage, cfg), warmup_ms=2, rep_ms=10)
        except Exception as exc:  # out of resources, compile failure: skip the candidate
            print(f"    {stage} {cfg.to_dict()} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            return None


def _best(timings: list[tuple[float | None, FusedMoeConfig]]) -> tuple[float, FusedMoeConfig]:
    valid = [(t, c) for t, c in timings if t is not None]
    if not valid:
        raise RuntimeError("no candidate config ran")
    return min(valid, key=lambda tc: tc[0])


def tune_one(problem: Problem, num_tokens: int, log: list[dict[str, Any]]) -> tuple[FusedMoeConfig, float]:
    """Fastest plan for `num_tokens` tokens, by stage timings; returns (config, predicted ms)."""
    shape = problem.shape
    hidden, routings = problem.inputs(num_tokens)
    weights, ids = routings[0]
    runner = StageRunner(problem, hidden, weights, ids)
    plans: list[tuple[float, FusedMoeConfig]] = []

    def record(stage: str, cfg: FusedMoeConfig, ms: float | None) -> float | None:
        log.append({"shape": shape.name, "tokens": num_tokens, "stage": stage, "config": cfg.to_dict(), "ms": ms})
        return ms

    if num_tokens <= PAIRS_MAX_TOKENS:
        cands = pairs_configs()
        up_ms, up_cfg = _best([(record("pairs_up", c, runner.time("pairs_up", c)), c) for c in cands])
        runner.run("pairs_up", up_cfg)
        fused_ms, fused_cfg = _best(
            [(record("pairs_down_fused", c, runner.time("pairs_down_fused", c)), c) for c in cands]
        )
        rows_ms, rows_cfg = _best([(record("pairs_down_rows", c, runner.time("pairs_down_rows", c)), c) for c in cands])
        sum_ms = record("sum", cands[0], runner.time("sum", cands[0])) or math.inf
        if fused_ms <= rows_ms + sum_ms:
            down_ms, down_cfg, combine = fused_ms, fused_cfg, "fused"
        else:
            down_ms, down_cfg, combine = rows_ms + sum_ms, rows_cfg, "sum"
        cfg = combined("pairs", up_cfg, down_cfg, combine=combine)
        plans.append((up_ms + down_ms, cfg))

    for block_m in block_m_candidates(num_tokens, shape):
        if not grouped_configs(block_m, down=False):
            continue
        base = FusedMoeConfig(block_m=block_m)
        align_ms = record("align", base, runner.time("align", base)) or math.inf
        runner.align(block_m)
        up_ms, up_cfg = _best(
            [(record("grouped_up", c, runner.time("grouped_up", c)), c) for c in grouped_configs(block_m, down=False)]
        )
        up_ms, up_cfg = _best(
            [(up_ms, up_cfg)]
            + [
                (record("grouped_up", c, runner.time("grouped_up", c)), c)
                for c in (
                    replace(up_cfg, up_group_m=g) for g in GROUP_M_CHOICES[:MAX_CANDIDATES] if g != up_cfg.up_group_m
                )
            ]
        )
        runner.run("grouped_up", up_cfg)
        down_ms, down_cfg = _best(
            [
                (record("grouped_down", c, runner.time("grouped_down", c)), c)
                for c in grouped_configs(block_m, down=True)
            ]
        )
        down_ms, down_cfg = _best(
            [(down_ms, down_cfg)]
            + [
                (record("grouped_down", c, runner.time("grouped_down", c)), c)
                for c in (
                    replace(down_cfg, down_group_m=g)
                    for g in GROUP_M_CHOICES[:MAX_CANDIDATES]
                    if g != down_cfg.down_group_m
                )
            ]
        )
        sum_ms = record("sum", base, runner.time("sum", base)) or math.inf
        atomic_cfg = replace(down_cfg, combine="atomic")
        atomic_ms = record("grouped_down_atomic", atomic_cfg, runner.time("grouped_down", atomic_cfg)) or math.inf
        # atomics reorder fp32 adds run to run; take them only for a clear (> 3 %) win
        combine, combine_ms = (
            ("atomic", atomic_ms) if atomic_ms < 0.97 * (down_ms + sum_ms) else ("sum", down_ms + sum_ms)
        )
        cfg = combined("grouped", up_cfg, down_cfg, block_m=block_m, combine=combine)
        plans.append((align_ms + up_ms + combine_ms, cfg))
        if up_cfg.tma != down_cfg.tma:
            plans.append((align_ms + up_ms + combine_ms, replace(cfg, tma=False)))

    # Stage timings leave out launch gaps and the plans differ in launch count: time whole calls,
    # from a CUDA graph where decode would run them so (eager timings there measure the CPU).
    w13, w2 = problem.w13, problem.w2
    measured = []
    for predicted_ms, cfg in plans:
        calls = [lambda w=w, i=i, c=cfg: fused_moe(hidden, w13, w2, w, i, config=c) for w, i in routings]
        if num_tokens <= GRAPH_MAX_TOKENS and DEVICE == "cuda":
            ms = graph_ms(calls)
        else:
            ms = median_ms(rotating(calls), warmup_ms=2, rep_ms=10)
        measured.append((ms, cfg))
        log.append(
            {
                "shape": shape.name,
                "tokens": num_tokens,
                "stage": "plan",
                "config": cfg.to_dict(),
                "ms": ms,
                "sum_of_stages_ms": predicted_ms,
            }
        )
    ms, cfg = min(measured, key=lambda mc: mc[0])
    return cfg, ms


def _compile_jobs(shapes: list[MoeShape], tokens: list[int]) -> list[tuple[str, dict[str, Any]]]:
    jobs: list[tuple[str, dict[str, Any]]] = []
    for c in pairs_configs():
        jobs += [("pairs_up", c.to_dict()), ("pairs_down_fused", c.to_dict()), ("pairs_down_rows", c.to_dict())]
    block_ms = sorted({bm for s in shapes for t in tokens for bm in block_m_candidates(t, s)})
    for bm in block_ms:
        jobs += [("grouped_up", c.to_dict()) for c in grouped_configs(bm, down=False)]
        jobs += [("grouped_down", c.to_dict()) for c in grouped_configs(bm, down=True)]
        jobs += [("grouped_down", replace(c, combine="atomic").to_dict()) for c in grouped_configs(bm, down=True)]
    return jobs


def compile_worker(shape: MoeShape, jobs: list[tuple[str, dict[str, Any]]]) -> int:
    """Runs in a spawned process: compiles (by running once) each job's kernel into Triton's disk cache.

    The arguments have the real problem's strides and dtypes, so the cache keys match the timed runs.
    """
    torch.cuda.set_device(0)
    h, i, e, k = shape.hidden_size, shape.inter_size, shape.num_experts, shape.top_k
    problem = Problem.__new__(Problem)
    problem.shape = shape
    problem.w13 = torch.zeros(e, 2 * i, h, device=DEVICE, dtype=DTYPE)
    problem.w2 = torch.zeros(e, h, i, device=DEVICE, dtype=DTYPE)
    hidden = torch.zeros(64, h, device=DEVICE, dtype=DTYPE)
    ids = torch.randint(0, e, (64, k), device=DEVICE)
    weights = torch.ones(64, k, device=DEVICE, dtype=DTYPE)
    runner = StageRunner(problem, hidden, weights, ids)
    done = 0
    for stage, cfg in jobs:
        try:
            runner.run(stage, FusedMoeConfig.from_dict(cfg))
            done += 1
        except Exception as exc:
            print(f"compile {stage} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    torch.cuda.synchronize()
    return done


def precompile(shape: MoeShape, jobs: list[tuple[str, dict[str, Any]]], workers: int) -> None:
    start = time.time()
    chunks = [jobs[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        done = sum(f.result() for f in [pool.submit(compile_worker, shape, c) for c in chunks if c])
    print(f"precompiled {done}/{len(jobs)} kernels in {time.time() - start:.0f} s with {workers} processes", flush=True)


# ----------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------


def bench_one(
    problem: Problem, num_tokens: int, cfg: FusedMoeConfig, peaks: dict[str, float], with_baselines: bool
) -> dict[str, Any]:
    s = problem.shape
    hidden, routings = problem.inputs(num_tokens)
    w13, w2 = problem.w13, problem.w2
    calls = [lambda w=w, i=i: fused_moe(hidden, w13, w2, w, i, config=cfg) for w, i in routings]
    row: dict[str, Any] = {"tokens": num_tokens, "config": cfg.to_dict()}
    row["ms"] = median_ms(rotating(calls))
    if num_tokens <= GRAPH_MAX_TOKENS and DEVICE == "cuda":
        row["graph_ms"] = graph_ms(calls)
    block_m = cfg.block_m if cfg.path == "grouped" else 16
    row["align_block_m"] = block_m
    align_calls = [lambda i=i: moe_align(i, s.num_experts, block_m) for _, i in routings]
    # device time from a graph replay; eager, the launch of these few-µs kernels is CPU-bound
    row["align_ms"] = graph_ms(align_calls) if DEVICE == "cuda" else median_ms(rotating(align_calls))
    row["align_eager_ms"] = median_ms(rotating(align_calls))

    touched = sum(torch.unique(i).numel() for _, i in routings) / len(routings)
    num_bytes = touched * s.expert_bytes + 2 * num_tokens * s.hidden_size * DTYPE.itemsize
    flops = 6 * num_tokens * s.top_k * s.hidden_size * s.inter_size
    best_ms = min(row["ms"], row.get("graph_ms", math.inf))
    row.update(
        touched_experts=touched,
        bytes=num_bytes,
        flops=flops,
        tflops=flops / (best_ms * 1e-3) / 1e12,
        gbps=num_bytes / (best_ms * 1e-3) / 1e9,
        pct_hbm_measured=100 * num_bytes / (best_ms * 1e-3) / peaks["copy_bytes_per_s"],
        pct_hbm_nominal=100 * num_bytes / (best_ms * 1e-3) / peaks["nominal_hbm_bytes_per_s"],
        pct_tensor_peak=100 * flops / (best_ms * 1e-3) / peaks["matmul_flop_per_s"],
    )
    weights, ids = routings[0]
    out = fused_moe(hidden, w13, w2, weights, ids, config=cfg)
    ref32 = fused_moe_ref(hidden.float(), w13.float(), w2.float(), weights.float(), ids) if num_tokens <= 4096 else None
    if ref32 is not None:
        row["rel_err_vs_fp32_ref"] = rel_err(out, ref32)
        del ref32
    if with_baselines:
        row["ref_ms"] = median_ms(
            rotating([lambda w=w, i=i: fused_moe_ref(hidden, w13, w2, w, i) for w, i in routings]), warmup_ms=1
        )
        row["speedup_vs_ref"] = row["ref_ms"] / best_ms
        try:
            gm_out = grouped_mm_moe(hidden, w13, w2, weights, ids)
            row["grouped_mm_rel_err"] = rel_err(gm_out, out)
            row["grouped_mm_ms"] = median_ms(
                rotating([lambda w=w, i=i: grouped_mm_moe(hidden, w13, w2, w, i) for w, i in routings])
            )
            row["speedup_vs_grouped_mm"] = row["grouped_mm_ms"] / best_ms
        except Exception as exc:  # not in this torch build, or not for this GPU
            row["grouped_mm_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def markdown(report: dict[str, Any]) -> str:
    peaks = report["peaks"]
    lines = [
        f"# fused MoE on {report['device']} ({report['date']})",
        "",
        f"torch {report['torch']}, triton {report['triton']}, commit {report['git_commit']}. "
        f"Measured in this run: copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
        f"bf16 matmul {peaks['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s; nominal HBM 3.35 TB/s.",
        "Times are medians with L2 flushed (256 MB read) before each run; `graph` is the time per call of a "
        "replayed CUDA graph of 4 calls (how decode runs); `align` is the alignment alone, from a graph replay.",
        "",
    ]
    for name, rows in report["shapes"].items():
        s = SHAPES[name]
        lines += [
            f"## {name}: H={s.hidden_size}, I={s.inter_size}, E={s.num_experts}, top-{s.top_k}",
            "",
            "| T | plan | µs | graph µs | align µs | TFLOP/s | GB/s | % HBM (meas.) | % HBM (3.35) | % TC peak "
            "| ref µs | × ref | grouped_mm µs | × grouped_mm | rel err |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            c = r["config"]
            plan = f"pairs/{c['combine']}" if c["path"] == "pairs" else f"grouped M{c['block_m']}/{c['combine']}"

            def f(key: str, scale: float = 1.0, fmt: str = "{:.1f}", r: dict[str, Any] = r) -> str:
                return fmt.format(r[key] * scale) if key in r else "–"

            lines.append(
                f"| {r['tokens']} | {plan} | {f('ms', 1e3)} | {f('graph_ms', 1e3)} | {f('align_ms', 1e3)} "
                f"| {f('tflops')} | {f('gbps', fmt='{:.0f}')} | {f('pct_hbm_measured')} | {f('pct_hbm_nominal')} "
                f"| {f('pct_tensor_peak')} | {f('ref_ms', 1e3, '{:.0f}')} | {f('speedup_vs_ref', fmt='{:.1f}')} "
                f"| {f('grouped_mm_ms', 1e3, '{:.0f}')} | {f('speedup_vs_grouped_mm', fmt='{:.2f}')} "
                f"| {f('rel_err_vs_fp32_ref', fmt='{:.1e}')} |"
            )
        lines.append("")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def run_info(device: str, commit: str | None) -> dict[str, Any]:
    """The header of a benchmark report: what ran, where, when, from which commit."""
    return {
        "device": device,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_commit": commit or git_commit(),
        "argv": sys.argv[1:],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--config-out", type=Path, default=Path("engine/kernels/configs"))
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="text shape")
    parser.add_argument("--vision-tokens", default=",".join(map(str, VISION_TOKENS)))
    parser.add_argument("--shapes", default="text,vision")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop tuning new token counts after this")
    parser.add_argument("--git-commit", default=None)
    parser.add_argument("--max-candidates", type=int, default=None, help="per stage (smoke runs)")
    args = parser.parse_args(argv)
    global MAX_CANDIDATES
    MAX_CANDIDATES = args.max_candidates

    start = time.time()
    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    token_lists = {
        "text": [int(t) for t in args.tokens.split(",")],
        "vision": [int(t) for t in args.vision_tokens.split(",")],
        "tiny": [int(t) for t in args.tokens.split(",")],
    }
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-interpreter"
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {**run_info(device, args.git_commit), "shapes": {}}
    report["peaks"] = measure_peaks()
    print(f"{device}: peaks {report['peaks']}", flush=True)
    slug = device_config_name(device).removeprefix("fused_moe_").removesuffix(".json")

    tuned: dict[str, dict[int, FusedMoeConfig]] = {}
    if args.tune:
        all_tokens = sorted({t for s in shapes for t in token_lists[s.name]})
        if DEVICE == "cuda":
            precompile(shapes[0], _compile_jobs(shapes, all_tokens), args.compile_workers)
        log: list[dict[str, Any]] = []
        for shape in shapes:
            problem = Problem(shape)
            tuned[shape.name] = {}
            for t in token_lists[shape.name]:
                if time.time() - start > args.budget_s:
                    print(f"tuning budget spent: {shape.name} stops before T={t}", flush=True)
                    break
                t0 = time.time()
                cfg, predicted = tune_one(problem, t, log)
                tuned[shape.name][t] = cfg
                print(f"tuned {shape.name} T={t}: {predicted * 1e3:.1f} µs {cfg.to_dict()} ({time.time() - t0:.0f} s)")
            del problem
            synchronize()
        (args.out / f"fused_moe_tune_{slug}.json").write_text(json.dumps(log, separators=(",", ":")) + "\n")
        configs = {
            shape_key(s.hidden_size, s.inter_size, DTYPE): {str(t): c.to_dict() for t, c in tuned[s.name].items()}
            for s in shapes
            if tuned.get(s.name)
        }
        args.config_out.mkdir(parents=True, exist_ok=True)
        tuned_file = {
            "device": device,
            "date": report["date"],
            "triton": triton.__version__,
            "note": "written by load_tests/kernels/bench_fused_moe.py --tune; keys: tokens",
            "configs": configs,
        }
        (args.config_out / device_config_name(device)).write_text(json.dumps(tuned_file, indent=1) + "\n")

    for shape in shapes:
        problem = Problem(shape)
        rows = report["shapes"].setdefault(shape.name, [])
        for t in token_lists[shape.name]:
            cfg = tuned.get(shape.name, {}).get(t) or get_config(
                t, shape.hidden_size, shape.inter_size, shape.num_experts, shape.top_k, DTYPE, device
            )
            row = bench_one(problem, t, cfg, report["peaks"], with_baselines=not args.no_baselines)
            rows.append(row)
            print(
                f"{shape.name} T={t}: {row['ms'] * 1e3:.1f} µs (graph {row.get('graph_ms', math.nan) * 1e3:.1f}) "
                f"align {row['align_ms'] * 1e3:.1f} µs, {row['tflops']:.0f} TFLOP/s, {row['gbps']:.0f} GB/s "
                f"({row['pct_hbm_measured']:.0f}% of copy), ref x{row.get('speedup_vs_ref', math.nan):.1f}, "
                f"grouped_mm x{row.get('speedup_vs_grouped_mm', math.nan):.2f}, err {row.get('rel_err_vs_fp32_ref')}",
                flush=True,
            )
            (args.out / f"fused_moe_bench_{slug}.json").write_text(json.dumps(report, indent=1))
        del problem
        synchronize()
    (args.out / f"fused_moe_bench_{slug}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
