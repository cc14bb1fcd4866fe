"""Benchmark of the split-KV paged decode attention kernel at the ERNIE-4.5-21B shape (a script, not a test).

    python -m load_tests.kernels.bench_paged_attention [--batches 1,8,64,256] [--contexts 1024,8192]
        [--splits auto|N] [--out benchmarks/results] [--no-baseline] [--dry-run]

One decode step of one attention layer -- 20 query heads over 4 KV heads of 128, bf16, blocks of
16 tokens, every sequence `context` keys long, blocks shuffled across the pool -- for each batch x
context, it reports:
  * the median time of `paged_decode_attention` (CUDA events, L2 flushed by a 256 MB read before
    every run), eager and as a replayed CUDA graph of the backend's decode call (how decode runs);
  * GB/s of KV read (S * context * Hkv * D * 2 (K and V) * 2 bytes; queries, tables and the split
    partials are left out) and that as % of the copy bandwidth measured in this run and of the
    nominal H100 3.35 TB/s;
  * the baseline from the same run: gather each sequence's blocks with torch indexing, then
    `F.scaled_dot_product_attention(enable_gqa=True)` over the gathered K/V;
  * the relative error against `paged_decode_attention_ref` run in fp32.
It writes `paged_attention_bench_<gpu>.json` and `.md` to --out (device, date, commit included).

--dry-run prints the plan (shapes, split counts for this device, bytes per case) and launches
nothing. Without a GPU the script runs the `tiny` heads (4 / 2 of 16) in float32 through the Triton
interpreter (set TRITON_INTERPRET=1): a smoke test of the script itself, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton

from engine.kernels.fused_moe import num_sms as num_sms_of
from engine.kernels.paged_attention import default_num_splits, paged_attention, paged_decode_attention
from engine.kernels.paged_attention_ref import decode_metadata, paged_decode_attention_ref
from load_tests.kernels.bench_fused_moe import DEVICE, DTYPE, graph_ms, measure_peaks, median_ms, rel_err, run_info


@dataclass(frozen=True)
class AttentionShape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    def kv_bytes(self, num_keys: int) -> int:
        return num_keys * self.num_kv_heads * self.head_dim * 2 * DTYPE.itemsize


SHAPES = {
    "ernie-21b": AttentionShape("ernie-21b", 20, 4, 128, 16),  # ERNIE-4.5-21B-A3B
    "tiny": AttentionShape("tiny", 4, 2, 16, 16),  # smoke runs on CPU
}
DEFAULT_BATCHES = [1, 8, 64, 256]
DEFAULT_CONTEXTS = [1024, 8192]


class Problem:
    """A paged pool holding `batch` sequences of `context` keys each, blocks shuffled, one query each."""

    def __init__(self, shape: AttentionShape, batch: int, context: int, seed: int = 0) -> None:
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        blocks_per_seq = triton.cdiv(context, shape.block_size)
        num_blocks = batch * blocks_per_seq
        self.shape, self.batch, self.context = shape, batch, context
        self.kv = torch.randn(
            2, num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim, device=DEVICE, generator=gen
        ).to(DTYPE)
        order = torch.randperm(num_blocks, device=DEVICE, generator=gen)
        self.block_tables = order.view(batch, blocks_per_seq).to(torch.int32)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
        self.query = torch.randn(batch, shape.num_q_heads, shape.head_dim, device=DEVICE, generator=gen).to(DTYPE)
        self.scale = shape.head_dim**-0.5

    def kernel(self, num_splits: int | None) -> torch.Tensor:
        return paged_decode_attention(self.query, self.kv, self.block_tables, self.seq_lens, self.scale, num_splits)

    def baseline(self) -> torch.Tensor:
        """Gather with torch indexing, then SDPA over [S, Hkv, L, D] with GQA."""
        s = self.shape
        keys, values = (
            self.kv[i, self.block_tables.long()].flatten(1, 2)[:, : self.context].transpose(1, 2) for i in (0, 1)
        )
        out = F.scaled_dot_product_attention(
            self.query[:, :, None], keys, values, scale=self.scale, enable_gqa=True
        )  # [S, Hq, 1, D]
        return out.view(self.batch, s.num_q_heads, s.head_dim)


def bench_one(
    shape: AttentionShape, batch: int, context: int, splits: int | None, peaks: dict[str, float], with_baseline: bool
) -> dict[str, Any]:
    problem = Problem(shape, batch, context)
    num_splits = splits or default_num_splits(
        batch, shape.num_kv_heads, problem.block_tables.shape[1], shape.block_size, num_sms_of(torch.device(DEVICE))
    )
    row: dict[str, Any] = {"batch": batch, "context": context, "num_splits": num_splits}
    row["ms"] = median_ms(lambda: problem.kernel(num_splits))
    if DEVICE == "cuda":
        meta = decode_metadata(problem.block_tables, problem.seq_lens, shape.block_size)
        row["graph_ms"] = graph_ms([lambda: paged_attention(problem.query, problem.kv, meta, problem.scale)])
    best_ms = min(row["ms"], row.get("graph_ms", math.inf))
    num_bytes = shape.kv_bytes(batch * context)
    row.update(
        kv_bytes=num_bytes,
        gbps=num_bytes / (best_ms * 1e-3) / 1e9,
        pct_hbm_measured=100 * num_bytes / (best_ms * 1e-3) / peaks["copy_bytes_per_s"],
        pct_hbm_nominal=100 * num_bytes / (best_ms * 1e-3) / peaks["nominal_hbm_bytes_per_s"],
    )
    out = problem.kernel(num_splits)
    reference = paged_decode_attention_ref(
        problem.query.float(), problem.kv.float(), problem.block_tables, problem.seq_lens, problem.scale
    )
    row["rel_err_vs_fp32_ref"] = rel_err(out, reference)
    del reference
    if with_baseline:
        try:
            row["baseline_rel_err"] = rel_err(problem.baseline(), out)
            row["baseline_ms"] = median_ms(problem.baseline)
            row["speedup_vs_baseline"] = row["baseline_ms"] / best_ms
        except Exception as exc:  # out of memory for the gathered copy, or no SDPA kernel for it
            row["baseline_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def markdown(report: dict[str, Any]) -> str:
    peaks = report["peaks"]
    s = SHAPES[report["shape"]]
    lines = [
        f"# paged decode attention on {report['device']} ({report['date']})",
        "",
        f"torch {report['torch']}, triton {report['triton']}, commit {report['git_commit']}. "
        f"Hq={s.num_q_heads}, Hkv={s.num_kv_heads}, D={s.head_dim}, blocks of {s.block_size}, {report['dtype']}. "
        f"Measured in this run: copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write); "
        "nominal HBM 3.35 TB/s.",
        "Times are medians with L2 flushed (256 MB read) before each run; `graph` replays the backend's decode call "
        "from a CUDA graph. GB/s counts the K and V bytes read. Baseline: torch gather of the blocks + SDPA (GQA).",
        "",
        "| batch | context | splits | µs | graph µs | GB/s | % HBM (meas.) | % HBM (3.35) | baseline µs | × baseline "
        "| rel err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        cells = [
            str(r["batch"]),
            str(r["context"]),
            str(r["num_splits"]),
            *(f"{r[k] * 1e3:.1f}" if k in r else "–" for k in ("ms", "graph_ms")),
            f"{r['gbps']:.0f}",
            f"{r['pct_hbm_measured']:.1f}",
            f"{r['pct_hbm_nominal']:.1f}",
            f"{r['baseline_ms'] * 1e3:.1f}" if "baseline_ms" in r else "–",
            f"{r['speedup_vs_baseline']:.1f}" if "speedup_vs_baseline" in r else "–",
            f"{r['rel_err_vs_fp32_ref']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dry_run(
    shape: AttentionShape, batches: list[int], contexts: list[int], splits: int | None, num_sms: int | None
) -> None:
    num_sms = num_sms or num_sms_of(torch.device(DEVICE))
    print(f"{DEVICE}, {num_sms} SMs for the split heuristic, {shape}, {DTYPE}")
    for context in contexts:
        for batch in batches:
            max_blocks = triton.cdiv(context, shape.block_size)
            num_splits = splits or default_num_splits(batch, shape.num_kv_heads, max_blocks, shape.block_size, num_sms)
            print(
                f"batch {batch:4d} context {context:5d}: grid ({batch}, {shape.num_kv_heads}, {num_splits}), "
                f"KV read {shape.kv_bytes(batch * context) / 1e6:.1f} MB"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="ernie-21b" if DEVICE == "cuda" else "tiny")
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
    parser.add_argument("--splits", default="auto", help="'auto' (the kernel's heuristic) or a split count")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, launch nothing")
    parser.add_argument("--num-sms", type=int, default=None, help="--dry-run: plan for a GPU of this many SMs")
    parser.add_argument("--git-commit", default=None)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    splits = None if args.splits == "auto" else int(args.splits)
    if args.dry_run:
        dry_run(shape, batches, contexts, splits, args.num_sms)
        return

    start = time.time()
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-interpreter"
    report: dict[str, Any] = {
        **run_info(device, args.git_commit),
        "shape": shape.name,
        "dtype": str(DTYPE).removeprefix("torch."),
        "rows": [],
    }
    report["peaks"] = measure_peaks()
    print(f"{device}: peaks {report['peaks']}", flush=True)
    slug = "".join(c if c.isalnum() else "_" for c in device)
    args.out.mkdir(parents=True, exist_ok=True)
    for context in contexts:
        for batch in batches:
            row = bench_one(shape, batch, context, splits, report["peaks"], with_baseline=not args.no_baseline)
            report["rows"].append(row)
            print(
                f"batch {batch} context {context}: {row['num_splits']} splits, {row['ms'] * 1e3:.1f} µs "
                f"(graph {row.get('graph_ms', math.nan) * 1e3:.1f}), {row['gbps']:.0f} GB/s "
                f"({row['pct_hbm_measured']:.0f}% of copy), baseline x{row.get('speedup_vs_baseline', math.nan):.1f}, "
                f"err {row['rel_err_vs_fp32_ref']:.1e}",
                flush=True,
            )
            (args.out / f"paged_attention_bench_{slug}.json").write_text(json.dumps(report, indent=1))
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    (args.out / f"paged_attention_bench_{slug}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
