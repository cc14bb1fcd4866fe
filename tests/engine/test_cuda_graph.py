"""CUDA-graph decode and MoE layers: the buckets, when the engine uses graphs, and (on a GPU) that
replayed decode and MoE layers give the same tokens as eager ones, with padding rows that never
touch a managed KV block."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import CacheConfig, EngineConfig
from engine.cuda_graph import DecodeGraphs, MoEGraphs, bucket_sizes, moe_token_buckets
from engine.loader import load_model


def test_buckets_cover_every_batch_size_up_to_the_maximum():
    for max_batch in (1, 3, 8, 64, 100, 256):
        sizes = bucket_sizes(max_batch)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_batch
    assert bucket_sizes(256)[:12] == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80]
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        bucket_sizes(0)


def test_graphs_need_a_cuda_kv_cache():
    kv = torch.zeros(1, 2, 4, 16, 1, 8)
    with pytest.raises(ValueError, match="need the KV cache on a CUDA device, got cpu"):
        DecodeGraphs(torch.nn.Identity(), kv, 16, scratch_block=3, max_batch=4, max_blocks_per_seq=4)


def test_moe_buckets_double_to_512_then_grow_by_half_steps_and_end_at_the_maximum():
    assert moe_token_buckets(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048]
    assert moe_token_buckets(8192)[-5:] == [2048, 3072, 4096, 6144, 8192]
    assert moe_token_buckets(100) == [16, 32, 64, 100] and moe_token_buckets(1) == [1]
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        moe_token_buckets(0)


def test_moe_graphs_need_cuda_and_the_engine_validates_their_size():
    with pytest.raises(ValueError, match="need a CUDA device, got cpu"):
        MoEGraphs([], 8, torch.float32, torch.device("cpu"), 64)
    model = load_model("tiny").config
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"moe_graph_max_tokens must be an integer >= 0, got {bad!r}"):
            EngineConfig(model=model, moe_graph_max_tokens=bad)


def test_a_moe_layer_takes_its_graphs_output_and_runs_eagerly_when_there_is_none():
    moe = load_model("tiny").model.moe_layers()[0]
    x = torch.randn(5, moe.gate_weight.shape[1])
    eager = moe(x)
    replayed = torch.full_like(eager, 7.0)
    moe.graphed = lambda rows: replayed if rows.shape[0] == 5 else None
    assert moe(x) is replayed
    assert torch.equal(moe(x[:3]), moe.forward_local(x[:3]))  # no graph for this step: the layer's own forward
    torch.testing.assert_close(moe(x[:3]), eager[:3])


def test_cpu_engines_run_eagerly_with_no_scratch_block():
    llm = LLM("tiny", num_kv_blocks=32)
    assert llm.engine.runner.decode_graphs is None
    assert llm.engine.kv_cache.shape[2] == 32


PROMPTS = [[5 + i, 17, 33 + i, 60] * (1 + i % 4) + [100 + i] for i in range(11)]


def _greedy(llm: LLM, prompts, max_tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in llm.generate(prompts, params)]


@pytest.mark.gpu
@pytest.mark.parametrize("num_prompts", [1, 3, 11])
def test_graph_decode_gives_the_eager_tokens(num_prompts):
    prompts = PROMPTS[:num_prompts]
    eager = LLM("tiny", device="cuda", num_kv_blocks=256, enforce_eager=True)
    graphed = LLM("tiny", device="cuda", num_kv_blocks=256, max_num_seqs=16)
    graphs = graphed.engine.runner.decode_graphs
    assert graphs is not None and graphs.stats().buckets[-1] == 16
    assert graphed.engine.kv_cache.shape[2] == 257  # 256 managed blocks + the scratch block
    replays = 0
    original = graphs.run

    def counting_run(*args):
        nonlocal replays
        replays += 1
        return original(*args)

    graphs.run = counting_run
    assert _greedy(graphed, prompts) == _greedy(eager, prompts)
    assert replays >= 20  # the decode steps replayed graphs; the prefill steps ran eagerly


@pytest.mark.gpu
def test_prefill_steps_replay_moe_graphs_and_give_the_eager_tokens():
    """Prompts of awkward lengths, alone and batched, some steps past the largest MoE bucket."""
    prompts = [[(7 * i + 3 * n) % 370 + 5 for i in range(n)] for n in (7, 255, 1000, 1500)]
    eager = LLM("tiny", device="cuda", num_kv_blocks=512, enforce_eager=True)
    graphed = LLM("tiny", device="cuda", num_kv_blocks=512)
    moes = graphed.engine.loaded.model.moe_layers()
    assert moes and all(moe.graphed is not None for moe in moes)
    assert all(moe.graphed is None for moe in eager.engine.loaded.model.moe_layers())
    replays = 0
    original = moes[0].graphed

    def counting(x):
        nonlocal replays
        out = original(x)
        replays += out is not None
        return out

    moes[0].graphed = counting
    assert _greedy(graphed, prompts, max_tokens=8) == _greedy(eager, prompts, max_tokens=8)
    for prompt in prompts:
        assert _greedy(graphed, [prompt], max_tokens=4) == _greedy(eager, [prompt], max_tokens=4)
    assert replays > 0


@pytest.mark.gpu
def test_graph_padding_rows_write_only_the_scratch_block():
    llm = LLM("tiny", device="cuda", num_kv_blocks=64, max_num_seqs=8, enable_prefix_caching=False)
    kv = llm.engine.kv_cache
    before = kv[:, :, :64].clone()
    llm.engine.runner.decode_graphs.capture()  # captures run every bucket over padding rows only
    torch.cuda.synchronize()
    assert torch.equal(kv[:, :, :64], before)


@pytest.mark.gpu
def test_decode_worker_continues_a_handed_over_prompt_under_graphs():
    """The PD hand-off on one GPU: engine A prefills eagerly, the prompt's KV blocks are copied into
    engine B's pool (what the transport does), and B decodes under CUDA graphs: the tokens are the
    single eager engine's."""
    from engine.llm_engine import LLMEngine
    from engine.scheduler import SampledToken

    prompts = PROMPTS[:5]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = _greedy(LLM("tiny", device="cuda", num_kv_blocks=256, enforce_eager=True), prompts, 20)
    # Two engines on one GPU: fixed pools (sizing from free memory would give the first one all of it).
    prefill = LLMEngine.from_model("tiny", device="cuda", cache=CacheConfig(num_blocks=256), enforce_eager=True)
    decode = LLMEngine.from_model("tiny", device="cuda", cache=CacheConfig(num_blocks=256))
    assert decode.runner.decode_graphs is not None
    block_size = decode.runtime.block_size
    handed = []
    for i, prompt in enumerate(prompts):
        sent = prefill.add_request(f"p{i}", prompt, params)
        while not sent.output_token_ids:
            prefill.step()
        received = decode.make_request(f"d{i}", prompt, params)
        assert decode.preallocate(received) is not None
        num_blocks = -(-len(prompt) // block_size)
        src = torch.tensor(sent.block_ids[:num_blocks], device="cuda")
        dst = torch.tensor(received.block_ids[:num_blocks], device="cuda")
        decode.kv_cache[:, :, dst] = prefill.kv_cache[:, :, src]
        decode.adopt(received, SampledToken(sent.output_token_ids[0], None))
        prefill.abort(f"p{i}")
        handed.append(received)
    while decode.has_unfinished:
        decode.step()
    assert [list(r.output_token_ids) for r in handed] == [list(t) for t in expected]
