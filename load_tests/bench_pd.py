"""End-to-end PD benchmarks: disaggregated vs colocated on the same GPUs (a script, not a test).

    python -m load_tests.bench_pd ttft    --gpus 2 [--prompt-len 4096]
    python -m load_tests.bench_pd goodput --gpus 2|4 [--slo "ttft:1000 tpot:50"]
    python -m load_tests.bench_pd shift   --gpus 4 [--phase-seconds 60] [--reuse-cluster]
        [--model ernie-4.5-21b-a3b] [--device cuda] [--out benchmarks/results]

ttft     TTFT overhead of disaggregation: the same prompts, one request at a time, on 1 prefill + 1
         decode worker (the KV crosses GPUs) and on one `mixed` worker. Overhead = median TTFT
         (PD) / median TTFT (mixed) - 1.
goodput  The highest request rate whose requests meet the SLO at the given attainment (DistServe's
         goodput; the search of `pdserve bench search`: double from --start-rate while the SLO
         holds, halve while it does not, then bisect to --tolerance or --max-runs) for a mixed
         workload on `--gpus` GPUs: disaggregated (half prefill, half decode workers) vs colocated
         (`mixed` workers with chunked prefill).
shift    A workload whose mix shifts mid-run (a prefill-heavy phase, then a decode-heavy one, each
         `--phase-seconds` at a fixed rate): every static split of `--gpus` workers, and the
         even split with the role planner flipping workers. Goodput = requests that met the SLO
         per second of the whole run. The dynamic row runs first. `--reuse-cluster` starts one
         cluster and sets each static split by flipping roles (`SetRole`) instead of starting a
         cluster per split (one start-up instead of `--gpus`).

How it measures. This script starts each cluster itself (the `pdserve up` launcher), sends
`--warmup` unrecorded requests with a seed of their own, then drives every measured run through
the load-test harness (`pdserve bench run --url`). Every run gets a seed of its own: the workers
keep freed KV blocks in their prefix cache, so a run that re-sent an earlier run's prompts (as
`pdserve bench search` and `--warmup` do) would be served from the cache and skip prefill.
One worker per GPU (`--device cuda` gives worker i GPU i; CUDA_VISIBLE_DEVICES picks which GPUs).
Every port is picked free by the OS, so several benchmarks can run at once on disjoint GPUs.
The router and the workers get `--max-model-len` large enough for the workload when their default
(4096) is not (or --max-model-len: set it here, not through --worker-arg, so the router agrees).

Outputs. Every load run is the harness's, under `--out/pd_<name>_<gpus>gpu/<shape>/...`
(summary.json, report.md, per-request rows). Each benchmark writes `pd_<name>_<gpus>gpu_<device>.json`
and `.md` to --out with device, date, commit, cluster start-up times and wall time; they are
rewritten after every shape (and every goodput run) with `"complete": false`, so a run cut short
by a time limit leaves what it measured. SIGTERM stops the clusters before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cluster import cli
from cluster.launcher import ClusterSpec, LocalCluster
from cluster.planner import Planner, PlannerConfig, set_role
from cluster.registry import RegistryUnavailable, make_registry
from load_tests.metrics import Slo
from load_tests.workload import LengthDist
from protos.pdserve.v1 import common_pb2, worker_pb2

DEFAULT_MAX_MODEL_LEN = 4096  # the router's and the workers' --max-model-len default
WARMUP_SEED = 987_654  # warm-up prompts never share a prefix with measured ones
WARMUP_OUTPUT = 8
RUN_KEYS = (
    "num_sent", "completed", "failed", "duration", "slo_attainment", "num_good", "request_goodput",
    "median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "output_throughput",
)  # fmt: skip
Save = Callable[[dict[str, Any]], None]
_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench_pd +{time.monotonic() - _T0:6.1f} s] {message}", flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return device
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout
        return out.splitlines()[0].strip() or device
    except (OSError, IndexError):
        return device


def read_runs(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "summary.json").read_text())["runs"]


def bench(argv: list[str]) -> None:
    code = cli.main(["bench", *argv, "--no-plots", "--quiet"])
    if code != 0:
        raise RuntimeError(f"pdserve bench {' '.join(argv)} exited with {code}")


def shape_arg(num_prefill: int, num_decode: int, num_mixed: int) -> str:
    return f"{num_prefill}:{num_decode}:{num_mixed}"


def pick(run: dict[str, Any], keys=RUN_KEYS) -> dict[str, Any]:
    return {key: run.get(key) for key in keys}


# --------------------------------------------------------------------------------------------- clusters


def model_len(args: argparse.Namespace, longest: int) -> int:
    """--max-model-len for the router and the workers: --max-model-len if given, else large enough
    for `longest` (prompt + output tokens a request may need) when their default is not; 0: default."""
    if args.max_model_len:
        return args.max_model_len
    return -(-(longest + 1) // 1024) * 1024 if longest + 1 > DEFAULT_MAX_MODEL_LEN else 0


class _Cluster(LocalCluster):
    """LocalCluster that appends each process's pid to `pid_file` as it spawns it (a session script
    that had to SIGKILL this benchmark can then stop exactly those processes)."""

    pid_file: Path | None = None

    def _spawn(self, name: str, argv, num_gpus: int = 0):
        process = super()._spawn(name, argv, num_gpus)
        if self.pid_file is not None:
            with self.pid_file.open("a") as f:
                f.write(f"{process.popen.pid} {name}\n")
        return process


@contextlib.contextmanager
def started(args: argparse.Namespace, shape: tuple[int, int, int], longest: int, row: dict) -> Iterator[LocalCluster]:
    """A local cluster of `shape` (router + one worker per GPU), stopped on exit; its start-up
    time goes to row["cluster_start_s"]."""
    num_prefill, num_decode, num_mixed = shape
    length = model_len(args, longest)
    flag = (f"--max-model-len={length}",) if length else ()
    spec = ClusterSpec(
        model=args.model, num_prefill=num_prefill, num_decode=num_decode, num_mixed=num_mixed, device=args.device,
        router_port=0, http_port=-1, worker_args=(*flag, *args.worker_arg), router_args=flag,
    )  # fmt: skip
    log(f"starting {shape_arg(*shape)} ({args.model} on {args.device}; workers: {' '.join(spec.worker_args)})")
    began = time.monotonic()
    cluster = _Cluster(spec)
    cluster.pid_file = args.pid_file
    with cluster:
        row["cluster_start_s"] = round(time.monotonic() - began, 1)
        log(f"cluster {shape_arg(*shape)} serving at {cluster.address} after {row['cluster_start_s']} s")
        yield cluster
        log(f"stopping {shape_arg(*shape)}")


def load_run(
    args: argparse.Namespace,
    address: str,
    out: Path,
    *,
    seed: int,
    input_len: str,
    output_len: str,
    num_prompts: int,
    gpus: int,
    rate: float | None = None,
    concurrency: int | None = None,
    max_duration: float = 120.0,
    slo: bool = True,
) -> dict[str, Any]:
    """One `pdserve bench run` against a running router; returns its summary."""
    argv = ["run", "--url", address, "--model", args.model, "--seed", str(seed), "--input-len", input_len]
    argv += ["--output-len", output_len, "--num-prompts", str(num_prompts), "--gpus", str(gpus), "--out", str(out)]
    argv += ["--max-duration", str(max_duration), "--drain-timeout", str(args.drain_timeout)]
    if slo and args.slo:
        argv += ["--slo", args.slo, "--attainment", str(args.attainment)]
    if rate is not None:
        argv += ["--request-rate", repr(float(rate))]
    if concurrency is not None:
        argv += ["--max-concurrency", str(concurrency)]
    elif args.client_procs > 1:
        argv += ["--client-procs", str(args.client_procs)]
    began = time.monotonic()
    bench(argv)
    run = read_runs(out)[0]
    run["wall_s"] = round(time.monotonic() - began, 1)
    log(
        f"{out.relative_to(args.out)}: {run['completed']}/{run['num_sent']} ok"
        + (f" at {rate:.3g} req/s" if rate is not None else "")
        + f", median TTFT {_ms(run.get('median_ttft_ms'))}, p90 TPOT {_ms(run.get('p90_tpot_ms'))}"
        + (f", attainment {run['slo_attainment']:.1%}" if run.get("slo_attainment") is not None else "")
        + f" ({run['wall_s']} s)"
    )
    return run


def warm(args: argparse.Namespace, cluster: LocalCluster, out: Path, input_len: str, gpus: int) -> None:
    """Unrecorded requests (their own prompts) so that first-use compiles are not measured."""
    if args.warmup > 0:
        load_run(
            args, cluster.address, out, seed=WARMUP_SEED, input_len=input_len, output_len=f"fixed:{WARMUP_OUTPUT}",
            num_prompts=args.warmup, gpus=gpus, concurrency=min(4, args.warmup), slo=False,
        )  # fmt: skip


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


# --------------------------------------------------------------------------------------------- ttft


def run_ttft(args: argparse.Namespace, folder: Path, save: Save) -> dict[str, Any]:
    shapes = {"disaggregated": (1, 1, 0), "colocated": (0, 0, 1)}
    requests = args.requests or 20
    result: dict[str, Any] = {"prompt_len": args.prompt_len, "requests": requests, "shapes": {}, "ttft_overhead": None}
    for name, shape in shapes.items():
        row: dict[str, Any] = {"shape": shape_arg(*shape)}
        with started(args, shape, args.prompt_len + max(4, WARMUP_OUTPUT), row) as cluster:
            warm(args, cluster, folder / "warmup" / name, f"fixed:{args.prompt_len}", sum(shape))
            run = load_run(
                args, cluster.address, folder / name, seed=args.seed, input_len=f"fixed:{args.prompt_len}",
                output_len="fixed:4", num_prompts=requests, gpus=sum(shape), concurrency=1, slo=False,
                max_duration=600.0,
            )  # fmt: skip
        row.update(pick(run, ("median_ttft_ms", "p90_ttft_ms", "mean_ttft_ms", "completed", "failed")))
        result["shapes"][name] = row
        save(result)
    rows = result["shapes"]
    if rows["colocated"]["median_ttft_ms"] and rows["disaggregated"]["median_ttft_ms"] is not None:
        result["ttft_overhead"] = rows["disaggregated"]["median_ttft_ms"] / rows["colocated"]["median_ttft_ms"] - 1
    return result


# --------------------------------------------------------------------------------------------- goodput


def search_rate(passes: Callable[[float], bool], start: float, max_runs: int, tolerance: float) -> tuple:
    """(highest passing rate, lowest failing rate): `load_tests.modes.search`'s walk (double while
    passing, halve while failing, then bisect until within `tolerance` or `max_runs` are spent)."""
    good: float | None = None
    bad: float | None = None
    runs = 0
    rate = start
    while runs < max_runs:
        runs += 1
        if passes(rate):
            good = rate if good is None else max(good, rate)
            if bad is not None:
                break
            rate *= 2
        else:
            bad = rate if bad is None else min(bad, rate)
            if good is not None or rate / 2 < 0.01:
                break
            rate /= 2
    while good is not None and bad is not None and runs < max_runs and (bad - good) / good > tolerance:
        runs += 1
        rate = (good + bad) / 2
        if passes(rate):
            good = rate
        else:
            bad = rate
    return good, bad


def _longest(*dists: str) -> int:
    """Prompt + output tokens of all but a 1e-4 tail of requests."""
    return sum(math.ceil(LengthDist.parse(d).quantile(0.9999)) for d in dists)


def run_goodput(args: argparse.Namespace, folder: Path, save: Save) -> dict[str, Any]:
    gpus = args.gpus
    shapes = {"disaggregated": (gpus // 2, gpus - gpus // 2, 0), "colocated": (0, 0, gpus)}
    shapes = {name: shape for name, shape in shapes.items() if name in args.shapes}
    cap = args.requests or 2000
    longest = max(_longest(args.input_len, args.output_len), _longest(args.input_len, f"fixed:{WARMUP_OUTPUT}"))
    result: dict[str, Any] = {
        "slo": args.slo, "attainment": args.attainment, "input_len": args.input_len, "output_len": args.output_len,
        "seconds_per_run": args.seconds_per_run, "shapes": {}, "ratio": None,
    }  # fmt: skip
    for name, shape in shapes.items():
        row: dict[str, Any] = {"shape": shape_arg(*shape), "goodput_rps": 0.0, "runs": []}
        result["shapes"][name] = row
        with started(args, shape, longest, row) as cluster:
            warm(args, cluster, folder / "warmup" / name, args.input_len, gpus)

            def passes(rate: float, row=row, cluster=cluster, name=name) -> bool:
                k = len(row["runs"]) + 1
                num = min(cap, max(10, math.ceil(rate * args.seconds_per_run)))
                run = load_run(
                    args, cluster.address, folder / name / f"run-{k:02d}-rate-{rate:.4g}", seed=args.seed + k,
                    input_len=args.input_len, output_len=args.output_len, num_prompts=num, gpus=gpus, rate=rate,
                    max_duration=1.5 * args.seconds_per_run + 5,
                )  # fmt: skip
                passed = bool(run["slo_met"])
                row["runs"].append({"rate": rate, "passed": passed, **pick(run), "wall_s": run["wall_s"]})
                _goodput_so_far(result, row, gpus)  # what a cut-short search leaves
                save(result)
                return passed

            search_rate(passes, args.start_rate, args.max_runs, args.tolerance)
    return result


def _goodput_so_far(result: dict[str, Any], row: dict[str, Any], gpus: int) -> None:
    """The shape's goodput (highest passing rate measured) and the ratio, from the runs so far."""
    passing = [run["rate"] for run in row["runs"] if run["passed"]]
    failing = [run["rate"] for run in row["runs"] if not run["passed"]]
    best = max(passing, default=0.0)
    row.update(goodput_rps=best, goodput_rps_per_gpu=best / gpus, lowest_failing_rps=min(failing, default=None))
    shapes = result["shapes"]
    if "colocated" in shapes and shapes["colocated"]["runs"]:
        colocated = shapes["colocated"]["goodput_rps"]
        result["ratio"] = shapes["disaggregated"]["goodput_rps"] / colocated if colocated else None


# --------------------------------------------------------------------------------------------- shift

PHASES = (
    ("prefill-heavy", "fixed:{long}", "fixed:16"),
    ("decode-heavy", "fixed:128", "fixed:{long_out}"),
)


def _planner_thread(registry_url: str, stop: threading.Event, planner: Planner) -> threading.Thread:
    """Run `planner` against the cluster's registry on a thread of its own until `stop` is set."""

    async def main() -> None:
        registry = make_registry(registry_url)
        task = asyncio.create_task(planner.run(registry))
        while not stop.is_set():
            await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await registry.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


async def _set_prefill_workers(registry_url: str, num_prefill: int, timeout_s: float = 120.0) -> list[str]:
    """Flip prefill <-> decode workers (one at a time, idle, so no drain) until `num_prefill` are
    prefill workers; returns what was flipped. Waits until every worker is READY first (a flip the
    planner started may still be draining) and until the registry shows the new roles after."""
    prefill, decode = common_pb2.WORKER_ROLE_PREFILL, common_pb2.WORKER_ROLE_DECODE
    registry = make_registry(registry_url)
    deadline = time.monotonic() + timeout_s

    async def settled() -> list:
        while True:
            with contextlib.suppress(RegistryUnavailable):
                records = await registry.list_workers()
                if records and all(r.info.state == common_pb2.WORKER_STATE_READY for r in records):
                    return records
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not all become READY within {timeout_s:.0f} s")
            await asyncio.sleep(0.2)

    try:
        records = await settled()
        ids = {role: sorted(r.info.worker_id for r in records if r.info.role == role) for role in (prefill, decode)}
        missing = num_prefill - len(ids[prefill])
        donors = ids[decode][:missing] if missing > 0 else ids[prefill][:-missing]
        target = "prefill" if missing > 0 else "decode"
        for worker_id in donors:
            response = await set_role(registry, worker_id, target, drain_timeout_s=30.0)
            if response.result not in (worker_pb2.SET_ROLE_RESULT_OK, worker_pb2.SET_ROLE_RESULT_NOOP):
                raise RuntimeError(
                    f"{worker_id} -> {target}: {worker_pb2.SetRoleResult.Name(response.result)} {response.message}"
                )
            await settled()
        while True:
            records = await settled()
            if sum(r.info.role == prefill for r in records) == num_prefill:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the registry does not show {num_prefill} prefill workers after the flips")
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # the router re-reads the registry every 0.25 s
        return [f"{worker_id} -> {target}" for worker_id in donors]
    finally:
        await registry.close()


def _phases(args: argparse.Namespace, cluster: LocalCluster, out: Path, seed: int) -> list[dict[str, Any]]:
    expected = args.phase_rate * args.phase_seconds
    num = math.ceil(expected + 4 * math.sqrt(expected)) + 10  # Poisson arrivals: enough for the whole phase
    phases = []
    for index, (phase, input_len, output_len) in enumerate(PHASES):
        run = load_run(
            args, cluster.address, out / phase, seed=seed + index, input_len=input_len.format(long=args.long_len),
            output_len=output_len.format(long_out=args.long_output), num_prompts=num, gpus=args.gpus,
            rate=args.phase_rate, max_duration=args.phase_seconds,
        )  # fmt: skip
        phases.append({"phase": phase, **pick(run), "wall_s": run["wall_s"]})
    return phases


def _planner_config(args: argparse.Namespace) -> PlannerConfig:
    slo = Slo.parse(args.slo)
    targets = {}
    if slo.ttft_ms:
        targets["ttft_slo_s"] = slo.ttft_ms / 1000
    if slo.tpot_ms:
        targets["itl_slo_s"] = slo.tpot_ms / 1000
    return PlannerConfig(window_s=1.0, sustain_windows=2, cooldown_s=args.phase_seconds / 4, **targets)


def run_shift(args: argparse.Namespace, folder: Path, save: Save) -> dict[str, Any]:
    gpus = args.gpus
    even = gpus // 2
    dynamic_name = f"dynamic from {even}P:{gpus - even}D"
    # The dynamic row first (it is the point of the benchmark), then the static splits from the even one out.
    order = [(dynamic_name, even, True)]
    order += [(f"static {p}P:{gpus - p}D", p, False) for p in sorted(range(1, gpus), key=lambda p: (abs(p - even), p))]
    longest = max(args.long_len + 16, 128 + args.long_output, args.long_len + WARMUP_OUTPUT)
    result: dict[str, Any] = {
        "slo": args.slo, "phase_rate": args.phase_rate, "phase_seconds": args.phase_seconds,
        "long_len": args.long_len, "long_output": args.long_output, "reuse_cluster": args.reuse_cluster,
        "shapes": {}, "ratio_vs_best_static": None, "attainment_vs_best_static": None,
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        shared: LocalCluster | None = None
        for index, (name, num_prefill, dynamic) in enumerate(order):
            row: dict[str, Any] = {"shape": shape_arg(num_prefill, gpus - num_prefill, 0)}
            out = folder / name.replace(" ", "_").replace(":", "-")
            with contextlib.ExitStack() as own:
                if shared is None:
                    cluster = (stack if args.reuse_cluster else own).enter_context(
                        started(args, (num_prefill, gpus - num_prefill, 0), longest, row)
                    )
                    shared = cluster if args.reuse_cluster else None
                else:
                    cluster = shared
                    began = time.monotonic()
                    row["role_flips"] = asyncio.run(_set_prefill_workers(cluster.registry_url, num_prefill))
                    row["role_flips_s"] = round(time.monotonic() - began, 1)
                    log(f"{name}: {', '.join(row['role_flips']) or 'no flip needed'} ({row['role_flips_s']} s)")
                if "cluster_start_s" in row:  # a fresh cluster (a reused one is warm already)
                    warm(args, cluster, folder / "warmup" / out.name, f"fixed:{args.long_len}", gpus)
                planner = Planner(_planner_config(args))
                stop = threading.Event()
                thread = _planner_thread(cluster.registry_url, stop, planner) if dynamic else None
                try:
                    # Fresh clusters: every split gets the same prompts and arrival times. One cluster:
                    # prompts of their own (the prefix cache would serve repeats without prefill).
                    seed = args.seed + 1 + (100 * index if args.reuse_cluster else 0)
                    row["phases"] = _phases(args, cluster, out, seed)
                finally:
                    stop.set()
                    if thread is not None:
                        thread.join(timeout=10)
            seconds = sum(p["duration"] for p in row["phases"])
            good = sum(p["num_good"] or 0 for p in row["phases"])
            row["goodput_rps"] = good / seconds if seconds else 0.0
            sent = sum(p["num_sent"] for p in row["phases"])
            row["attainment"] = good / sent if sent else None  # not swayed by how many arrivals a draw gave
            row["flips"] = {"/".join(key): n for key, n in planner.decisions.items()} if dynamic else {}
            result["shapes"][name] = row
            _shift_ratios(result, dynamic_name)  # over the static splits measured so far
            save(result)
    return result


def _shift_ratios(result: dict[str, Any], dynamic_name: str) -> None:
    rows = result["shapes"]
    static = [row for name, row in rows.items() if name.startswith("static")]
    if dynamic_name not in rows or not static:
        return
    for key, metric in (("ratio_vs_best_static", "goodput_rps"), ("attainment_vs_best_static", "attainment")):
        best = max(row[metric] or 0.0 for row in static)
        result[key] = (rows[dynamic_name][metric] or 0.0) / best if best else None


# --------------------------------------------------------------------------------------------- output


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]


def markdown(name: str, result: dict[str, Any]) -> str:
    res = result["result"]
    status = "complete" if result["complete"] else "INCOMPLETE (cut short: partial results)"
    lines = [f"# PD benchmark `{name}` — {result['model']} on {result['gpus']}x {result['device']}", ""]
    lines += [f"{result['date']}, commit {result['commit']}, {result['wall_s']} s wall, {status}", ""]
    shapes = res.get("shapes", {})
    if name == "ttft":
        lines += _table(
            ["shape", "median TTFT ms", "p90 TTFT ms", "mean TTFT ms", "completed", "cluster start s"],
            [[k, r.get("median_ttft_ms"), r.get("p90_ttft_ms"), r.get("mean_ttft_ms"), r.get("completed"),
              r.get("cluster_start_s")] for k, r in shapes.items()],
        )  # fmt: skip
        lines += [f"TTFT overhead of disaggregation: {res.get('ttft_overhead')}", ""]
    elif name == "goodput":
        lines += _table(
            ["shape", "P:D:M", "goodput req/s", "per GPU", "lowest failing req/s", "runs", "cluster start s"],
            [[k, r["shape"], r.get("goodput_rps"), r.get("goodput_rps_per_gpu"), r.get("lowest_failing_rps"),
              len(r["runs"]), r.get("cluster_start_s")] for k, r in shapes.items()],
        )  # fmt: skip
        lines += _table(
            ["shape", "rate", "met SLO", "attainment", "p90 TTFT ms", "p90 TPOT ms", "completed/sent", "wall s"],
            [[k, run["rate"], run["passed"], run["slo_attainment"], run["p90_ttft_ms"], run["p90_tpot_ms"],
              f"{run['completed']}/{run['num_sent']}", run["wall_s"]] for k, r in shapes.items() for run in r["runs"]],
        )  # fmt: skip
        lines += [f"goodput disaggregated / colocated: {res.get('ratio')}", ""]
    elif name == "shift":
        lines += _table(
            ["shape", "goodput req/s", "attainment", "phase", "phase attainment", "p90 TTFT ms", "p90 TPOT ms",
             "completed/sent", "flips"],
            [[k, r["goodput_rps"], r["attainment"], p["phase"], p["slo_attainment"], p["p90_ttft_ms"], p["p90_tpot_ms"],
              f"{p['completed']}/{p['num_sent']}", json.dumps(r.get("flips")) if r.get("flips") else None]
             for k, r in shapes.items() for p in r["phases"]],
        )  # fmt: skip
        lines += [
            f"dynamic / best static, goodput: {res.get('ratio_vs_best_static')}, "
            f"attainment: {res.get('attainment_vs_best_static')}",
            "",
        ]
    return "\n".join(lines + ["```json", json.dumps(res, indent=2), "```", ""])


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the `with` blocks: the clusters' processes are stopped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ttft", "goodput", "shift"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="ernie-4.5-21b-a3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="extra worker argument (--worker-arg=--flag=N, repeatable)"
    )
    parser.add_argument("--max-model-len", type=int, default=0, help="router's and workers' (0: fit the workload)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--git-commit", default=None)
    parser.add_argument(
        "--client-procs", type=int, default=1, help="load-generating processes per run (~10k streamed tokens/s each)"
    )
    parser.add_argument("--pid-file", type=Path, default=None, help="append the pid of every process started")
    parser.add_argument("--seed", type=int, default=0, help="first workload seed (every run adds its own offset)")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded requests after each cluster start")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="s for in-flight requests after each run")
    parser.add_argument("--slo", default="ttft:1000 tpot:50")
    parser.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLO")
    parser.add_argument("--prompt-len", type=int, default=4096, help="ttft")
    parser.add_argument(
        "--requests", type=int, default=None, help="ttft: requests per shape (20); goodput: per run at most (2000)"
    )
    parser.add_argument("--input-len", default="lognormal:1024:0.8", help="goodput")
    parser.add_argument("--output-len", default="lognormal:256:0.8", help="goodput")
    parser.add_argument("--start-rate", type=float, default=2.0, help="goodput: req/s of the first run")
    parser.add_argument("--max-runs", type=int, default=6, help="goodput: runs per shape at most")
    parser.add_argument("--tolerance", type=float, default=0.1, help="goodput: stop at this pass/fail gap")
    parser.add_argument(
        "--shapes",
        default="disaggregated,colocated",
        help="goodput: the shapes to search, comma-separated (one alone: e.g. to compare commits at one rate)",
    )
    parser.add_argument("--seconds-per-run", type=float, default=30.0, help="goodput: rate x this many s of requests")
    parser.add_argument("--phase-seconds", type=float, default=60.0, help="shift")
    parser.add_argument("--phase-rate", type=float, default=4.0, help="shift: requests/s in each phase")
    parser.add_argument("--long-len", type=int, default=4096, help="shift: prompt tokens in the prefill-heavy phase")
    parser.add_argument("--long-output", type=int, default=512, help="shift: output tokens in the decode-heavy phase")
    parser.add_argument(
        "--reuse-cluster", action="store_true", help="shift: one cluster, static splits set by role flips"
    )
    args = parser.parse_args(argv)
    if args.gpus < 2:
        parser.error(f"--gpus must be >= 2 (one prefill and one decode worker at least), got {args.gpus}")
    args.shapes = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = sorted(set(args.shapes) - {"disaggregated", "colocated"})
    if unknown or not args.shapes:
        parser.error(f"--shapes takes disaggregated and/or colocated, got {unknown or 'nothing'}")
    folder = args.out / f"pd_{args.what}_{args.gpus}gpu"
    runner = {"ttft": run_ttft, "goodput": run_goodput, "shift": run_shift}[args.what]
    began = time.monotonic()
    result = {
        "benchmark": args.what,
        "model": args.model,
        "gpus": args.gpus,
        "device": device_name(args.device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": args.git_commit or git_commit(),
        "argv": argv if argv is not None else sys.argv[1:],
        "complete": False,
        "wall_s": 0.0,
        "result": {},
    }
    stem = f"pd_{args.what}_{args.gpus}gpu_{result['device'].replace(' ', '_')}"
    args.out.mkdir(parents=True, exist_ok=True)

    def save(partial: dict[str, Any], complete: bool = False) -> None:
        result.update(result=partial, complete=complete, wall_s=round(time.monotonic() - began, 1))
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(args.what, result))

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        save(runner(args, folder, save), complete=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(json.dumps(result["result"], indent=2))
    print(f"wrote {args.out / stem}.json and .md ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
