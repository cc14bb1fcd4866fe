"""PD serving on GPUs: prefill on cuda:0, decode on cuda:1, KV over NCCL, tokens equal to one engine."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from cluster.launcher import ClusterSpec, LocalCluster
from router.client import AsyncClient

pytestmark = pytest.mark.gpu

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PROMPTS = [[(i * 31 + j * 7) % 300 + 3 for j in range(n)] for i, n in enumerate([7, 130, 1000, 33])]
MAX_TOKENS = 16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("model", ["tiny", "ernie-4.5-21b-a3b"])
def test_prefill_gpu_to_decode_gpu_matches_offline_engine(model):
    os.environ.update(NO_MULTICAST)
    worker_args = ("--num-kv-blocks", "1024", "--max-model-len", "4096")
    spec = ClusterSpec(model=model, num_prefill=1, num_decode=1, device="cuda", router_port=0, worker_args=worker_args)
    with LocalCluster(spec, env=NO_MULTICAST) as cluster:

        async def one_at_a_time() -> list[list[int]]:
            async with AsyncClient(cluster.address, timeout=300) as client:
                out = []
                for prompt in PROMPTS:  # sequentially: same batch shapes as the offline run below
                    result = await client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
                    out.append(result.token_ids)
                return out

        served = asyncio.run(one_at_a_time())

    from engine import LLM, SamplingParams

    llm = LLM(model=model, device="cuda:0", num_kv_blocks=1024, max_model_len=4096)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    offline = [list(llm.generate(p, params)[0].token_ids) for p in PROMPTS]
    assert served == offline
