"""The engine's parity checks (tests/engine/test_model.py, tests/engine/test_engine_parity.py) with the
Triton kernels swapped in, for `test_parity_with_moe_kernel.py` to run in the interpreter worker.

`kernels` picks what runs on Triton:
    "moe"  routing (`engine.kernels.moe_route.route`) and the fused experts
           (`engine.kernels.fused_moe.fused_moe`); attention, norms and RoPE stay the torch references
    "all"  the engine's `moe_backend="triton"` set (`engine.backends.model_backends`)

Each case counts the calls that reached every Triton function and returns the counts, so the test
proves the kernels (not the references) produced the tokens it compared.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import LLM
from engine.backends import model_backends
from engine.models.ernie4_5_moe import ModelBackends
from tests.engine.test_engine_parity import (
    check_batched_greedy_matches_transformers_and_single_runs,
    check_chunked_prefill_and_prefix_hits_give_cold_tokens,
    model_dir,
)
from tests.engine.test_model import check_prompt_logits_match_transformers

KERNELS = {"moe": ("route", "experts"), "all": tuple(f.name for f in dataclasses.fields(ModelBackends))}


def counted_triton_backends(kernels: str, calls: Counter[str]) -> ModelBackends:
    """The torch references with the `kernels` set replaced by the Triton functions, each call counted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton cases run on CPU only under TRITON_INTERPRET=1 (the interpreter worker)")
    triton = model_backends("triton", "cpu")
    replaced = {name: _counted(name, getattr(triton, name), calls) for name in KERNELS[kernels]}
    return dataclasses.replace(ModelBackends(), **replaced)


def _counted(name: str, function: Callable[..., Any], calls: Counter[str]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return function(*args, **kwargs)

    return call


def _llm_factory(kernels: str, calls: Counter[str]) -> Callable[..., LLM]:
    def make_llm(**kwargs: Any) -> LLM:
        llm = LLM(moe_backend="torch", **kwargs)
        llm.engine.loaded.model.set_backends(counted_triton_backends(kernels, calls))
        return llm

    return make_llm


def prompt_logits(name: str, root: str, kernels: str) -> dict[str, int]:
    calls: Counter[str] = Counter()
    check_prompt_logits_match_transformers(name, Path(root), counted_triton_backends(kernels, calls))
    return dict(calls)


def batched_greedy(name: str, root: str, kernels: str) -> dict[str, int]:
    calls: Counter[str] = Counter()
    check_batched_greedy_matches_transformers_and_single_runs(model_dir(name, root), _llm_factory(kernels, calls))
    return dict(calls)


def chunked_prefill_and_prefix_hits(name: str, root: str, kernels: str) -> dict[str, int]:
    calls: Counter[str] = Counter()
    check_chunked_prefill_and_prefix_hits_give_cold_tokens(model_dir(name, root), _llm_factory(kernels, calls))
    return dict(calls)
