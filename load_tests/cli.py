"""`pdserve bench ...`: the load-test and capacity-planning command line.

    pdserve bench run     --url HOST:PORT --request-rate 4 --num-prompts 200 --out OUT
    pdserve bench sweep   --local 1:1 --rates 1,2,4,8 --slo "ttft:1000 tpot:50" --out OUT
    pdserve bench search  --url HOST:PORT --slo "ttft:1000 tpot:50" --attainment 0.9 --out OUT
    pdserve bench profile --local 1:1 --out capacity.json
    pdserve bench plan    --capacity capacity.json --traffic traffic.yaml [--validate] --out OUT
    pdserve bench report  OUT

`--local P:D[:M]` starts a local cluster of that shape for the command (the `pdserve up`
launcher) and stops it afterwards; `--url` points at a running router. This module only parses
arguments; the harness is imported when a command runs, so `pdserve` starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Adds `bench` to the `pdserve` command line (called from `cluster.cli.build_parser`)."""
    p = sub.add_parser("bench", help="load tests and capacity planning (run, sweep, search, profile, plan, report)")
    actions = p.add_subparsers(dest="bench_command", required=True)

    run = actions.add_parser("run", help="one bounded run at a request rate (or a fixed concurrency)")
    _load_args(run)
    run.add_argument("--request-rate", type=_rate, default=math.inf, help="requests/s (inf: all at once)")
    run.set_defaults(func=_cmd_run)

    sweep = actions.add_parser("sweep", help="the same workload at each of several rates")
    _load_args(sweep)
    sweep.add_argument("--rates", required=True, type=_rates, help="comma-separated requests/s, e.g. 1,2,4,8")
    sweep.set_defaults(func=_cmd_sweep)

    search = actions.add_parser("search", help="the highest rate that meets the SLO (DistServe goodput)")
    _load_args(search)
    search.add_argument("--start-rate", type=float, default=1.0)
    search.add_argument("--max-runs", type=int, default=8, help="runs at most (each bounded by --max-duration)")
    search.add_argument("--tolerance", type=float, default=0.1, help="stop when failing/passing rates are this close")
    search.add_argument("--max-rate", type=float, default=1e4)
    search.set_defaults(func=_cmd_search)

    prof = actions.add_parser("profile", help="measure per-worker prefill and decode capacity curves")
    _target_args(prof)
    prof.add_argument(
        "--prefill-workers", type=int, default=None, help="prefill workers behind --url (default: discovered)"
    )
    prof.add_argument(
        "--decode-workers", type=int, default=None, help="decode workers behind --url (default: discovered)"
    )
    prof.add_argument("--prompt-lens", type=_ints, default=(64, 128, 256, 512))
    prof.add_argument("--batches", type=_ints, default=(1, 2, 4, 8, 16), help="decode batch sizes per worker")
    prof.add_argument("--contexts", type=_ints, default=(128,), help="decode prompt lengths (contexts)")
    prof.add_argument("--decode-output-len", type=int, default=48)
    prof.add_argument("--gpus-per-worker", type=int, default=1)
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument("--out", type=Path, default=Path("capacity.json"), help="profile JSON (a .md and .png beside it)")
    prof.add_argument("--no-plots", action="store_true")
    prof.set_defaults(func=_cmd_profile)

    plan = actions.add_parser("plan", help="recommend prefill/decode (and colocated) worker counts for a traffic")
    _target_args(plan)
    plan.add_argument("--capacity", type=Path, default=None, help="a profile from `bench profile` (else: profile now)")
    plan.add_argument("--traffic", type=Path, default=None, help="YAML/JSON {rate, input, output, slo}")
    plan.add_argument("--rate", type=float, default=None, help="requests/s (instead of --traffic)")
    plan.add_argument("--input-len", default="128", help="input length distribution (instead of --traffic)")
    plan.add_argument("--output-len", default="64", help="output length distribution (instead of --traffic)")
    plan.add_argument("--slo", default="ttft:1000 tpot:50", help="targets in ms (instead of --traffic)")
    plan.add_argument("--attainment", type=float, default=0.9)
    plan.add_argument("--gpus-per-worker", type=int, default=None)
    plan.add_argument("--decode-headroom", type=float, default=0.9)
    plan.add_argument("--validate", action="store_true", help="run the recommended shape on the local launcher")
    plan.add_argument("--validate-colocated", action="store_true", help="also run the colocated shape")
    plan.add_argument("--validate-requests", type=int, default=100)
    plan.add_argument("--validate-max-duration", type=float, default=60.0, help="seconds of load per validation run")
    plan.add_argument("--max-local-workers", type=int, default=4, help="largest shape validation starts")
    plan.add_argument("--out", type=Path, default=None, help="folder for plan.md / plan.json")
    plan.add_argument("--seed", type=int, default=0)
    plan.set_defaults(func=_cmd_plan)

    report = actions.add_parser("report", help="rebuild report.md, summary.csv and plots of a results folder")
    report.add_argument("folder", type=Path)
    report.add_argument("--no-plots", action="store_true")
    report.set_defaults(func=_cmd_report)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0, got {text}")
    return value


def _rates(text: str) -> list[float]:
    return [_rate(part) for part in text.split(",") if part.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    try:
        numbers = [int(p) for p in parts] + [0] * (3 - len(parts))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PREFILL:DECODE[:MIXED], got {text!r}") from None
    if len(parts) not in (2, 3) or min(numbers) < 0:
        raise argparse.ArgumentTypeError(f"expected PREFILL:DECODE[:MIXED], got {text!r}")
    return numbers[0], numbers[1], numbers[2]


def _target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument(
        "--url", default=None, help="router gRPC address HOST:PORT (or http://HOST:PORT for --backend openai)"
    )
    g.add_argument("--local", type=_shape, default=None, metavar="P:D[:M]", help="start a local cluster of this shape")
    g.add_argument("--backend", default="grpc", choices=["grpc", "openai", "openai-chat"])
    g.add_argument("--model", default="tiny", help="model served (preset or folder; its tokenizer builds prompts)")
    g.add_argument("--device", default="cpu", help="for --local: cpu or cuda")
    g.add_argument("--worker-arg", action="append", default=[], help="for --local: extra worker argument (repeatable)")
    g.add_argument("--router-arg", action="append", default=[], help="for --local: extra router argument (repeatable)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--request-timeout", type=float, default=300.0)


def _load_args(p: argparse.ArgumentParser) -> None:
    _target_args(p)
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", default="random", choices=["random", "sharegpt", "shared-prefix", "multimodal"])
    w.add_argument("--dataset-path", default=None, help="ShareGPT JSON file")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--input-len", default="128", help="fixed:N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEAN:SIGMA")
    w.add_argument("--output-len", default="64", help="same forms as --input-len")
    w.add_argument("--prompt-format", default="tokens", choices=["tokens", "text", "chat"])
    w.add_argument("--num-prefixes", type=int, default=4)
    w.add_argument("--prefix-len", type=int, default=256)
    w.add_argument("--prefix-reuse", type=float, default=1.0, help="share of requests that reuse a shared prefix")
    w.add_argument("--images-per-request", type=int, default=1)
    w.add_argument("--image-size", type=int, default=224)
    w.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("arrivals and bounds")
    a.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "constant", "trace"])
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson, < 1 burstier)")
    a.add_argument("--trace", default=None, help="timestamped trace (JSON lines or CSV, column `timestamp`)")
    a.add_argument("--trace-time-unit", default="s", choices=["s", "ms"])
    a.add_argument("--trace-speedup", type=float, default=1.0)
    a.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (closed loop)")
    a.add_argument("--max-requests", type=int, default=None, help="requests per run at most (default --num-prompts)")
    a.add_argument("--max-duration", type=float, default=120.0, help="seconds of sending per run at most")
    a.add_argument("--drain-timeout", type=float, default=30.0, help="then seconds for in-flight requests to finish")
    a.add_argument("--warmup", type=int, default=0, help="unrecorded requests before each run")
    a.add_argument(
        "--seconds-per-run", type=float, default=None,
        help="sweep/search: send rate × this many seconds of requests per run (at most --num-prompts)",
    )  # fmt: skip
    s = p.add_argument_group("SLO and metrics")
    s.add_argument("--slo", default="", help='targets in ms, e.g. "ttft:1000 tpot:50" (vLLM --goodput style)')
    s.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLO")
    s.add_argument("--percentiles", default="50,90,99")
    s.add_argument("--gpus", type=int, default=None, help="GPUs of the deployment (for goodput per GPU)")
    s.add_argument("--metrics-url", action="append", default=[], help="NAME=URL of a /metrics to sample (repeatable)")
    s.add_argument(
        "--no-discover", action="store_true", help="do not look up workers' /metrics in the router's registry"
    )
    s.add_argument("--scrape-interval", type=float, default=1.0)
    c = p.add_argument_group("client and output")
    c.add_argument("--client-procs", type=int, default=1, help="client processes (one asyncio loop each)")
    c.add_argument("--grpc-channels", type=int, default=4, help="gRPC connections per client process")
    c.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder")
    c.add_argument("--no-plots", action="store_true")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cluster(args: argparse.Namespace):
    """A local cluster for --local (stopped on exit), else None."""
    if args.local is None:
        yield None
        return
    from cluster.launcher import ClusterSpec, LocalCluster

    num_p, num_d, num_m = args.local
    http_port = 0 if args.backend != "grpc" else -1
    spec = ClusterSpec(
        model=args.model, num_prefill=num_p, num_decode=num_d, num_mixed=num_m, device=args.device, router_port=0,
        http_port=http_port, worker_args=tuple(args.worker_arg), router_args=tuple(args.router_arg),
    )  # fmt: skip
    print(
        f"starting a local cluster: {num_p} prefill + {num_d} decode "
        f"+ {num_m} mixed workers ({args.model}, {args.device})",
        file=sys.stderr,
    )
    with LocalCluster(spec) as cluster:
        yield cluster


def _backend(args: argparse.Namespace, cluster):
    from load_tests.backends import BackendConfig

    if cluster is not None:
        target = cluster.address if args.backend == "grpc" else f"http://{cluster.http_address}"
    elif args.url:
        target = args.url
    else:
        raise ValueError("give a target: --url HOST:PORT (a running router) or --local P:D (start one)")
    return BackendConfig(
        kind=args.backend,
        target=target,
        model=args.model if args.backend != "grpc" else "",
        api_key=args.api_key,
        num_channels=getattr(args, "grpc_channels", 4),
        request_timeout_s=args.request_timeout,
    )


def _targets(args: argparse.Namespace, cluster) -> tuple:
    from load_tests.scrape import Target, discover_targets, targets_from_cluster

    targets = [Target.parse(u) for u in args.metrics_url]
    if cluster is not None:
        targets += targets_from_cluster(cluster)
    elif args.url and args.backend == "grpc" and not args.no_discover:
        targets += discover_targets(args.url)
    return tuple(targets)


def _run_config(args: argparse.Namespace, cluster):
    from load_tests.arrivals import ArrivalConfig
    from load_tests.metrics import Slo
    from load_tests.modes import RunConfig
    from load_tests.runner import RunLimits
    from load_tests.workload import LengthDist, WorkloadConfig

    workload = WorkloadConfig(
        kind=args.dataset, num_requests=args.num_prompts, input_len=LengthDist.parse(args.input_len),
        output_len=LengthDist.parse(args.output_len), seed=args.seed, dataset_path=args.dataset_path,
        prompt_format=args.prompt_format, num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
        prefix_reuse=args.prefix_reuse, images_per_request=args.images_per_request, image_size=args.image_size,
    )  # fmt: skip
    arrival = ArrivalConfig(
        kind=args.arrival, rate=getattr(args, "request_rate", math.inf), burstiness=args.burstiness, seed=args.seed,
        trace_path=args.trace, trace_time_unit=args.trace_time_unit, trace_speedup=args.trace_speedup,
    )  # fmt: skip
    limits = RunLimits(args.max_requests or args.num_prompts, args.max_duration, args.drain_timeout)
    gpus = args.gpus
    if gpus is None and cluster is not None:
        gpus = len(cluster.workers)
    return RunConfig(
        backend=_backend(args, cluster),
        workload=workload,
        arrival=arrival,
        limits=limits,
        slo=Slo.parse(args.slo, args.attainment),
        max_concurrency=args.max_concurrency,
        num_procs=args.client_procs,
        percentiles=tuple(float(p) for p in args.percentiles.split(",") if p.strip()),
        scrape_targets=_targets(args, cluster),
        scrape_interval_s=args.scrape_interval,
        tokenizer_model=args.model,
        warmup_requests=args.warmup,
        num_gpus=gpus,
        progress=not args.quiet,
        seconds_per_run=args.seconds_per_run,
    )


def _finish(out: Path, mode: str, results, extra: dict | None, no_plots: bool) -> int:
    from load_tests.outputs import write_study

    report = write_study(out, mode, results, extra, plots=not no_plots)
    for result in results:
        s = result.summary
        goodput = (
            ""
            if s["request_goodput"] is None
            else f", goodput {s['request_goodput']:.2f} req/s, attainment {s['slo_attainment']:.1%}"
        )
        rate = s["request_rate"]
        print(
            f"rate {rate if rate is not None else 'trace'}: {s['completed']}/{s['num_sent']} ok, "
            f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} out tok/s, "
            f"p90 TTFT {_ms(s.get('p90_ttft_ms'))}, p90 TPOT {_ms(s.get('p90_tpot_ms'))}{goodput}"
        )
    print(f"report: {report}")
    return 0


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _cmd_run(args: argparse.Namespace) -> int:
    from load_tests.modes import execute

    with _cluster(args) as cluster:
        result = execute(_run_config(args, cluster))
    return _finish(args.out, "run", [result], None, args.no_plots)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from load_tests.modes import sweep

    with _cluster(args) as cluster:
        results = sweep(_run_config(args, cluster), args.rates)
    return _finish(args.out, "sweep", results, None, args.no_plots)


def _cmd_search(args: argparse.Namespace) -> int:
    from load_tests.modes import search

    with _cluster(args) as cluster:
        config = _run_config(args, cluster)
        found = search(config, args.start_rate, args.max_runs, args.tolerance, max_rate=args.max_rate)
    results = sorted(found.runs, key=lambda r: r.rate)
    extra = {"search": found.to_dict(config.num_gpus)}
    code = _finish(args.out, "search", results, extra, args.no_plots)
    best = found.best_rate
    print("goodput: " + ("no rate met the SLO" if best is None else f"{best:.3g} req/s meets {config.slo.describe()}"))
    return code


def _discovered_roles(args: argparse.Namespace, cluster) -> tuple[int, int, int | None]:
    """(prefill, decode) workers behind the target, and KV tokens per worker if known."""
    from load_tests.scrape import discover_targets, kv_capacity_tokens, targets_from_cluster, worker_roles

    if cluster is not None:
        targets = [t for t in targets_from_cluster(cluster) if t.name != "router"]
    else:
        targets = discover_targets(args.url) if args.url else []
    roles = list(worker_roles(targets).values())
    kv = kv_capacity_tokens(targets)
    kv_tokens = min(kv.values()) if kv else None
    num_p = getattr(args, "prefill_workers", None) or roles.count("prefill") or 1
    num_d = getattr(args, "decode_workers", None) or roles.count("decode") + roles.count("mixed") or 1
    return num_p, num_d, kv_tokens


def _profile(args: argparse.Namespace):
    from load_tests.capacity import ProfileConfig, profile

    config = ProfileConfig(
        prompt_lens=args.prompt_lens, batches=args.batches, contexts=args.contexts,
        decode_output_len=args.decode_output_len, seed=args.seed,
    )  # fmt: skip
    with _cluster(args) as cluster:
        backend = _backend(args, cluster)
        num_p, num_d, kv_tokens = _discovered_roles(args, cluster)
        print(f"profiling {backend.target}: {num_p} prefill + {num_d} decode worker(s)", file=sys.stderr)
        return profile(backend, num_p, num_d, config, args.model, args.gpus_per_worker, kv_tokens, log=print)


def _cmd_profile(args: argparse.Namespace) -> int:
    from load_tests.capacity import profile_markdown, profile_plot

    result = _profile(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.save(args.out)
    args.out.with_suffix(".md").write_text(profile_markdown(result))
    if not args.no_plots:
        profile_plot(result, args.out.with_suffix(".png"))
    print(f"profile: {args.out}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from load_tests.capacity import CapacityProfile, LocalShape, Traffic, plan, plan_markdown, validate
    from load_tests.metrics import Slo
    from load_tests.runner import RunLimits
    from load_tests.workload import LengthDist

    if args.traffic is not None:
        traffic = Traffic.load(args.traffic)
    elif args.rate is not None:
        traffic = Traffic(
            args.rate,
            LengthDist.parse(args.input_len),
            LengthDist.parse(args.output_len),
            Slo.parse(args.slo, args.attainment),
        )
    else:
        raise ValueError("describe the traffic: --traffic FILE, or --rate with --input-len/--output-len/--slo")
    if args.capacity is not None:
        capacity = CapacityProfile.load(args.capacity)
    else:
        args.prompt_lens, args.batches, args.contexts, args.decode_output_len = (
            (64, 128, 256, 512),
            (1, 2, 4, 8, 16),
            (128,),
            48,
        )
        args.prefill_workers = args.decode_workers = None
        args.gpus_per_worker = args.gpus_per_worker or 1
        capacity = _profile(args)
    result = plan(capacity, traffic, args.gpus_per_worker, args.decode_headroom)
    print("\n".join(result.lines))
    if args.validate or args.validate_colocated:
        shape = LocalShape(
            args.model, args.device, tuple(args.worker_arg), tuple(args.router_arg), args.max_local_workers
        )
        limits = RunLimits(args.validate_requests, args.validate_max_duration, min(30.0, args.validate_max_duration))
        result.validation = validate(result, shape, limits, args.validate_requests, args.seed, args.validate_colocated)
    if args.out is not None:
        import json

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan.json").write_text(json.dumps(result.to_dict(), indent=1))
        (args.out / "plan.md").write_text(plan_markdown(result))
        print(f"plan: {args.out / 'plan.md'}")
    return 0 if all(v.get("passed", True) for v in result.validation) else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from load_tests.outputs import render_report

    print(f"report: {render_report(args.folder, plots=not args.no_plots)}")
    return 0
