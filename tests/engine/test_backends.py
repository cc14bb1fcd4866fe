"""The engine runs the Triton kernels where asked (by default on CUDA) with the same tokens."""

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
LOGPROB_TOLERANCE = 1e-5  # fp32; the kernels sum in other orders than torch (seen: 5e-7)

# Greedy tokens and their top-5 log-probabilities (the tiny presets' random weights often repeat
# the last prompt token, so the tokens alone would prove little) for each preset and backend.
# tiny-vl brings an image: its prefill rotates with the 3D RoPE tables, its decode with the text ones.
_RUN = """
import json, sys
from engine import LLM, SamplingParams
from tests.helpers.hf_vl_models import IMAGE_END, IMAGE_START, IMAGE_TOKEN, png
params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5)
prompts = json.loads(sys.argv[1])
image_prompt = {"prompt_token_ids": [1, 5, 6, IMAGE_START, IMAGE_TOKEN, IMAGE_END, 7, 8], "images": [png(56, 84)]}
out = {}
for preset, requests in (("tiny", prompts), ("tiny-vl", [image_prompt, *prompts])):
    for backend in ("torch", "triton"):
        llm = LLM(model=preset, moe_backend=backend, max_model_len=256, num_kv_blocks=32)
        outputs = llm.generate(requests, params)
        out[f"{preset}/{backend}"] = [
            {"tokens": list(o.token_ids), "top": [[[i, lp] for i, lp in step.top] for step in o.logprobs]}
            for o in outputs
        ]
print(json.dumps(out))
"""


def test_auto_picks_the_references_on_cpu_and_rejects_unknown_names():
    backends = model_backends("auto", "cpu")
    assert backends.experts is fused_moe_ref and backends.route is route_ref
    with pytest.raises(ValueError, match="moe_backend"):
        model_backends("cuda-magic", "cpu")


def test_engine_with_the_triton_kernels_matches_the_reference_on_cpu_interpreter():
    """fp32 under TRITON_INTERPRET=1 (set before triton loads: a subprocess): tiny and tiny-vl (with
    an image) give the same greedy tokens and top-5 log-probabilities as the torch references."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    for preset in ("tiny", "tiny-vl"):
        want, got = runs[f"{preset}/torch"], runs[f"{preset}/triton"]
        assert [o["tokens"] for o in got] == [o["tokens"] for o in want], preset
        assert all(len(o["tokens"]) == 6 for o in want)
        for got_output, want_output in zip(got, want, strict=True):
            for got_step, want_step in zip(got_output["top"], want_output["top"], strict=True):
                assert [i for i, _ in got_step] == [i for i, _ in want_step], (preset, got_step, want_step)
                errors = [abs(a - b) for (_, a), (_, b) in zip(got_step, want_step, strict=True)]
                assert max(errors) <= LOGPROB_TOLERANCE, (preset, got_step, want_step)


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
