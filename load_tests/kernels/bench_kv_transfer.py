"""Benchmark of the KV transport between two GPUs (a script, not a test).

    python -m load_tests.kernels.bench_kv_transfer [--device cuda|cpu] [--out benchmarks/results]
        [--tokens 128,512,...] [--repeats 5] [--git-commit SHA]

Two processes: rank 0 plays prefill (sender) on cuda:0, rank 1 decode (receiver) on cuda:1, with
ERNIE-4.5-21B's KV shape (28 layers x 4 KV heads x 128, bf16) in paged blocks of 16 tokens, a
prompt's blocks scattered at random over the pool on both sides. For each prompt length, in one run:

- raw:        one contiguous `torch.distributed` send/recv (NCCL) of the transfer's size;
- whole:      the transport moving the prompt: paged gather -> send -> scatter into paged blocks;
- variants:   the same whole transfer through transports with other chunk sizes / staging
              depths (`--variants`), to show where the defaults sit;
- staged:     a diagnostic without the transport's machinery (no control messages, no pair
              threads, no host confirmations): gather -> send -> scatter straight on the raw group,
              in 1 and in 4 pipelined chunks. It bounds what paged staging costs on this link;
- burst:      bandwidth as nccl-tests measures it, with the launch cost amortised: --burst transfers
              back to back (every receive posted first), raw (that many contiguous send/recvs) beside
              whole (that many whole-prompt transfers into distinct random blocks), timed from the
              sender's first call until the last one has landed;
- layer-wise: the sender "computes" each layer (a spin kernel on the compute stream lasting the
              simulated per-layer prefill time) and marks it ready as it goes; reported is how long
              after the last layer's compute ends the last layer's KV has landed in the receiver's
              blocks, in units of one layer's compute time.

Coordination goes through a `TCPStore` with one key per step (no collective barriers: a lazily
created NCCL communicator inside a posted recv must never wait behind a barrier). Times come from
the host's monotonic clock, which both processes share: from the sender's first call until the
data is usable on the receiver (raw: recv done and synchronized; whole: the transfer's future
resolved, stamped by a done-callback on the thread that resolves it, so the waiting thread's own
wake-up is not counted, as it is not for raw). The receiver always posts first. Medians of
--repeats. Simulated compute per layer = (2 * active params per layer * T + 2 * T^2 * heads *
head_dim) FLOPs at --tflops.

Targets (issue): whole >= 85 % of raw for T >= 4096 (judged on single transfers and on bursts,
both reported); layer-wise lands within one layer's compute
for T >= 1024. Writes `kv_transfer_<tag>.json` and `.md` into --out. `--device cpu` runs the same
code over gloo on CPU (small sizes) to check the script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.kv_transport import PeerRef, TransportConfig, kv_io, make_transport

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GPU_TOKENS = [128, 512, 1024, 2048, 4096, 8192, 16384, 32768]
CPU_TOKENS = [16, 64, 256]
# ERNIE-4.5-21B-A3B: ~3.0e9 active parameters, minus tied embeddings (103424 x 2560), over 28 layers.
ACTIVE_PARAMS_PER_LAYER = (3.0e9 - 103424 * 2560) / 28
NUM_Q_HEADS = 20
STEP_TIMEOUT = datetime.timedelta(seconds=120)


def layer_compute_s(tokens: int, head_dim: int, tflops: float) -> float:
    flops = 2 * ACTIVE_PARAMS_PER_LAYER * tokens + 2 * tokens * tokens * NUM_Q_HEADS * head_dim
    return flops / (tflops * 1e12)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Rank:
    """One process: its KV pool, a raw buffer, the store, the raw process group and the transport."""

    def __init__(self, rank: int, args: argparse.Namespace, store_port: int) -> None:
        self.rank, self.args = rank, args
        self.cuda = args.device == "cuda"
        self.device = torch.device(f"cuda:{rank}") if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.store = dist.TCPStore("127.0.0.1", store_port, 2, rank == 0, timeout=STEP_TIMEOUT)
        dist.init_process_group(
            "nccl" if self.cuda else "gloo", store=dist.PrefixStore("raw", self.store), rank=rank, world_size=2
        )
        self.block_size = args.block_size
        max_blocks = -(-max(args.tokens) // self.block_size)
        self.num_blocks = 2 * max_blocks + 16
        shape = (args.layers, 2, self.num_blocks, self.block_size, args.kv_heads, args.head_dim)
        gen = torch.Generator().manual_seed(rank)
        self.kv = torch.randn(shape, generator=gen).to(torch.bfloat16).to(self.device)
        self.bytes_per_block = args.layers * 2 * self.block_size * args.kv_heads * args.head_dim * 2
        self.raw = torch.zeros(max_blocks * self.bytes_per_block, dtype=torch.uint8, device=self.device)
        self.gen = gen
        self.rows = kv_io.kv_rows(self.kv)
        self.stage = torch.empty(max_blocks * self.bytes_per_block // 8, dtype=torch.int64, device=self.device)
        self.cycles_per_s = self._calibrate() if self.cuda else 0.0
        self._warm_raw()
        # The default transport first, then one per variant (chunk MiB, staging depth).
        self.variants = [None, *args.variants]
        self.transports, self.peers = [], []
        for index, variant in enumerate(self.variants):
            local = PeerRef(f"bench-{rank}-v{index}", f"inc-{rank}")
            knobs = {} if variant is None else {"chunk_bytes": variant[0] << 20, "staging_depth": variant[1]}
            config = TransportConfig(deadline_base_s=30.0, connect_timeout_s=60.0, expect_timeout_s=120.0, **knobs)
            transport = make_transport(
                "nccl" if self.cuda else "gloo", kv=self.kv, local=local, model_hash="bench", config=config
            )
            me = transport.local
            self.store.set(f"peer/{rank}/{index}", json.dumps([me.worker_id, me.incarnation, me.host, me.port]))
            self.transports.append(transport)
        for index in range(len(self.variants)):
            self.peers.append(PeerRef(*json.loads(self.store.get(f"peer/{1 - rank}/{index}"))))
        self.transport, self.peer = self.transports[0], self.peers[0]
        self.timelines: dict[int, list[dict[str, float]]] = {}  # tokens -> per whole transfer: stage -> ms
        # (tokens, variant) -> the last burst's transfers: stage -> ms after the burst's first call
        self.burst_timelines: dict[tuple[int, int], list[dict[str, float]]] = {}

    # ------------------------------------------------------------------ helpers
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _calibrate(self) -> float:
        torch.cuda._sleep(1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        return 20_000_000 / (start.elapsed_time(end) / 1e3)

    def _warm_raw(self) -> None:
        """Both ranks post at once, so NCCL builds the pair's P2P communicator without waiting on anyone."""
        probe = torch.zeros(1, device=self.device)
        (dist.isend(probe, 1) if self.rank == 0 else dist.irecv(probe, 0)).wait()
        self.sync()

    def blocks(self, tokens: int) -> list[int]:
        count = -(-tokens // self.block_size)
        return torch.randperm(self.num_blocks, generator=self.gen)[:count].tolist()

    def signal(self, key: str, value: float = 0.0) -> None:
        self.store.set(key, repr(value))

    def wait_for(self, key: str) -> float:
        return float(self.store.get(key))

    # ------------------------------------------------------------------ measurements
    def raw_once(self, step: str, num_bytes: int) -> float | None:
        return self.raw_burst_once(step, num_bytes, 1)

    def receive(self, step: str, tokens: int, blocks: list[int], variant: int = 0) -> None:
        """Receiver side of a transport step: post first, say so, and stamp when the KV has landed."""
        future = self.transports[variant].expect(self.peers[variant], step, blocks, tokens)
        resolved: list[float] = []
        future.add_done_callback(lambda _: resolved.append(time.monotonic()))  # on the resolving thread
        self.signal(f"{step}/posted")
        result = future.result(timeout=120)
        landed = resolved[0]
        self.store.set(f"{step}/timeline", json.dumps(result.timeline))
        self.signal(f"{step}/landed", landed)

    def whole_once(self, step: str, tokens: int, variant: int = 0) -> float | None:
        blocks = self.blocks(tokens)
        if self.rank == 1:
            return self.receive(step, tokens, blocks, variant)
        self.wait_for(f"{step}/posted")
        start = time.monotonic()
        sent = self.transports[variant].send(self.peers[variant], step, blocks, tokens).result(timeout=120)
        landed = self.wait_for(f"{step}/landed")
        if variant == 0:
            stages = [(f"S:{name}", at) for name, at in sent.timeline]
            stages += [(f"R:{name}", at) for name, at in json.loads(self.store.get(f"{step}/timeline"))]
            self.timelines.setdefault(tokens, []).append({name: (at - start) * 1e3 for name, at in stages})
        return landed - start

    def staged_once(self, step: str, tokens: int, num_chunks: int) -> float | None:
        """Diagnostic: gather -> send -> scatter on the raw group, every receive posted up front."""
        blocks = self.blocks(tokens)
        index = torch.tensor(blocks, device=self.device)
        chunks = kv_io.plan_chunks(self.args.layers, 1, -(-self.args.layers // num_chunks))
        views, offset = [], 0
        for chunk in chunks:
            size = kv_io.chunk_words(self.rows, chunk, len(blocks))
            views.append(kv_io.staging_view(self.stage[offset : offset + size], self.rows, chunk, len(blocks)))
            offset += size
        if self.rank == 1:
            works = [dist.irecv(view, 0) for view in views]
            self.signal(f"{step}/posted")
            for chunk, view, work in zip(chunks, views, works, strict=True):
                work.wait()  # GPU: the current stream waits for the receive, the host does not
                kv_io.scatter(self.rows, chunk, index, view)
            self.sync()
            self.signal(f"{step}/landed", time.monotonic())
            return None
        self.wait_for(f"{step}/posted")
        start = time.monotonic()
        works = []
        for chunk, view in zip(chunks, views, strict=True):
            kv_io.gather(self.rows, chunk, index, view)
            works.append(dist.isend(view, 1))
        for work in works:
            work.wait()
        return self.wait_for(f"{step}/landed") - start

    def raw_burst_once(self, step: str, num_bytes: int, count: int) -> float | None:
        """`count` contiguous send/recvs back to back (into one buffer: they run in stream order)."""
        buffer = self.raw[:num_bytes]
        if self.rank == 1:
            works = [dist.irecv(buffer, 0) for _ in range(count)]
            self.signal(f"{step}/posted")
            for work in works:
                work.wait()
            self.sync()
            self.signal(f"{step}/landed", time.monotonic())
            return None
        self.wait_for(f"{step}/posted")
        start = time.monotonic()
        works = [dist.isend(buffer, 1) for _ in range(count)]
        for work in works:
            work.wait()
        return self.wait_for(f"{step}/landed") - start

    def whole_burst_once(self, step: str, tokens: int, count: int, variant: int = 0) -> float | None:
        """`count` whole-prompt transfers back to back, each into its own random blocks."""
        transport, peer = self.transports[variant], self.peers[variant]
        if self.rank == 1:
            futures, resolved = [], []
            for i in range(count):
                future = transport.expect(peer, f"{step}/{i}", self.blocks(tokens), tokens)
                future.add_done_callback(lambda _: resolved.append(time.monotonic()))
                futures.append(future)
            self.signal(f"{step}/posted")
            results = [future.result(timeout=120) for future in futures]
            self.store.set(f"{step}/timeline", json.dumps([r.timeline for r in results]))
            self.signal(f"{step}/landed", max(resolved))
            return None
        block_sets = [self.blocks(tokens) for _ in range(count)]
        self.wait_for(f"{step}/posted")
        start = time.monotonic()
        futures = [transport.send(peer, f"{step}/{i}", blocks, tokens) for i, blocks in enumerate(block_sets)]
        sent = [future.result(timeout=120) for future in futures]
        landed = self.wait_for(f"{step}/landed")
        received = json.loads(self.store.get(f"{step}/timeline"))
        self.burst_timelines[(tokens, variant)] = [
            {
                f"{side}:{name}": round((at - start) * 1e3, 3)
                for side, line in (("S", s.timeline), ("R", r))
                for name, at in line
            }
            for s, r in zip(sent, received, strict=True)
        ]
        return landed - start

    def layerwise_once(self, step: str, tokens: int, layer_s: float) -> float | None:
        blocks = self.blocks(tokens)
        if self.rank == 1:
            return self.receive(step, tokens, blocks)
        self.wait_for(f"{step}/posted")
        stream = self.transport.open_send(self.peer, step, blocks, tokens)
        cycles = max(1, int(layer_s * self.cycles_per_s))
        for layer in range(self.args.layers):
            if self.cuda:
                torch.cuda._sleep(cycles)  # this layer's "prefill" on the compute stream
            else:
                time.sleep(layer_s)
            stream.layer_ready(layer)
        self.sync()  # the last layer's compute is over
        compute_end = time.monotonic()
        stream.finish().result(timeout=120)
        return self.wait_for(f"{step}/landed") - compute_end


def median_timeline(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per stage, the median ms after the sender's first call (stages every run has), in time order."""
    names = [name for name in runs[0] if all(name in run for run in runs)] if runs else []
    medians = {name: round(statistics.median(run[name] for run in runs), 3) for name in names}
    return dict(sorted(medians.items(), key=lambda item: item[1]))


def _rank_main(rank: int, args: argparse.Namespace, store_port: int, out: Any) -> None:
    os.environ.update(MULTICAST_OFF)
    me = Rank(rank, args, store_port)
    results = []
    for tokens in args.tokens:
        num_blocks = -(-tokens // me.block_size)
        num_bytes = num_blocks * me.bytes_per_block
        layer_s = layer_compute_s(tokens, args.head_dim, args.tflops)
        row: dict[str, Any] = {"tokens": tokens, "bytes": num_bytes, "layer_compute_ms": layer_s * 1e3}
        try:
            for warm in range(2):
                me.raw_once(f"w{tokens}/raw{warm}", num_bytes)
                me.whole_once(f"w{tokens}/whole{warm}", tokens)
            raw = [me.raw_once(f"{tokens}/raw{i}", num_bytes) for i in range(args.repeats)]
            whole = [me.whole_once(f"{tokens}/whole{i}", tokens) for i in range(args.repeats)]
            variants, variant_bursts = {}, {}
            for v, (mib, depth) in enumerate(args.variants, start=1):
                me.whole_once(f"w{tokens}/v{v}", tokens, v)
                times = [me.whole_once(f"{tokens}/v{v}/{i}", tokens, v) for i in range(args.repeats)]
                variants[f"{mib}MiB x{depth}"] = times
                me.whole_burst_once(f"w{tokens}/vb{v}", tokens, args.burst, v)
                times = [me.whole_burst_once(f"{tokens}/vb{v}/{i}", tokens, args.burst, v) for i in range(args.repeats)]
                variant_bursts[f"{mib}MiB x{depth}"] = times
            staged = {}
            for n in (1, 4):
                me.staged_once(f"w{tokens}/s{n}", tokens, n)
                staged[n] = [me.staged_once(f"{tokens}/s{n}/{i}", tokens, n) for i in range(args.repeats)]
            burst = args.burst
            me.raw_burst_once(f"w{tokens}/rb", num_bytes, burst)
            me.whole_burst_once(f"w{tokens}/wb", tokens, burst)
            raw_burst = [me.raw_burst_once(f"{tokens}/rb{i}", num_bytes, burst) for i in range(args.repeats)]
            whole_burst = [me.whole_burst_once(f"{tokens}/wb{i}", tokens, burst) for i in range(args.repeats)]
            lands = [me.layerwise_once(f"{tokens}/lw{i}", tokens, layer_s) for i in range(args.layerwise_repeats)]
            if rank == 0:
                row["raw_s"] = statistics.median(raw)
                row["whole_s"] = statistics.median(whole)
                row["variants_s"] = {name: statistics.median(times) for name, times in variants.items()}
                row["variants_burst_s"] = {name: statistics.median(times) for name, times in variant_bursts.items()}
                row["staged_s"] = {str(n): statistics.median(times) for n, times in staged.items()}
                row["raw_burst_s"] = statistics.median(raw_burst)
                row["whole_burst_s"] = statistics.median(whole_burst)
                row["layerwise_lands_after_s"] = statistics.median(lands)
                row["whole_timeline_ms"] = median_timeline(me.timelines.get(tokens, [])[-args.repeats :])
                row["burst_timelines_ms"] = {
                    str(v): me.burst_timelines.get((tokens, v), []) for v in range(len(args.variants) + 1)
                }
        except Exception:
            row["error"] = traceback.format_exc(limit=3)
        if rank == 0:
            results.append(row)
            print(f"  {tokens} tokens: {json.dumps(row)}", flush=True)
    if rank == 0:
        out.put(results)
    for transport in me.transports:
        transport.close()
    dist.destroy_process_group()


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    meta = {
        "device": f"{device} x2",
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,
        "commit": args.git_commit or _git_commit(),
        "shape": {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "bfloat16"},
        "block_size": args.block_size,
        "transport_defaults": {
            "chunk_mib": TransportConfig().chunk_bytes >> 20,
            "staging_depth": TransportConfig().staging_depth,
            "stream_chunk_layers": TransportConfig().stream_chunk_layers,
        },
        "repeats": args.repeats,
        "burst": args.burst,
        "simulated_tflops": args.tflops,
    }
    lines = [
        f"# KV transfer: {meta['device']} ({meta['backend']})",
        "",
        f"{meta['date']}, torch {meta['torch']}, NCCL {meta['nccl']}, commit {meta['commit']}. "
        f"KV of ERNIE-4.5-21B ({args.layers} layers x {args.kv_heads} KV heads x {args.head_dim}, bf16), "
        f"blocks of {args.block_size} tokens scattered over the pool on both sides; medians of {args.repeats}.",
        "",
        "| tokens | MiB | raw GB/s | whole GB/s | whole / raw | burst raw GB/s | burst whole GB/s | burst whole / raw "
        "| layer compute ms | layer-wise lands after ms | in layers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mib = row["bytes"] / 2**20
        if "error" in row:
            lines.append(f"| {row['tokens']} | {mib:.1f} | error: {row['error'].splitlines()[-1]} |")
            continue
        raw_gbs, whole_gbs = row["bytes"] / row["raw_s"] / 1e9, row["bytes"] / row["whole_s"] / 1e9
        row.update(raw_gb_s=raw_gbs, whole_gb_s=whole_gbs, whole_over_raw=row["raw_s"] / row["whole_s"])
        row["lands_after_layers"] = row["layerwise_lands_after_s"] / (row["layer_compute_ms"] / 1e3)
        burst_bytes = row["bytes"] * args.burst
        row.update(
            raw_burst_gb_s=burst_bytes / row["raw_burst_s"] / 1e9,
            whole_burst_gb_s=burst_bytes / row["whole_burst_s"] / 1e9,
            whole_burst_over_raw=row["raw_burst_s"] / row["whole_burst_s"],
        )
        lines.append(
            f"| {row['tokens']} | {mib:.1f} | {raw_gbs:.1f} | {whole_gbs:.1f} | {row['whole_over_raw']:.2f} | "
            f"{row['raw_burst_gb_s']:.1f} | {row['whole_burst_gb_s']:.1f} | {row['whole_burst_over_raw']:.2f} | "
            f"{row['layer_compute_ms']:.3f} | {row['layerwise_lands_after_s'] * 1e3:.3f} | "
            f"{row['lands_after_layers']:.2f} |"
        )
        row["variants_over_raw"] = {k: row["raw_s"] / v for k, v in row.get("variants_s", {}).items()}
        row["variants_burst_over_raw"] = {k: row["raw_burst_s"] / v for k, v in row.get("variants_burst_s", {}).items()}
        row["staged_over_raw"] = {k: row["raw_s"] / v for k, v in row.get("staged_s", {}).items()}
    defaults = meta["transport_defaults"]
    names = list(dict.fromkeys(k for r in rows for k in r.get("variants_over_raw", {})))
    extra = [
        "",
        "Whole transfers as a fraction of raw (single, and in bursts), by transport chunk size x staging depth "
        f"(the table above: the "
        f"defaults, {defaults['chunk_mib']} MiB x {defaults['staging_depth']}), and the staged diagnostic "
        "(gather -> send -> scatter on the raw group, no transport machinery) in 1 and 4 chunks:",
        "",
        "| tokens | " + "".join(f"{name} | {name} burst | " for name in names) + "staged 1 | staged 4 |",
        "|---|" + "---|" * (2 * len(names) + 2),
    ]
    for row in rows:
        if "error" in row:
            continue
        cells = [
            f"{row[key].get(k, float('nan')):.2f}"
            for k in names
            for key in ("variants_over_raw", "variants_burst_over_raw")
        ]
        staged = [f"{row['staged_over_raw'].get(k, float('nan')):.2f}" for k in ("1", "4")]
        extra.append(f"| {row['tokens']} | " + " | ".join(cells + staged) + " |")
    ok_rows = [r for r in rows if "error" not in r]
    whole_ok = [r for r in ok_rows if r["tokens"] >= 4096]
    lw_ok = [r for r in ok_rows if r["tokens"] >= 1024]
    lines += [
        "",
        "GB/s = bytes / time from the sender's first call until the data is usable on the receiver (shared "
        f"monotonic clock, receiver posted first); bursts: {args.burst} transfers back to back, from the first call "
        "until the last has landed. 'lands after' = last layer's KV in the receiver's blocks "
        "minus the end of the last layer's simulated compute.",
        "",
        f"- whole >= 85 % of raw for T >= 4096, single transfers: "
        f"{'PASS' if whole_ok and all(r['whole_over_raw'] >= 0.85 for r in whole_ok) else 'FAIL'}",
        f"- whole >= 85 % of raw for T >= 4096, bursts of {args.burst}: "
        f"{'PASS' if whole_ok and all(r['whole_burst_over_raw'] >= 0.85 for r in whole_ok) else 'FAIL'}",
        f"- layer-wise lands within one layer's compute for T >= 1024: "
        f"{'PASS' if lw_ok and all(r['lands_after_layers'] <= 1.0 for r in lw_ok) else 'FAIL'}",
        f"- prompt lengths that errored: {len(rows) - len(ok_rows)}",
        *extra,
    ]
    return {"meta": meta, "rows": rows}, "\n".join(lines) + "\n"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tokens", default=None, help="comma-separated prompt lengths")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tflops", type=float, default=400.0, help="simulated prefill rate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layerwise-repeats", type=int, default=3)
    parser.add_argument("--burst", type=int, default=8, help="transfers back to back in the burst measurement")
    parser.add_argument(
        "--variants",
        default="64:2,16:4,256:4,1024:2",
        help="other transports to time: chunk MiB:staging depth, comma-separated",
    )
    parser.add_argument("--git-commit", default=None)
    args = parser.parse_args(argv)
    default = GPU_TOKENS if args.device == "cuda" else CPU_TOKENS
    args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else default
    try:
        args.variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",") if v]
        if any(len(v) != 2 or v[0] <= 0 or v[1] < 2 for v in args.variants):
            raise ValueError
    except ValueError:
        parser.error(f"--variants wants MiB:depth pairs (MiB > 0, depth >= 2), got {args.variants!r}")
    if args.burst < 1:
        parser.error(f"--burst must be >= 1, got {args.burst}")
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print("needs two CUDA devices", file=sys.stderr)
        return 2
    os.environ.update(MULTICAST_OFF)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, args, port, out)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    rows = out.get(timeout=1800)
    for proc in procs:
        proc.join(60)
    data, markdown = report(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "h200x2" if "H200" in data["meta"]["device"] else data["meta"]["device"].split()[0].lower()
    (args.out / f"kv_transfer_{tag}.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / f"kv_transfer_{tag}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
