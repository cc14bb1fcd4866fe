"""`pdserve bench ...`: the load-test and capacity-planning command line."""

from __future__ import annotations

import argparse


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Adds `bench` to the `pdserve` command line (called from `cluster.cli.build_parser`)."""
    p = sub.add_parser("bench", help="load tests and capacity planning (run, sweep, search, plan, report)")
    p.set_defaults(func=lambda args: p.print_help() or 0)
