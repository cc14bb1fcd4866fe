"""The engine runs the Triton MoE kernels where asked (by default on CUDA) with the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from engine.backends import model_backends
from engine.kernels.fused_moe_ref import fused_moe_ref, route_ref

PROMPTS = [[5, 9, 13, 17, 21], [40, 41, 42]]

_RUN = """
import json, sys
from engine import LLM, SamplingParams
params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
out = {}
for backend in ("torch", "triton"):
    llm = LLM(model="tiny", moe_backend=backend, max_model_len=256, num_kv_blocks=32)
    out[backend] = [list(o.token_ids) for o in llm.generate(json.loads(sys.argv[1]), params)]
print(json.dumps(out))
"""


def test_auto_picks_the_references_on_cpu_and_rejects_unknown_names():
    backends = model_backends("auto", "cpu")
    assert backends.experts is fused_moe_ref and backends.route is route_ref
    with pytest.raises(ValueError, match="moe_backend"):
        model_backends("cuda-magic", "cpu")


def test_engine_with_the_triton_kernels_matches_the_reference_on_cpu_interpreter():
    """fp32 under TRITON_INTERPRET=1 (set before triton loads: a subprocess), greedy tokens equal."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    tokens = json.loads(result.stdout.strip().splitlines()[-1])
    assert tokens["triton"] == tokens["torch"]
    assert all(len(t) == 6 for t in tokens["torch"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_uses_the_kernels_and_matches_the_reference():
    from engine import LLM, SamplingParams
    from engine.kernels.fused_moe import fused_moe

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    kernel = LLM(model="tiny", device="cuda", max_model_len=512, num_kv_blocks=64)
    assert kernel.engine.loaded.model.backends.experts is fused_moe
    reference = LLM(model="tiny", device="cuda", moe_backend="torch", max_model_len=512, num_kv_blocks=64)
    got = [list(o.token_ids) for o in kernel.generate(PROMPTS, params)]
    want = [list(o.token_ids) for o in reference.generate(PROMPTS, params)]
    assert got == want
