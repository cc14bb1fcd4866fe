"""Benchmark of the MoE router kernel at the ERNIE-4.5-21B shape (a script, not a test).

    python -m load_tests.kernels.bench_moe_route [--tokens 1,8,64,256,1024,4096,8192] [--out benchmarks/results]

One router call -- bf16 hidden [T, 2560], fp32 gate [64, 2560], correction bias, top-6 -- for each
token count T, it reports:
  * the median time of `route` (CUDA events, L2 flushed by a 256 MB read before every run), eager
    and as a replayed CUDA graph (how decode runs), with the splits of H it chose on this GPU;
  * GB/s of gate + hidden read, and that as % of the copy bandwidth measured in this run;
  * baselines from the same run: `route` held to one split (one program per token block: the
    layout before the split) and the torch reference `route_ref`;
  * how many tokens whose k-th and (k+1)-th scores are not a near tie chose the reference's experts.
It writes `moe_route_bench_<gpu>.json` and `.md` to --out (device, date, commit included).
Without a GPU it runs on the CPU through the Triton interpreter (TRITON_INTERPRET=1) at small T:
a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import triton

from engine.kernels.fused_moe import num_sms
from engine.kernels.fused_moe_ref import route_ref
from engine.kernels.moe_route import PROGRAMS_PER_SM, num_splits, route
from load_tests.kernels.bench_fused_moe import DEVICE, DTYPE, graph_ms, measure_peaks, median_ms, run_info

HIDDEN, EXPERTS, TOP_K = 2560, 64, 6
DEFAULT_TOKENS = [1, 8, 64, 256, 1024, 4096, 8192]


def bench_one(num_tokens: int, copy_gbps: float) -> dict[str, Any]:
    generator = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, HIDDEN, generator=generator, device=DEVICE).to(DTYPE)
    gate = torch.randn(EXPERTS, HIDDEN, generator=generator, device=DEVICE) / HIDDEN**0.25
    bias = torch.rand(EXPERTS, generator=generator, device=DEVICE) * 0.1
    block_t = 16 if num_tokens <= 16 or DEVICE != "cuda" else 32
    splits, _ = num_splits(triton.cdiv(num_tokens, block_t), HIDDEN, PROGRAMS_PER_SM * num_sms(hidden.device))
    row: dict[str, Any] = {"tokens": num_tokens, "splits": splits}
    row["ms"] = median_ms(lambda: route(hidden, gate, bias, TOP_K))
    row["one_split_ms"] = median_ms(lambda: route(hidden, gate, bias, TOP_K, splits=1))
    row["ref_ms"] = median_ms(lambda: route_ref(hidden, gate, bias, TOP_K))
    if DEVICE == "cuda":
        row["graph_ms"] = graph_ms([lambda: route(hidden, gate, bias, TOP_K)] * 4)
        row["one_split_graph_ms"] = graph_ms([lambda: route(hidden, gate, bias, TOP_K, splits=1)] * 4)
    best_ms = min(row["ms"], row.get("graph_ms", row["ms"]))
    num_bytes = gate.numel() * gate.element_size() + hidden.numel() * hidden.element_size()
    row["gbps"] = num_bytes / best_ms / 1e6
    row["pct_copy"] = 100 * row["gbps"] / copy_gbps
    _, ids = route(hidden, gate, bias, TOP_K)
    _, ref_ids = route_ref(hidden, gate, bias, TOP_K)
    scores = torch.softmax(hidden.float() @ gate.T, dim=-1) + bias
    ordered = scores.sort(dim=-1, descending=True).values
    clear = (ordered[:, TOP_K - 1] - ordered[:, TOP_K]) > 1e-5
    same = (ids.sort(dim=-1).values == ref_ids.sort(dim=-1).values).all(dim=-1)
    row["clear_tokens"] = int(clear.sum())
    row["clear_tokens_matching_ref"] = int((same & clear).sum())
    return row


def markdown(report: dict[str, Any]) -> str:
    info = report["run"]
    lines = [
        f"# MoE router on {info['device']} ({info['date']})\n",
        f"torch {info['torch']}, triton {info['triton']}, commit {info['git_commit']}. Copy bandwidth measured "
        f"in this run: {report['copy_gbps'] / 1e3:.2f} TB/s. Shape: {report['dtype']} hidden [T, {HIDDEN}], fp32 gate "
        f"[{EXPERTS}, {HIDDEN}], top-{TOP_K} with a correction bias.\n",
        "Times are medians with L2 flushed before each run; `graph` replays 4 calls from a CUDA graph (per call). "
        "GB/s counts the gate and hidden bytes read. Baselines: the same kernels held to one split of H, and "
        "the torch reference.\n",
        "| T | splits | µs | graph µs | GB/s | % copy | 1 split µs | 1 split graph µs | ref µs | × ref "
        "| clear tokens as ref |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        us = {
            k: f"{r[k] * 1e3:.1f}" if k in r else "–" for k in ("ms", "graph_ms", "one_split_ms", "one_split_graph_ms")
        }
        lines.append(
            f"| {r['tokens']} | {r['splits']} | {us['ms']} | {us['graph_ms']} | {r['gbps']:.0f} | {r['pct_copy']:.1f} "
            f"| {us['one_split_ms']} | {us['one_split_graph_ms']} | {r['ref_ms'] * 1e3:.1f} "
            f"| {r['ref_ms'] / r['ms']:.1f} | {r['clear_tokens_matching_ref']}/{r['clear_tokens']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=None, help="comma-separated token counts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--git-commit", default=None)
    args = parser.parse_args(argv)
    default = DEFAULT_TOKENS if DEVICE == "cuda" else [1, 8]
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else default
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    peaks = measure_peaks()
    copy_gbps = peaks["copy_bytes_per_s"] / 1e9
    report: dict[str, Any] = {
        "run": run_info(device_name, args.git_commit),
        "dtype": str(DTYPE).removeprefix("torch."),
        "copy_gbps": copy_gbps,
        "rows": [],
    }
    for num_tokens in tokens:
        row = bench_one(num_tokens, copy_gbps)
        report["rows"].append(row)
        print(
            f"T={num_tokens}: {row['ms'] * 1e3:.1f} us (graph {row.get('graph_ms', float('nan')) * 1e3:.1f}), "
            f"{row['splits']} splits; one split {row['one_split_ms'] * 1e3:.1f} us; ref {row['ref_ms'] * 1e3:.1f} us; "
            f"clear tokens as ref {row['clear_tokens_matching_ref']}/{row['clear_tokens']}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "moe_route_bench_" + device_name.replace(" ", "_").replace("(", "").replace(")", "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
