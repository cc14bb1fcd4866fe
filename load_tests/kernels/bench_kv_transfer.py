"""Benchmark of the KV transport between two GPUs (a script, not a test).

    python -m load_tests.kernels.bench_kv_transfer [--device cuda|cpu] [--out benchmarks/results]
        [--tokens 128,512,...] [--chunk-mb 16,64,256] [--block-size 16] [--git-commit SHA]

Two processes: rank 0 plays prefill (sender) on cuda:0, rank 1 decode (receiver) on cuda:1.
ERNIE-4.5-21B's KV shape (28 layers x 4 KV heads x 128, bf16) in paged blocks, a prompt's
blocks scattered over the pool on both sides. For each prompt length it measures, in one run:

- raw:    `torch.distributed` send/recv of one contiguous tensor of the transfer's size (NCCL),
- whole:  the transport moving the prompt (paged gather -> send -> scatter into paged blocks),
          for each --chunk-mb setting (the payload per NCCL send),
- layer-wise: the sender "computes" each layer (a spin kernel on the compute stream lasting a
          simulated per-layer prefill time) and marks it ready; reported is how long after the
          last layer's compute the last layer's KV has landed in the receiver's blocks, against
          one layer's compute time, and the share of a whole-prompt transfer that was hidden.

Times run from the sender's first call to the moment the data is usable on the receiver (raw:
recv done; whole: the transfer's future resolved), read from the host's monotonic clock, which
both processes share; the receiver is posted first in both cases. Reported: single transfers
(median of --repeats; the per-prompt number the target is about) and batches of back-to-back
transfers (throughput). The simulated compute time per layer
is 2 * active params per layer * T + 2 * T^2 * heads * head_dim FLOPs at --tflops.

Targets (issue): whole >= 85 % of raw for T >= 4096; layer-wise lands within one layer's compute
time for T >= 1024. Writes `kv_transfer_<tag>.json` and `.md` into --out. `--device cpu` runs the
same code over gloo on CPU (small sizes), to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import queue
import socket
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster.kv_transport import PeerRef, TransportConfig, make_transport

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GPU_TOKENS = [128, 512, 1024, 2048, 4096, 8192, 16384, 32768]
CPU_TOKENS = [16, 64, 256]
# ERNIE-4.5-21B-A3B: ~3.0e9 active parameters, minus tied embeddings (103424 x 2560), over 28 layers.
ACTIVE_PARAMS_PER_LAYER = (3.0e9 - 103424 * 2560) / 28
NUM_Q_HEADS = 20


def layer_compute_s(tokens: int, head_dim: int, tflops: float) -> float:
    flops = 2 * ACTIVE_PARAMS_PER_LAYER * tokens + 2 * tokens * tokens * NUM_Q_HEADS * head_dim
    return flops / (tflops * 1e12)


# ---------------------------------------------------------------------------------- per process
class Bench:
    """One rank's state: its KV pool, the raw buffer, the coordination group, its transports."""

    def __init__(self, rank: int, args: argparse.Namespace) -> None:
        self.rank = rank
        self.args = args
        self.cuda = args.device == "cuda"
        self.device = torch.device(f"cuda:{rank}") if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.ctl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.step_timeout_s))
        self.num_batches = 0  # both ranks count in lockstep: transfer ids agree without talking
        self.block_size = args.block_size
        max_blocks = -(-max(args.tokens) // self.block_size)
        self.num_blocks = max_blocks + 64
        shape = (args.layers, 2, self.num_blocks, self.block_size, args.kv_heads, args.head_dim)
        self.kv = torch.randn(shape, dtype=torch.bfloat16, device=self.device)
        self.bytes_per_block = args.layers * 2 * self.block_size * args.kv_heads * args.head_dim * 2
        self.raw = torch.empty(max_blocks * self.bytes_per_block, dtype=torch.uint8, device=self.device)
        self.generator = torch.Generator().manual_seed(rank)
        self.sleep_cycles_per_s = self._calibrate_sleep() if self.cuda else 0.0

    # ------------------------------------------------------------------ helpers
    def barrier(self) -> None:
        dist.barrier(group=self.ctl)

    def exchange(self, value: Any) -> list[Any]:
        values: list[Any] = [None, None]
        dist.all_gather_object(values, value, group=self.ctl)
        return values

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def blocks(self, tokens: int) -> list[int]:
        count = -(-tokens // self.block_size)
        return torch.randperm(self.num_blocks, generator=self.generator)[:count].tolist()

    def _calibrate_sleep(self) -> float:
        torch.cuda._sleep(1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)

    def compute(self, seconds: float) -> None:
        """Stand-in for one layer's prefill on the compute stream (host sleep on CPU)."""
        if self.cuda:
            torch.cuda._sleep(max(1, int(seconds * self.sleep_cycles_per_s)))
        else:
            time.sleep(seconds)

    def checksum(self, block_ids: list[int]) -> int:
        data = self.kv[:, :, torch.tensor(block_ids, device=self.device)].contiguous().view(torch.int32)
        return int(data.to(torch.int64).sum().item())

    # ------------------------------------------------------------------ raw
    def raw_batch(self, num_bytes: int, count: int) -> float:
        """Seconds from the sender's first send to the receiver holding `count` contiguous messages."""
        buffer = self.raw[:num_bytes]
        self.sync()
        works = [dist.irecv(buffer, 0) for _ in range(count)] if self.rank == 1 else []  # receiver first
        self.barrier()
        start = time.monotonic()
        if self.rank == 0:
            works = [dist.isend(buffer, 1) for _ in range(count)]
        for work in works:
            work.wait()
        self.sync()
        end = time.monotonic()
        starts = self.exchange(start)  # both ranks take part
        return end - starts[0] if self.rank == 1 else 0.0

    # ------------------------------------------------------------------ transport
    def transport_batch(
        self,
        transport: Any,
        peer: PeerRef,
        tokens: int,
        src: list[int],
        dst: list[int],
        count: int,
        preopen: bool = False,
    ) -> float:
        """Seconds from the sender's first `send` to the receiver's last transfer landing in its blocks.

        `preopen` (single transfers): the sender opens the stream before the clock starts, as the
        prefill role does when it schedules the prompt, and the clock starts at `finish()`.
        """
        self.num_batches += 1
        ids = [f"b{self.num_batches}-{i}" for i in range(count)]
        landed: list[float] = []
        futures = []
        if self.rank == 1:  # decode allocates first
            for tid in ids:
                future = transport.expect(peer, tid, dst, tokens)
                future.add_done_callback(lambda _f: landed.append(time.monotonic()))
                futures.append(future)
        streams = []
        if preopen:
            self.barrier()  # the expects are posted before the sender opens
            if self.rank == 0:
                streams = [transport.open_send(peer, tid, src, tokens) for tid in ids]
            time.sleep(0.01)  # let the header reach the receiver
        self.sync()
        self.barrier()
        start = time.monotonic()
        if self.rank == 0:
            futures = (
                [s.finish() for s in streams] if preopen else [transport.send(peer, tid, src, tokens) for tid in ids]
            )
        for future in futures:
            future.result(timeout=self.args.step_timeout_s)
        starts = self.exchange(start)
        return max(landed) - starts[0] if self.rank == 1 else 0.0

    def layerwise(
        self, transport: Any, peer: PeerRef, tokens: int, src: list[int], dst: list[int], layer_s: float
    ) -> float:
        """Seconds from the end of the last layer's compute to its KV landing on the receiver."""
        self.num_batches += 1
        tid = f"lw{self.num_batches}"
        landed: list[float] = []
        if self.rank == 1:
            future = transport.expect(peer, tid, dst, tokens)
            future.add_done_callback(lambda _f: landed.append(time.monotonic()))
        self.sync()
        self.barrier()
        compute_end = 0.0
        if self.rank == 0:
            stream = transport.open_send(peer, tid, src, tokens)
            for layer in range(self.args.layers):
                self.compute(layer_s)
                stream.layer_ready(layer)
            if self.cuda:
                end = torch.cuda.Event()
                end.record()
                future = stream.finish()
                end.synchronize()
            else:
                future = stream.finish()
            compute_end = time.monotonic()
        future.result(timeout=self.args.step_timeout_s)
        ends = self.exchange(compute_end)
        return landed[0] - ends[0] if self.rank == 1 else 0.0


def _run_rank(rank: int, port: int, args: argparse.Namespace, results: Any) -> None:
    """Measure every prompt length; the receiver streams each row to `results` as it is done.

    A failure stops this rank (the other one then times out in its next collective), so the
    rows measured so far still make it into the report.
    """
    backend = "nccl" if args.device == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=args.step_timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout)
    bench = Bench(rank, args)
    if rank == 1:
        results.put(("info", _device_info(bench)))
    local = PeerRef(f"bench-{rank}", uuid.uuid4().hex[:12])
    transports = {}
    for chunk_mb in args.chunk_mb:
        config = TransportConfig(chunk_bytes=int(chunk_mb * (1 << 20)), deadline_base_s=60.0, connect_timeout_s=60.0)
        transports[chunk_mb] = make_transport(backend, kv=bench.kv, local=local, model_hash="bench", config=config)
    peers = {mb: bench.exchange(t.local)[1 - rank] for mb, t in transports.items()}
    for tokens in args.tokens:
        src, dst = bench.blocks(tokens), bench.blocks(tokens)
        num_bytes = len(src) * bench.bytes_per_block
        count = max(2, min(64, math.ceil(args.batch_bytes / num_bytes)))
        row: dict[str, Any] = {"tokens": tokens, "bytes": num_bytes, "batch": count}
        try:
            bench.raw_batch(num_bytes, 2)  # warm-up
            raw = [bench.raw_batch(num_bytes, count) / count for _ in range(args.repeats)]
            raw_single = [bench.raw_batch(num_bytes, 1) for _ in range(args.repeats)]
            row["raw_s"], row["raw_single_s"] = statistics.median(raw), statistics.median(raw_single)
            row["whole"] = {}
            for mb, transport in transports.items():
                bench.transport_batch(transport, peers[mb], tokens, src, dst, 2)  # warm-up (builds the pair)
                whole = [
                    bench.transport_batch(transport, peers[mb], tokens, src, dst, count) / count
                    for _ in range(args.repeats)
                ]
                single = [bench.transport_batch(transport, peers[mb], tokens, src, dst, 1) for _ in range(args.repeats)]
                opened = [
                    bench.transport_batch(transport, peers[mb], tokens, src, dst, 1, preopen=True)
                    for _ in range(args.repeats)
                ]
                row["whole"][str(mb)] = {
                    "s": statistics.median(whole),
                    "single_s": statistics.median(single),
                    "opened_s": statistics.median(opened),
                }
            sums = bench.exchange(bench.checksum(src if rank == 0 else dst))
            row["bit_exact"] = sums[0] == sums[1]
            layer_s = args.layer_ms / 1e3 if args.layer_ms else layer_compute_s(tokens, args.head_dim, args.tflops)
            transport = transports[args.chunk_mb[0]]
            late = [
                bench.layerwise(transport, peers[args.chunk_mb[0]], tokens, src, dst, layer_s)
                for _ in range(args.layerwise_repeats)
            ]
            row["layerwise"] = {"layer_s": layer_s, "late_s": statistics.median(late), "chunk_mb": args.chunk_mb[0]}
        except Exception:
            row["error"] = traceback.format_exc()[-3000:]
            print(f"rank {rank}: {tokens} tokens failed:\n{row['error']}", flush=True)
        if rank == 1:
            print(f"{tokens:>6} tokens: {json.dumps(row)[:300]}", flush=True)
            results.put(("row", row))
        if "error" in row:
            break
        bench.barrier()
    for transport in transports.values():
        transport.close()
    dist.destroy_process_group()


def _device_info(bench: Bench) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu",
        "nccl": _nccl_version() if bench.cuda else None,
        "sleep_cycles_per_s": bench.sleep_cycles_per_s,
    }


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _worker(rank: int, port: int, args: argparse.Namespace, results: Any) -> None:
    os.environ.update(MULTICAST_OFF)
    try:
        _run_rank(rank, port, args, results)
    except BaseException:
        results.put(("error", f"rank {rank}: {traceback.format_exc()[-3000:]}"))
        raise


# ---------------------------------------------------------------------------------- report
def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per prompt length: GB/s of raw and of each chunk setting (single and batched), layer-wise lateness."""
    out = []
    for row in rows:
        if "error" in row:
            out.append({"tokens": row["tokens"], "error": row["error"].strip().splitlines()[-1]})
            continue
        gb = row["bytes"] / 1e9
        single = {mb: gb / w["single_s"] for mb, w in row["whole"].items()}
        opened = {mb: gb / w["opened_s"] for mb, w in row["whole"].items()}
        batch = {mb: gb / w["s"] for mb, w in row["whole"].items()}
        best = max(single, key=single.__getitem__)
        best_batch = max(batch, key=batch.__getitem__)
        layerwise = row["layerwise"]
        raw, raw_batch = gb / row["raw_single_s"], gb / row["raw_s"]
        out.append(
            {
                "tokens": row["tokens"],
                "mib": row["bytes"] / (1 << 20),
                "raw_gbps": raw,
                "whole_gbps": single,
                "best_chunk_mb": best,
                "ratio": single[best] / raw,
                "opened_gbps": opened,
                "opened_ratio": max(opened.values()) / raw,
                "raw_batch_gbps": raw_batch,
                "whole_batch_gbps": batch,
                "batch_ratio": batch[best_batch] / raw_batch,
                "bit_exact": row["bit_exact"],
                "layer_ms": layerwise["layer_s"] * 1e3,
                "late_ms": layerwise["late_s"] * 1e3,
                "late_in_layers": layerwise["late_s"] / layerwise["layer_s"],
                "hidden": 1 - layerwise["late_s"] / row["whole"][str(layerwise["chunk_mb"])]["single_s"],
            }
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    chunks = [str(mb) for mb in report["config"]["chunk_mb"]]
    config = report["config"]
    lines = [
        f"# KV transfer: {report['device']} x2 ({report['backend']})",
        "",
        f"{report['date']}, torch {report['torch']}, NCCL {report['nccl']}, commit {report['git_commit']}. "
        f"Shape {config['layers']} layers x {config['kv_heads']} KV heads x {config['head_dim']}, bf16, "
        f"block size {config['block_size']}; a prompt's blocks scattered over the pool on both sides.",
        "",
        "GB/s = bytes / time from the sender's first call until the data is usable on the receiver "
        "(shared monotonic clock; receiver posted first). raw = one contiguous `torch.distributed` "
        "send/recv of the same size. whole = paged gather -> send -> scatter into paged blocks, per "
        "payload-per-send setting (MiB), one prompt sent cold with `send()` (median). opened = the "
        "stream was opened before the clock started (as the prefill role opens it when it schedules "
        "the prompt; the header has reached the receiver) and the clock starts at `finish()`, best "
        "setting. batch = back-to-back transfers. Layer-wise: simulated compute per layer "
        + (f"{config['layer_ms']} ms" if config["layer_ms"] else f"at {config['tflops']} TFLOP/s")
        + "; 'lands after' = last layer's KV in the receiver's blocks minus the end of the last "
        "layer's compute; 'hidden' = share of a whole single transfer's time overlapped with compute.",
        "",
        "| tokens | MiB | raw GB/s | "
        + " | ".join(f"whole {mb} GB/s" for mb in chunks)
        + " | whole / raw | opened / raw | raw batch GB/s | batch / raw | exact | layer ms | lands after ms"
        " | in layers | hidden |",
        "|" + "---|" * (12 + len(chunks)),
    ]
    for s in summary:
        if "error" in s:
            lines.append(f"| {s['tokens']} | error: {s['error']} |")
            continue
        whole = " | ".join(f"{s['whole_gbps'][mb]:.1f}" for mb in chunks)
        lines.append(
            f"| {s['tokens']} | {s['mib']:.1f} | {s['raw_gbps']:.1f} | {whole} | {s['ratio']:.1%} | "
            f"{s['opened_ratio']:.1%} | {s['raw_batch_gbps']:.1f} | {s['batch_ratio']:.1%} | "
            f"{'yes' if s['bit_exact'] else 'NO'} | "
            f"{s['layer_ms']:.3f} | {s['late_ms']:.3f} | {s['late_in_layers']:.2f} | {s['hidden']:.0%} |"
        )
    lines += ["", *[f"- {check}" for check in report["checks"]], ""]
    return "\n".join(lines)


def checks(summary: list[dict[str, Any]], min_whole: int, min_layerwise: int) -> list[str]:
    ok = [s for s in summary if "error" not in s]
    whole = [s for s in ok if s["tokens"] >= min_whole]
    layerwise = [s for s in ok if s["tokens"] >= min_layerwise]
    lines = []
    if whole:
        for key, what in (
            ("ratio", "cold send()"),
            ("opened_ratio", "stream opened ahead"),
            ("batch_ratio", "batches"),
        ):
            worst = min(whole, key=lambda s, key=key: s[key])
            lines.append(
                f"whole >= 85 % of raw for T >= {min_whole}, {what}: {'PASS' if worst[key] >= 0.85 else 'FAIL'} "
                f"(worst {worst[key]:.1%} at {worst['tokens']})"
            )
    if layerwise:
        worst = max(layerwise, key=lambda s: s["late_in_layers"])
        verdict = "PASS" if worst["late_in_layers"] <= 1.0 else "FAIL"
        lines.append(
            f"layer-wise lands within one layer's compute for T >= {min_layerwise}: {verdict} "
            f"(worst {worst['late_in_layers']:.2f} layers at {worst['tokens']})"
        )
    exact = all(s["bit_exact"] for s in ok)
    lines.append(f"bit-exact: {'PASS' if exact else 'FAIL'}; prompt lengths that errored: {len(summary) - len(ok)}")
    return lines


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--tag", default=None, help="file name suffix (default: h200x2 style from the GPU name, or cpu)"
    )
    parser.add_argument("--tokens", default=None, help="comma-separated prompt lengths")
    parser.add_argument(
        "--chunk-mb", default=None, help="payload per send, comma-separated; the first is used layer-wise"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tflops", type=float, default=400.0, help="simulated prefill rate")
    parser.add_argument("--layer-ms", type=float, default=None, help="fixed simulated compute per layer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layerwise-repeats", type=int, default=3)
    parser.add_argument("--batch-bytes", type=float, default=1 << 30, help="bytes per timed batch")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="whole run")
    parser.add_argument("--step-timeout-s", type=float, default=120.0, help="one collective or transfer")
    parser.add_argument("--git-commit", default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (GPU_TOKENS if cuda else CPU_TOKENS)
    args.chunk_mb = (
        [float(c) for c in args.chunk_mb.split(",")] if args.chunk_mb else ([64.0, 16.0, 256.0] if cuda else [1.0])
    )
    args.chunk_mb = [int(c) if c.is_integer() else c for c in args.chunk_mb]
    if cuda and torch.cuda.device_count() < 2:
        print("needs two CUDA devices", file=sys.stderr)
        return 2
    os.environ.update(MULTICAST_OFF)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, port, args, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    info: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline and (any(w.is_alive() for w in workers) or not results.empty()):
        try:
            kind, value = results.get(timeout=1.0)
        except queue.Empty:
            continue
        {"info": info.update, "row": rows.append, "error": errors.append}[kind](value)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
        worker.join(timeout=10)
    for error in errors:
        print(f"benchmark error: {error}", file=sys.stderr)
    if not rows:
        print("benchmark failed: no measurements", file=sys.stderr)
        return 1
    summary = summarize(rows)
    device = info["device"]
    tag = args.tag or ("cpu" if not cuda else device.lower().replace("nvidia ", "").split()[0] + "x2")
    report = {
        "device": device,
        "backend": "nccl" if cuda else "gloo",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "nccl": info["nccl"],
        "git_commit": args.git_commit or git_commit(),
        "argv": sys.argv[1:] if argv is None else argv,
        "config": {
            "layers": args.layers,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "block_size": args.block_size,
            "chunk_mb": args.chunk_mb,
            "tflops": args.tflops,
            "layer_ms": args.layer_ms,
            "repeats": args.repeats,
            "sleep_cycles_per_s": info["sleep_cycles_per_s"],
        },
        "rows": rows,
        "summary": summary,
        "errors": errors,
    }
    report["checks"] = checks(summary, 4096 if cuda else 0, 1024 if cuda else 0)
    if len(rows) < len(args.tokens) or errors:
        report["checks"].append(f"INCOMPLETE: {len(rows)} of {len(args.tokens)} prompt lengths measured")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kv_transfer_{tag}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"kv_transfer_{tag}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
