"""End-to-end PD benchmarks: disaggregated vs colocated on the same GPUs (a script, not a test).

    python -m load_tests.bench_pd ttft    --gpus 2 [--prompt-len 4096]
    python -m load_tests.bench_pd goodput --gpus 2|4 [--slo "ttft:1000 tpot:50"]
    python -m load_tests.bench_pd shift   --gpus 4 [--phase-seconds 60]
        [--model ernie-4.5-21b-a3b] [--device cuda] [--out benchmarks/results]

ttft     TTFT overhead of disaggregation: the same prompt, one request at a time, on 1 prefill + 1
         decode worker (the KV crosses GPUs) and on one `mixed` worker. Overhead = median TTFT
         (PD) / median TTFT (mixed) - 1.
goodput  The highest request rate whose requests meet the SLO at the given attainment (DistServe's
         goodput, `pdserve bench search`) for a mixed workload, on `--gpus` GPUs: disaggregated
         (half prefill, half decode workers) vs colocated (`mixed` workers with chunked prefill).
shift    A workload whose mix shifts mid-run (a prefill-heavy phase, then a decode-heavy one, each
         `--phase-seconds` at a fixed rate): every static split of `--gpus` workers, and the
         even split with the role planner flipping workers. Goodput = requests that met the SLO
         per second of the whole run.

One worker per GPU (`--device cuda` gives worker i GPU i). Every load run is the load-test
harness's (`pdserve bench run|search`), whose own results land under
`--out/pd_<name>_<gpus>gpu/<shape>/`. Each benchmark writes `pd_<name>_<gpus>gpu_<device>.json`
and `.md` to --out with device, date and commit.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

from cluster import cli
from cluster.launcher import ClusterSpec, LocalCluster
from cluster.planner import Planner, PlannerConfig
from cluster.registry import make_registry


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


def common_args(args: argparse.Namespace) -> list[str]:
    worker = [arg for extra in args.worker_arg for arg in ("--worker-arg", extra)]
    return ["--model", args.model, "--device", args.device, *worker]


def shape_arg(num_prefill: int, num_decode: int, num_mixed: int) -> str:
    return f"{num_prefill}:{num_decode}:{num_mixed}"


# ---------------------------------------------------------------------------------------------


def run_ttft(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    shapes = {"disaggregated": (1, 1, 0), "colocated": (0, 0, 1)}
    rows = {}
    for name, shape in shapes.items():
        out = folder / name
        bench(
            ["run", "--local", shape_arg(*shape), *common_args(args), "--input-len", f"fixed:{args.prompt_len}"]
            + ["--output-len", "fixed:4", "--num-prompts", str(args.requests), "--max-concurrency", "1"]
            + ["--warmup", "2", "--out", str(out), "--gpus", str(sum(shape))]
        )
        run = read_runs(out)[0]
        rows[name] = {key: run[key] for key in ("median_ttft_ms", "p90_ttft_ms", "mean_ttft_ms", "completed")}
    overhead = rows["disaggregated"]["median_ttft_ms"] / rows["colocated"]["median_ttft_ms"] - 1
    return {"prompt_len": args.prompt_len, "requests": args.requests, "shapes": rows, "ttft_overhead": overhead}


def run_goodput(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    gpus = args.gpus
    shapes = {"disaggregated": (gpus // 2, gpus - gpus // 2, 0), "colocated": (0, 0, gpus)}
    rows = {}
    for name, shape in shapes.items():
        out = folder / name
        bench(
            ["search", "--local", shape_arg(*shape), *common_args(args), "--slo", args.slo]
            + ["--input-len", args.input_len, "--output-len", args.output_len, "--num-prompts", str(args.requests)]
            + ["--start-rate", str(args.start_rate), "--max-runs", str(args.max_runs)]
            + ["--seconds-per-run", str(args.seconds_per_run), "--out", str(out), "--gpus", str(gpus)]
        )
        study = json.loads((out / "summary.json").read_text())
        rows[name] = {"shape": shape_arg(*shape), "search": study.get("search"), "runs": len(study["runs"])}
        rows[name]["goodput_rps"] = (study.get("search") or {}).get("goodput_rate") or 0.0
    colocated = rows["colocated"]["goodput_rps"]
    ratio = rows["disaggregated"]["goodput_rps"] / colocated if colocated else None
    return {"slo": args.slo, "input_len": args.input_len, "output_len": args.output_len, "shapes": rows, "ratio": ratio}


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
        await registry.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


def run_shift(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    gpus = args.gpus
    shapes = {f"static {p}P:{gpus - p}D": (p, gpus - p, False) for p in range(1, gpus)}
    shapes[f"dynamic from {gpus // 2}P:{gpus - gpus // 2}D"] = (gpus // 2, gpus - gpus // 2, True)
    rows = {}
    for name, (num_prefill, num_decode, dynamic) in shapes.items():
        spec = ClusterSpec(
            model=args.model, num_prefill=num_prefill, num_decode=num_decode, device=args.device,
            router_port=0, http_port=-1, worker_args=tuple(args.worker_arg),
        )  # fmt: skip
        planner = Planner(PlannerConfig(window_s=1.0, sustain_windows=2, cooldown_s=args.phase_seconds / 4))
        stop = threading.Event()
        with LocalCluster(spec) as cluster:
            thread = _planner_thread(cluster.registry_url, stop, planner) if dynamic else None
            phases = []
            try:
                for phase, input_len, output_len in PHASES:
                    out = folder / name.replace(" ", "_").replace(":", "-") / phase
                    bench(
                        ["run", "--url", cluster.address, "--model", args.model, "--slo", args.slo]
                        + ["--input-len", input_len.format(long=args.long_len)]
                        + ["--output-len", output_len.format(long_out=args.long_output)]
                        + ["--request-rate", str(args.phase_rate), "--num-prompts", "100000"]
                        + ["--max-duration", str(args.phase_seconds), "--out", str(out), "--gpus", str(gpus)]
                    )
                    run = read_runs(out)[0]
                    phases.append({"phase": phase, **{k: run[k] for k in ("num_good", "completed", "duration")}})
            finally:
                stop.set()
                if thread is not None:
                    thread.join(timeout=10)
        seconds = sum(p["duration"] for p in phases)
        rows[name] = {
            "phases": phases,
            "goodput_rps": sum(p["num_good"] for p in phases) / seconds if seconds else 0.0,
            "flips": {"/".join(key): n for key, n in planner.decisions.items()} if dynamic else {},
        }
    static = [row["goodput_rps"] for name, row in rows.items() if name.startswith("static")]
    dynamic = next(row["goodput_rps"] for name, row in rows.items() if name.startswith("dynamic"))
    best = max(static)
    return {"slo": args.slo, "phase_rate": args.phase_rate, "shapes": rows, "ratio_vs_best_static": dynamic / best}


def markdown(name: str, result: dict[str, Any]) -> str:
    lines = [f"# PD benchmark `{name}` — {result['model']} on {result['gpus']}x {result['device']}", ""]
    lines += [f"{result['date']}, commit {result['commit']}", "", "```json", json.dumps(result["result"], indent=2)]
    return "\n".join(lines + ["```", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ttft", "goodput", "shift"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="ernie-4.5-21b-a3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--worker-arg", action="append", default=[], help="extra worker argument (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--git-commit", default=None)
    parser.add_argument("--prompt-len", type=int, default=4096, help="ttft")
    parser.add_argument("--requests", type=int, default=20, help="ttft: requests per shape; goodput: per run")
    parser.add_argument("--slo", default="ttft:1000 tpot:50")
    parser.add_argument("--input-len", default="lognormal:1024:0.8", help="goodput")
    parser.add_argument("--output-len", default="lognormal:256:0.8", help="goodput")
    parser.add_argument("--start-rate", type=float, default=2.0, help="goodput")
    parser.add_argument("--max-runs", type=int, default=6, help="goodput")
    parser.add_argument("--seconds-per-run", type=float, default=30.0, help="goodput")
    parser.add_argument("--phase-seconds", type=float, default=60.0, help="shift")
    parser.add_argument("--phase-rate", type=float, default=4.0, help="shift: requests/s in each phase")
    parser.add_argument("--long-len", type=int, default=4096, help="shift: prompt tokens in the prefill-heavy phase")
    parser.add_argument("--long-output", type=int, default=512, help="shift: output tokens in the decode-heavy phase")
    args = parser.parse_args(argv)
    if args.gpus < 2:
        parser.error(f"--gpus must be >= 2 (one prefill and one decode worker at least), got {args.gpus}")
    folder = args.out / f"pd_{args.what}_{args.gpus}gpu"
    runner = {"ttft": run_ttft, "goodput": run_goodput, "shift": run_shift}[args.what]
    result = {
        "benchmark": args.what,
        "model": args.model,
        "gpus": args.gpus,
        "device": device_name(args.device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": args.git_commit or git_commit(),
        "result": runner(args, folder),
    }
    stem = f"pd_{args.what}_{args.gpus}gpu_{result['device'].replace(' ', '_')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(args.what, result))
    print(json.dumps(result["result"], indent=2))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
