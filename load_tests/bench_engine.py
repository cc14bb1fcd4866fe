"""Engine benchmarks on one GPU: the decode step against its floor, and prefill throughput (a
script, not a test).

    python -m load_tests.bench_engine all|decode|prefill [--model ernie-4.5-21b-a3b]
        [--batches 1,8,64,256] [--contexts 1024,8192] [--prompts 1024,8192,32768] [--chunk 8192]
        [--out benchmarks/results]

Both run on one engine (built once, sized for the largest batch, context and prompt).

decode   For each (batch B, context C) that fits the KV pool: B requests whose C-token prompts
         are already "in the cache" (blocks allocated through the decode role's preallocate /
         adopt path; the KV values are whatever the pool holds, which does not change the
         time), then `engine.step()` timed end to end (schedule, inputs, forward, sampling: what
         a decode worker pays per token) with CUDA graphs, and eagerly as the same run's
         baseline. The floor is bytes / measured HBM bandwidth, where bytes = every weight a
         step reads (all non-expert weights, the tied embedding once as the LM head, and the
         routed experts the step's tokens actually chose, counted per layer from the MoE
         layers' routed-token counters over as many untimed steps run with no CUDA graph at
         all: a graph replays a padded token bucket, and its padding rows are routed and counted
         like real tokens) + the KV cache read by attention. Bandwidth is a
         device-to-device copy of 2 GiB measured in the same run.
prefill  One prompt of P random tokens, timed from submission to its first token (all its
         chunks under the engine's token budget). MFU = model FLOPs / time / peak, where model
         FLOPs = 2 x active parameters per token (attention, dense or shared MLP, top-k routed
         experts) + causal attention 2 x 2 x Hq x D x P^2 / 2 per layer; peaks: the nominal
         dense bf16 rate of the GPU and an 8192^3 bf16 matmul measured in the same run.

Each writes `engine_<decode|prefill>_<gpu>.json` and `.md` to --out, with device, date and commit.
The random-weight presets route tokens roughly uniformly, so a batch touches more experts than a
trained model's skewed routing would: the floor counts what this run touched.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import CacheConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import SampledToken

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' datasheets.
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after two warm-ups, synchronised each run."""
    times = []
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def copy_bandwidth_gbps(device: torch.device, num_bytes: int) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = seconds_of(lambda: dst.copy_(src), device, 10)
    return 2 * num_bytes / seconds / 1e9


def matmul_tflops(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)

    def ten_products() -> None:
        for _ in range(10):
            a @ b

    return 2 * n**3 * 10 / seconds_of(ten_products, device, 3) / 1e12


@dataclass(frozen=True)
class WeightBytes:
    non_expert: int  # every parameter a decode step reads whole (a tied embedding once, as the LM head)
    per_expert: int  # one routed expert's w13 + w2

    @classmethod
    def of(cls, model: torch.nn.Module) -> WeightBytes:
        expert_bytes = 0
        per_expert = 0
        for moe in model.moe_layers():
            layer = moe.w13.numel() * moe.w13.element_size() + moe.w2.numel() * moe.w2.element_size()
            expert_bytes += layer
            per_expert = layer // moe.num_local_experts
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        return cls(non_expert=total - expert_bytes, per_expert=per_expert)


def routed_counts(model: torch.nn.Module) -> list[torch.Tensor]:
    return [moe.routed_token_counts.clone() for moe in model.moe_layers()]


def touched_experts(before: list[torch.Tensor], after: list[torch.Tensor]) -> int:
    return int(sum(int(((a - b) > 0).sum()) for b, a in zip(before, after, strict=True)))


def make_engine(args: argparse.Namespace, max_model_len: int, max_num_seqs: int, chunk: int) -> LLMEngine:
    return LLMEngine.from_model(
        args.model,
        device=args.device,
        seed=0,
        cache=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=chunk, max_num_seqs=max_num_seqs, max_model_len=max_model_len),
        enforce_eager=args.enforce_eager,
    )


def seat_decode_batch(engine: LLMEngine, batch: int, context: int, generator: torch.Generator) -> list[str]:
    """`batch` running requests whose `context` prompt tokens are in the KV pool (decode-role path)."""
    vocab = min(engine.runtime.vocab_size, 32000)
    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    ids = []
    for i in range(batch):
        prompt = torch.randint(3, vocab, (context,), generator=generator).tolist()
        request = engine.make_request(f"b{batch}-c{context}-{i}", prompt, params)
        if engine.preallocate(request) is None:
            for rid in ids:
                engine.abort(rid)
            return []
        engine.adopt(request, SampledToken(prompt[-1], None))
        ids.append(request.request_id)
    return ids


def time_steps(engine: LLMEngine, num_steps: int) -> tuple[list[float], list[int]]:
    """Wall time of each of `num_steps` steps, and the routed experts each step touched (counted
    from the MoE layers' counters between steps, outside the timed region)."""
    device = engine.kv_cache.device
    model = engine.loaded.model
    times, touched = [], []
    for _ in range(num_steps):
        before = routed_counts(model)
        sync(device)
        start = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - start)
        touched.append(touched_experts(before, routed_counts(model)))
    return times, touched


def count_touched_experts(engine: LLMEngine, num_steps: int) -> list[int]:
    """The routed experts each of `num_steps` steps touched, run with every CUDA graph off (decode
    graphs and the MoE layers' per-bucket graphs): a graph computes a padded token bucket, and
    its padding rows are routed, and counted, like real tokens."""
    moes = engine.loaded.model.moe_layers()
    saved_graphs, saved_moe = engine.runner.decode_graphs, [moe.graphed for moe in moes]
    engine.runner.decode_graphs = None
    for moe in moes:
        moe.graphed = None
    try:
        return time_steps(engine, num_steps)[1]
    finally:
        engine.runner.decode_graphs = saved_graphs
        for moe, graphed in zip(moes, saved_moe, strict=True):
            moe.graphed = graphed


def shared_engine(args: argparse.Namespace) -> LLMEngine:
    """One engine for both benchmarks (the 21B preset takes a while to build): room for the
    largest batch, the longest context and the longest prompt."""
    batches = [int(b) for b in args.batches.split(",")]
    longest = max(int(c) for c in args.contexts.split(",")) + args.steps + 16
    longest = max(longest, max(int(p) for p in args.prompts.split(",")) + 16)
    try:
        return make_engine(args, longest, max(batches), chunk=args.chunk)
    except Exception as exc:  # a failed capture is reported (JSON: cuda_graph_error), the run goes on eagerly
        if args.enforce_eager:
            raise
        error = "".join(traceback.format_exception(exc))
    print(f"building the engine with CUDA graphs failed; measuring eagerly:\n{error}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    args.graph_error = error.strip().splitlines()[-1]
    args.enforce_eager = True
    return make_engine(args, longest, max(batches), chunk=args.chunk)


def bench_decode(args: argparse.Namespace, engine: LLMEngine) -> dict[str, Any]:
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    model = engine.loaded.model
    weights = WeightBytes.of(model)
    spec = engine.runtime.kv_spec
    kv_bytes_per_token = spec.bytes_per_block // spec.block_size
    bandwidth = copy_bandwidth_gbps(device, args.copy_bytes)
    graphs = engine.runner.decode_graphs
    generator = torch.Generator().manual_seed(0)
    rows = []
    for context in contexts:
        for batch in batches:
            ids = seat_decode_batch(engine, batch, context, generator)
            if not ids:
                rows.append({"batch": batch, "context": context, "skipped": "KV pool too small"})
                print(f"decode B={batch} C={context}: skipped (KV pool too small)", flush=True)
                continue
            row: dict[str, Any] = {"batch": batch, "context": context}
            for mode in ("graph", "eager"):
                if mode == "graph" and graphs is None:
                    continue
                engine.runner.decode_graphs = graphs if mode == "graph" else None
                time_steps(engine, 3)
                times, _ = time_steps(engine, args.steps)
                row[f"{mode}_ms"] = statistics.median(times) * 1e3
            engine.runner.decode_graphs = graphs
            row["experts_touched_per_step"] = statistics.mean(count_touched_experts(engine, args.steps))
            mean_context = context + 3 + args.steps  # the KV a timed step reads, mid-run
            bytes_read = weights.non_expert + row["experts_touched_per_step"] * weights.per_expert
            bytes_read += batch * mean_context * kv_bytes_per_token
            floor_ms = bytes_read / (bandwidth * 1e9) * 1e3
            best = row.get("graph_ms", row["eager_ms"])
            row.update(
                bytes_read=bytes_read,
                floor_ms=floor_ms,
                ratio_to_floor=best / floor_ms,
                graph_speedup_vs_eager=row["eager_ms"] / row["graph_ms"] if "graph_ms" in row else None,
            )
            rows.append(row)
            print(
                f"decode B={batch} C={context}: graph {row.get('graph_ms', float('nan')):.2f} ms, "
                f"eager {row['eager_ms']:.2f} ms, floor {floor_ms:.2f} ms ({best / floor_ms:.2f}x), "
                f"experts/step {row['experts_touched_per_step']:.0f}",
                flush=True,
            )
            for rid in ids:
                engine.abort(rid)
    return {
        "benchmark": "decode_step",
        "model": args.model,
        "hbm_copy_gbps": bandwidth,
        "weights": {"non_expert_bytes": weights.non_expert, "per_expert_bytes": weights.per_expert},
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_pool_blocks": engine.runtime.num_kv_blocks,
        "cuda_graph_buckets": list(graphs.buckets) if graphs else [],
        "cuda_graph_error": args.graph_error,
        "rows": rows,
    }


def active_flops_per_token(engine: LLMEngine) -> float:
    """2 x the parameters one token multiplies (no attention scores, no LM head)."""
    cfg = engine.loaded.config
    hidden, heads, kv_heads, dim = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attention = hidden * (heads + 2 * kv_heads) * dim + heads * dim * hidden
    flops = 0.0
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            inter = cfg.moe_intermediate_size
            mlp = 3 * hidden * inter * (cfg.moe_k + cfg.moe_num_shared_experts) + hidden * cfg.moe_num_experts
        else:
            mlp = 3 * hidden * cfg.intermediate_size
        flops += 2 * (attention + mlp)
    return flops


def bench_prefill(args: argparse.Namespace, engine: LLMEngine) -> dict[str, Any]:
    device = torch.device(args.device)
    prompts = [int(p) for p in args.prompts.split(",")]
    cfg = engine.loaded.config
    peak = matmul_tflops(device, args.matmul_size)
    name = device_name(device)
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    per_token = active_flops_per_token(engine)
    generator = torch.Generator().manual_seed(1)
    vocab = min(engine.runtime.vocab_size, 32000)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rows = []
    for round_index in range(2):  # the first round compiles and warms up; the second is reported
        for length in prompts:
            prompt = torch.randint(3, vocab, (length,), generator=generator).tolist()
            sync(device)
            start = time.perf_counter()
            engine.add_request(f"p{round_index}-{length}", prompt, params)
            num_steps = 0
            while engine.has_unfinished:
                engine.step()
                num_steps += 1
            sync(device)
            seconds = time.perf_counter() - start
            if round_index == 0:
                continue
            attention = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * cfg.head_dim * length * length
            flops = per_token * length + attention
            row = {
                "prompt_tokens": length,
                "steps": num_steps,
                "seconds": seconds,
                "tokens_per_s": length / seconds,
                "tflops": flops / seconds / 1e12,
                "mfu_vs_measured_matmul": flops / seconds / 1e12 / peak,
                "mfu_vs_nominal": flops / seconds / 1e12 / nominal if nominal else None,
            }
            rows.append(row)
            print(
                f"prefill P={length}: {seconds * 1e3:.1f} ms in {num_steps} steps, {row['tokens_per_s']:.0f} tok/s, "
                f"{row['tflops']:.0f} TFLOP/s ({row['mfu_vs_measured_matmul']:.1%} of the measured matmul rate)",
                flush=True,
            )
    return {
        "benchmark": "prefill",
        "model": args.model,
        "chunk_tokens": args.chunk,
        "matmul_tflops_measured": peak,
        "nominal_bf16_tflops": nominal,
        "active_flops_per_token": per_token,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    head = f"# {result['benchmark']} — {result['model']} on {result['device']}\n\n"
    head += f"{result['date']}, commit {result['commit']}\n\n"
    if result["benchmark"] == "decode_step":
        lines = [
            f"HBM copy bandwidth measured: {result['hbm_copy_gbps']:.0f} GB/s; "
            f"CUDA-graph buckets: {result['cuda_graph_buckets']}\n",
            "| batch | context | graph ms | eager ms | graph speedup | experts/step | floor ms | step / floor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['batch']} | {r['context']} | skipped: {r['skipped']} | | | | | |")
                continue
            speedup = r["graph_speedup_vs_eager"]
            lines.append(
                f"| {r['batch']} | {r['context']} | {r.get('graph_ms', float('nan')):.2f} | {r['eager_ms']:.2f} "
                f"| {speedup if speedup is None else f'{speedup:.2f}'} | {r['experts_touched_per_step']:.0f} "
                f"| {r['floor_ms']:.2f} | {r['ratio_to_floor']:.2f} |"
            )
    else:
        lines = [
            f"Measured 8192^3 bf16 matmul: {result['matmul_tflops_measured']:.0f} TFLOP/s; "
            f"chunk budget {result['chunk_tokens']} tokens\n",
            "| prompt | steps | ms | tokens/s | TFLOP/s | MFU (measured matmul) | MFU (nominal) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            nominal = "" if r["mfu_vs_nominal"] is None else f"{r['mfu_vs_nominal']:.1%}"
            lines.append(
                f"| {r['prompt_tokens']} | {r['steps']} | {r['seconds'] * 1e3:.1f} | {r['tokens_per_s']:.0f} "
                f"| {r['tflops']:.0f} | {r['mfu_vs_measured_matmul']:.1%} | {nominal} |"
            )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["decode", "prefill", "all"])
    parser.add_argument("--model", default="ernie-4.5-21b-a3b")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", default="1024,8192,32768")
    parser.add_argument("--chunk", type=int, default=8192, help="prefill token budget per step")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script on the tiny preset")
    parser.add_argument("--copy-bytes", type=int, default=2 << 30)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--git-commit", default=None)
    parser.set_defaults(graph_error=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU here (use --device cpu --model tiny only to smoke-test the script)")
    engine = shared_engine(args)
    device = device_name(torch.device(args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    for what, bench in (("decode", bench_decode), ("prefill", bench_prefill)):
        if args.what not in (what, "all"):
            continue
        result = bench(args, engine)
        result.update(
            device=device,
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            commit=args.git_commit or git_commit(),
            torch=torch.__version__,
        )
        stem = f"engine_{what}_{device.replace(' ', '_')}"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(result))
        print(f"wrote {args.out / stem}.json and .md", flush=True)


if __name__ == "__main__":
    main()
