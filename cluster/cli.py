"""The `pdserve` command line.

pdserve generate --model tiny "Hello"      offline generation on one engine
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protos.pdserve.v1 import generate_pb2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for prompts on one local engine")
    p.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    p.add_argument("--url", default=None, help="a running router's gRPC address; omit to run a local engine")
    p.add_argument("--model", default="tiny", help="preset name (tiny, ernie-4.5-21b-a3b) or a Hugging Face folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-tokens", type=_positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt in the model's chat template (with --url, a thinking model's reasoning goes to stderr)",
    )
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    if args.url:
        return _run_remote_generate(args)
    from engine import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype)
    prompts = args.prompts
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    for prompt, out in zip(args.prompts, llm.generate(prompts, params), strict=True):
        print(f"prompt: {prompt!r}")
        print(f"output: {out.text!r}")
        print(f"tokens: {len(out.token_ids)}  finish_reason: {out.finish_reason}")
    return 0


def _run_remote_generate(args: argparse.Namespace) -> int:
    import grpc

    from cluster.convert import FINISH_REASON_NAMES
    from router.client import Client

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    sampling.update(top_k=args.top_k, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.seed is not None:
        sampling["seed"] = args.seed
    with Client(args.url, timeout=300) as client:
        for prompt in args.prompts:
            message = [{"role": "user", "content": prompt}] if args.chat else prompt
            try:
                finish = _print_stream(client.stream(message, **sampling))
                print(f"[finish_reason: {FINISH_REASON_NAMES.get(finish, finish)}]")
            except grpc.RpcError as exc:
                print(f"pdserve generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
    return 0


def _print_stream(stream: Iterable[generate_pb2.GenerateResponse]) -> int | None:
    """Print one streamed answer and return its finish reason. A chat with thinking streams its
    reasoning first: it goes to stderr after a `[reasoning]` label (dimmed on a terminal), the
    answer to stdout, so the reasoning shows even when the answer is empty and stdout stays the answer."""
    finish, is_reasoning, has_reasoning, has_text = None, False, False, False
    dim = sys.stderr.isatty()
    for chunk in stream:
        if chunk.reasoning_text:
            label = "" if has_reasoning else "[reasoning] "
            text = f"\033[2m{chunk.reasoning_text}\033[0m" if dim else chunk.reasoning_text
            print(label + text, end="", file=sys.stderr, flush=True)
            is_reasoning = has_reasoning = True
        if chunk.text and is_reasoning:  # the answer starts on a line of its own
            is_reasoning = False
            print(file=sys.stderr, flush=True)
        has_text = has_text or bool(chunk.text)
        print(chunk.text, end="", flush=True)
        finish = chunk.finish_reason or finish
    if is_reasoning:
        print(file=sys.stderr, flush=True)
    if has_text:
        print()
    return finish


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local cluster: a router plus prefill and decode worker processes")
    p.add_argument("--model", default="tiny")
    p.add_argument("--prefill", type=int, default=1, help="number of prefill workers")
    p.add_argument("--decode", type=int, default=1, help="number of decode workers")
    p.add_argument("--mixed", type=int, default=0, help="number of mixed (colocated) workers")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one worker per GPU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="router gRPC port")
    p.add_argument("--http-port", type=int, default=None, help="router HTTP (OpenAI API) port, default 8000; -1: off")
    p.add_argument("--worker-arg", action="append", help="extra argument for every worker (repeatable)")
    p.add_argument("--router-arg", action="append", help="extra argument for the router (repeatable)")
    p.add_argument("--demo", nargs="*", default=None, help="send these prompts, print the outputs, and stop")
    p.add_argument("--launcher", choices=["local", "ray"], default="local", help="local processes, or Ray actors")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--no-greeting", action="store_true", help="skip the first demo request on start")
    p.add_argument("-v", "--verbose", action="store_true", help="echo every process's log")

    def run(args: argparse.Namespace) -> int:
        from cluster.launcher import run as run_up

        return run_up(args)

    p.set_defaults(func=run)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    from cluster.worker import add_worker_args

    p = sub.add_parser("worker", help="run one worker process (hosts an engine)")
    add_worker_args(p)

    def run(args: argparse.Namespace) -> int:
        from cluster.worker import run as run_worker

        return run_worker(args)

    p.set_defaults(func=run)


def _add_router(sub: argparse._SubParsersAction) -> None:
    from router.main import add_router_args

    p = sub.add_parser("router", help="run the router process (public gRPC API)")
    add_router_args(p)

    def run(args: argparse.Namespace) -> int:
        from router.main import run as run_router

        return run_router(args)

    p.set_defaults(func=run)


def _add_role(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("role", help="list workers' roles, or force a worker to switch role")
    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument("--registry", default="grpc://127.0.0.1:50051", help="grpc://ROUTER or redis://host:port")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[registry], help="every registered worker with its role, epoch and load")
    setter = actions.add_parser("set", parents=[registry], help="switch a worker's role (drains it first)")
    setter.add_argument("worker_id")
    setter.add_argument("role", choices=["prefill", "decode", "mixed"])
    setter.add_argument("--drain-timeout", type=float, default=30.0)

    def run(args: argparse.Namespace) -> int:
        import asyncio

        return asyncio.run(_role_command(args))

    p.set_defaults(func=run)


async def _role_command(args: argparse.Namespace) -> int:
    from cluster.planner import ROLE_NAMES, set_role
    from cluster.registry import make_registry
    from protos.pdserve.v1 import common_pb2, worker_pb2

    registry = make_registry(args.registry)
    try:
        if args.action == "list":
            for record in sorted(await registry.list_workers(), key=lambda r: r.info.worker_id):
                info, load = record.info, record.load
                state = common_pb2.WorkerState.Name(info.state).removeprefix("WORKER_STATE_")
                print(
                    f"{info.worker_id:<12} {ROLE_NAMES.get(info.role, '?'):<8} epoch {info.role_epoch:<3} {state:<9} "
                    f"{info.host}:{info.grpc_port}  running {load.num_running_requests} waiting "
                    f"{load.num_waiting_requests} KV {load.num_kv_blocks_used}/{load.num_kv_blocks_total}"
                )
            return 0
        response = await set_role(registry, args.worker_id, args.role, args.drain_timeout)
        result = worker_pb2.SetRoleResult.Name(response.result).removeprefix("SET_ROLE_RESULT_")
        role = ROLE_NAMES[response.role]
        print(f"{args.worker_id}: {result}: now {role} at epoch {response.role_epoch} {response.message}")
        return 0 if response.result in (worker_pb2.SET_ROLE_RESULT_OK, worker_pb2.SET_ROLE_RESULT_NOOP) else 1
    finally:
        await registry.close()


def _add_planner(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("planner", help="run the role planner: flip workers between prefill and decode")
    p.add_argument("--registry", default="grpc://127.0.0.1:50051", help="grpc://ROUTER or redis://host:port")
    p.add_argument("--window", type=float, default=1.0, help="seconds per load window")
    p.add_argument("--sustain", type=int, default=3, help="windows of the same imbalance before a flip")
    p.add_argument("--cooldown", type=float, default=10.0, help="seconds after a flip before the next")
    p.add_argument("--prefill-queue-tokens-high", type=int, default=4096)
    p.add_argument("--decode-seqs-high", type=int, default=48)
    p.add_argument("--ttft-slo", type=float, default=1.0)
    p.add_argument("--itl-slo", type=float, default=0.05)

    def run(args: argparse.Namespace) -> int:
        import asyncio
        import logging

        from cluster.planner import Planner, PlannerConfig
        from cluster.registry import make_registry

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s planner: %(message)s")
        config = PlannerConfig(
            window_s=args.window,
            sustain_windows=args.sustain,
            cooldown_s=args.cooldown,
            prefill_queue_tokens_high=args.prefill_queue_tokens_high,
            decode_seqs_high=args.decode_seqs_high,
            ttft_slo_s=args.ttft_slo,
            itl_slo_s=args.itl_slo,
        )

        async def main() -> None:
            await Planner(config).run(make_registry(args.registry))

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
        return 0

    p.set_defaults(func=run)


def _add_preflight(sub: argparse._SubParsersAction) -> None:
    from cluster.preflight import add_preflight_args

    p = sub.add_parser("preflight", help="measure GPU interconnect bandwidth (send/recv, all-reduce) like nccl-tests")
    add_preflight_args(p)

    def run(args: argparse.Namespace) -> int:
        from cluster.preflight import run as run_preflight

        return run_preflight(args)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Prefill/decode-disaggregated serving for ERNIE-4.5")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub)
    _add_generate(sub)
    _add_worker(sub)
    _add_router(sub)
    _add_role(sub)
    _add_planner(sub)
    _add_preflight(sub)
    from load_tests.cli import add_bench_parser  # light: the harness loads on `bench` only

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # config, sampling and request errors name the bad value
        print(f"pdserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
