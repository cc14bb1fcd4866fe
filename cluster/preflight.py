"""`pdserve preflight`: measure the interconnect between a host's GPUs before serving on it.

One process per GPU (or `--nprocs` CPU processes with gloo) joins a torch.distributed group and
times two collectives over a range of message sizes, reported the way nccl-tests reports them,
so the numbers compare directly with `sendrecv_perf` / `all_reduce_perf`:

    sendrecv    every rank sends `size` bytes to rank + 1 and receives `size` bytes from
                rank - 1 at once (a ring; with two ranks, both directions of one link)
    all_reduce  sum of a `size`-byte buffer over every rank (in place)

    time   wall time of one operation, averaged over `iters` and then over the ranks
           (nccl-tests' default `-a 1`)
    algbw  size / time                               (GB/s, 1 GB = 1e9 bytes)
    busbw  algbw × factor, the hardware-bound rate:  sendrecv   factor 1
                                                     all_reduce factor 2 (n - 1) / n

Before timing, one operation per size is checked (every rank fills its buffer with its own rank
number plus one; the result must be the neighbour's value / the sum over ranks): a wrong result
is a failure, like nccl-tests' `#wrong`. `--min-busbw` turns the report into a gate: the run
fails (exit 1) when an operation's bus bandwidth at the largest size is under its threshold.

The processes are this host's only (the Helm chart runs one pod with a worker's GPUs); they meet
at a `TCPStore` that the parent process hosts on a free loopback port. The backend is NCCL on
CUDA and gloo on CPU, as in the KV transport and expert parallelism.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OPS = ("sendrecv", "all_reduce")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPU_SIZES = "1M,16M,256M,1G"
CPU_SIZES = "64K,1M,8M"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def busbw_factor(op: str, num_ranks: int) -> float:
    """nccl-tests' bus-bandwidth factor: sendrecv 1, all_reduce 2 (n - 1) / n."""
    if op == "sendrecv":
        return 1.0
    if op == "all_reduce":
        return 2.0 * (num_ranks - 1) / num_ranks
    raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(OPS)}")


def parse_size(text: str) -> int:
    """'8', '64K', '16M', '1G' (powers of 1024, as nccl-tests' -b/-e) → bytes."""
    text = text.strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        value = int(text[: len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"size {text!r} is not a byte count like 8, 64K, 16M or 1G") from None
    if value < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """['300'] → every op 300 GB/s; ['all_reduce=300', 'sendrecv=250'] → per op."""
    thresholds: dict[str, float] = {}
    for item in items:
        op, _, value = item.rpartition("=")
        ops = [op] if op else list(OPS)
        for name in ops:
            if name not in OPS:
                raise ValueError(f"--min-busbw names unknown operation {name!r}; expected one of {', '.join(OPS)}")
            try:
                thresholds[name] = float(value)
            except ValueError:
                raise ValueError(f"--min-busbw value {value!r} is not a number of GB/s") from None
    return thresholds


@dataclass(frozen=True)
class PreflightConfig:
    num_procs: int
    device: str = "cuda"  # cuda: one process per GPU with NCCL; cpu: gloo
    ops: tuple[str, ...] = OPS
    sizes: tuple[int, ...] = ()
    dtype: str = "float32"
    warmup: int = 5
    iters: int = 20
    timeout_s: float = 120.0
    min_busbw: dict[str, float] = field(default_factory=dict)  # op → GB/s at the largest size

    def __post_init__(self) -> None:
        if self.num_procs < 2:
            raise ValueError(f"preflight needs at least 2 processes (GPUs), got {self.num_procs}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")
        if unknown := [op for op in self.ops if op not in OPS]:
            raise ValueError(f"unknown operations {unknown}; expected some of {', '.join(OPS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.sizes:
            raise ValueError("give at least one message size")
        element = DTYPES[self.dtype].itemsize
        if bad := [s for s in self.sizes if s % element]:
            raise ValueError(f"sizes {bad} are not multiples of the {self.dtype} element size ({element} bytes)")
        if self.warmup < 0 or self.iters < 1:
            raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup {self.warmup}, iters {self.iters}")

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


@dataclass(frozen=True)
class Measurement:
    op: str
    size_bytes: int
    count: int  # elements per rank
    dtype: str
    time_us: float
    algbw_gbps: float
    busbw_gbps: float
    num_wrong: int


@dataclass(frozen=True)
class PreflightReport:
    backend: str
    device: str
    num_ranks: int
    torch_version: str
    nccl_version: str
    device_names: list[str]
    results: list[Measurement]
    min_busbw: dict[str, float]
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)

    def table(self) -> str:
        """nccl-tests' columns, one block per operation."""
        lines = [
            f"# pdserve preflight: {self.num_ranks} ranks, {self.backend} on {self.device} "
            f"({', '.join(sorted(set(self.device_names)))}); torch {self.torch_version}, NCCL {self.nccl_version}",
            f"# {'op':>10} {'size (B)':>12} {'count':>12} {'type':>9} {'time (us)':>11} "
            f"{'algbw GB/s':>11} {'busbw GB/s':>11} {'#wrong':>6}",
        ]
        for m in self.results:
            lines.append(
                f"  {m.op:>10} {m.size_bytes:>12} {m.count:>12} {m.dtype:>9} {m.time_us:>11.1f} "
                f"{m.algbw_gbps:>11.2f} {m.busbw_gbps:>11.2f} {m.num_wrong:>6}"
            )
        lines += [f"# FAIL: {failure}" for failure in self.failures] or ["# PASS"]
        return "\n".join(lines)

    def markdown(self) -> str:
        names = ", ".join(sorted(set(self.device_names)))
        lines = [
            f"## pdserve preflight: {self.num_ranks} × {names}",
            "",
            f"{self.backend} on {self.device}, torch {self.torch_version}, NCCL {self.nccl_version}. "
            "nccl-tests' definitions: algbw = size / time, busbw = algbw × 1 (sendrecv) or "
            "× 2(n−1)/n (all_reduce); GB/s = 1e9 bytes/s; time averaged over iterations and ranks.",
            "",
            "| op | size (B) | dtype | time (µs) | algbw (GB/s) | busbw (GB/s) | #wrong |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for m in self.results:
            lines.append(
                f"| {m.op} | {m.size_bytes} | {m.dtype} | {m.time_us:.1f} | {m.algbw_gbps:.2f} | "
                f"{m.busbw_gbps:.2f} | {m.num_wrong} |"
            )
        thresholds = ", ".join(f"{op} ≥ {v:g} GB/s" for op, v in sorted(self.min_busbw.items())) or "none"
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        lines += ["", f"Thresholds (busbw at the largest size): {thresholds}. Result: **{verdict}**.", ""]
        return "\n".join(lines)


def check_thresholds(results: list[Measurement], min_busbw: dict[str, float]) -> list[str]:
    """Failures: any wrong result, and each op whose busbw at its largest size is under its threshold."""
    failures = [f"{m.op} at {m.size_bytes} B: {m.num_wrong} wrong elements" for m in results if m.num_wrong]
    for op, minimum in sorted(min_busbw.items()):
        measured = [m for m in results if m.op == op]
        if not measured:
            continue
        largest = max(measured, key=lambda m: m.size_bytes)
        if largest.busbw_gbps < minimum:
            failures.append(
                f"{op} busbw {largest.busbw_gbps:.2f} GB/s at {largest.size_bytes} B is under {minimum:g} GB/s"
            )
    return failures


# ----------------------------------------------------------------------------- per rank
def _ring_sendrecv(send: torch.Tensor, recv: torch.Tensor, rank: int, num_ranks: int) -> None:
    ops = [
        dist.P2POp(dist.isend, send, (rank + 1) % num_ranks),
        dist.P2POp(dist.irecv, recv, (rank - 1) % num_ranks),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def _run_op(op: str, send: torch.Tensor, recv: torch.Tensor, rank: int, num_ranks: int) -> None:
    if op == "sendrecv":
        _ring_sendrecv(send, recv, rank, num_ranks)
    else:
        dist.all_reduce(send)


def _count_wrong(op: str, send: torch.Tensor, recv: torch.Tensor, rank: int, num_ranks: int) -> int:
    """Run `op` once on known values and count the elements that come back wrong."""
    if recv is not send:
        recv.zero_()
    send.fill_(rank + 1)
    _run_op(op, send, recv, rank, num_ranks)
    if op == "sendrecv":
        got, want = recv, (rank - 1) % num_ranks + 1
    else:
        got, want = send, num_ranks * (num_ranks + 1) // 2
    return int((got != want).sum().item())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(config: PreflightConfig, device: torch.device, rank: int, num_ranks: int) -> list[Measurement]:
    dtype = DTYPES[config.dtype]
    results = []
    for op in config.ops:
        for size in config.sizes:
            count = size // dtype.itemsize
            send = torch.empty(count, dtype=dtype, device=device)
            recv = torch.empty_like(send) if op == "sendrecv" else send
            num_wrong = _count_wrong(op, send, recv, rank, num_ranks)
            send.zero_()  # timed all-reduces of zeros stay finite however many run
            for _ in range(config.warmup):
                _run_op(op, send, recv, rank, num_ranks)
            _synchronize(device)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(config.iters):
                _run_op(op, send, recv, rank, num_ranks)
            _synchronize(device)
            seconds = (time.perf_counter() - start) / config.iters
            # Average the time and sum the wrong counts over the ranks (nccl-tests' default).
            stats = torch.tensor([seconds, float(num_wrong)], dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            seconds, num_wrong = stats[0].item() / num_ranks, int(stats[1].item())
            algbw = size / seconds / 1e9
            results.append(
                Measurement(
                    op=op,
                    size_bytes=size,
                    count=count,
                    dtype=config.dtype,
                    time_us=seconds * 1e6,
                    algbw_gbps=algbw,
                    busbw_gbps=algbw * busbw_factor(op, num_ranks),
                    num_wrong=num_wrong,
                )
            )
            del send, recv
    return results


def _rank_main(rank: int, config: PreflightConfig, store_port: int, queue) -> None:
    num_ranks = config.num_procs
    timeout = datetime.timedelta(seconds=config.timeout_s)
    store = dist.TCPStore("127.0.0.1", store_port, num_ranks, False, timeout)
    if config.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=num_ranks, timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=num_ranks, timeout=timeout)
    try:
        results = _measure(config, device, rank, num_ranks)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        names: list[str | None] = [None] * num_ranks
        dist.all_gather_object(names, name)
        if rank == 0:
            queue.put((results, names))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_preflight(config: PreflightConfig) -> PreflightReport:
    """Start `config.num_procs` local processes, measure, and return rank 0's report."""
    if config.device == "cuda":
        available = torch.cuda.device_count()
        if available < config.num_procs:
            raise ValueError(f"preflight asks for {config.num_procs} GPUs; this host has {available} visible")
    timeout = datetime.timedelta(seconds=config.timeout_s)
    # The parent hosts the rendezvous: the port is bound before any child needs it.
    store = dist.TCPStore("127.0.0.1", 0, config.num_procs, True, timeout, wait_for_workers=False)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(
        _rank_main, args=(config, store.port, queue), nprocs=config.num_procs, join=True, start_method="spawn"
    )
    results, names = queue.get()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if config.device == "cuda" else "-"
    return PreflightReport(
        backend=config.backend,
        device=config.device,
        num_ranks=config.num_procs,
        torch_version=torch.__version__,
        nccl_version=nccl,
        device_names=list(names),
        results=results,
        min_busbw=dict(config.min_busbw),
        failures=check_thresholds(results, config.min_busbw),
    )


# ----------------------------------------------------------------------------- CLI
def add_preflight_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when a GPU is visible")
    p.add_argument(
        "--nprocs", type=int, default=None, help="processes, one per GPU (default: every visible GPU; 2 on CPU)"
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, some of {', '.join(OPS)}")
    p.add_argument("--sizes", default=None, help=f"message sizes per rank (default GPU {GPU_SIZES}, CPU {CPU_SIZES})")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the rendezvous and each collective")
    p.add_argument(
        "--min-busbw",
        action="append",
        default=[],
        metavar="[OP=]GBPS",
        help="fail when busbw at the largest size is under this (GB/s); repeatable, per op with OP=",
    )
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--markdown", default=None, help="write the report as a Markdown table here")


def config_from_args(args: argparse.Namespace) -> PreflightConfig:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    num_procs = args.nprocs or (torch.cuda.device_count() if device == "cuda" else 2)
    sizes = args.sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES)
    return PreflightConfig(
        num_procs=num_procs,
        device=device,
        ops=tuple(op.strip() for op in args.ops.split(",") if op.strip()),
        sizes=tuple(parse_size(s) for s in sizes.split(",") if s.strip()),
        dtype=args.dtype,
        warmup=args.warmup,
        iters=args.iters,
        timeout_s=args.timeout,
        min_busbw=parse_thresholds(args.min_busbw),
    )


def run(args: argparse.Namespace) -> int:
    report = run_preflight(config_from_args(args))
    print(report.table(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json() + "\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown())
    if not report.passed:
        print("pdserve preflight: FAILED: " + "; ".join(report.failures), file=sys.stderr)
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.preflight ...`: the same as `pdserve preflight`, without the CLI's imports."""
    parser = argparse.ArgumentParser(prog="pdserve preflight", description=__doc__.splitlines()[0])
    add_preflight_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    # Run the importable module's main, so the spawned ranks unpickle `cluster.preflight` functions.
    from cluster.preflight import main as preflight_main

    sys.exit(preflight_main())
