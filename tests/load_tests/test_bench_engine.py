"""The engine benchmark script runs end to end (tiny preset on CPU: a smoke run of the code path
the GPU run takes) and writes its JSON and Markdown."""

from __future__ import annotations

import argparse
import json

import torch

from load_tests import bench_engine


def test_decode_and_prefill_benchmarks_write_their_results(tmp_path):
    common = ["--device", "cpu", "--model", "tiny", "--out", str(tmp_path), "--git-commit", "abc1234"]
    sizes = ["--batches", "1,3", "--contexts", "40", "--steps", "2", "--prompts", "40,100", "--chunk", "64"]
    bench_engine.main(["all", *sizes, "--copy-bytes", "65536", "--matmul-size", "64", *common])
    decode = json.loads((tmp_path / "engine_decode_cpu.json").read_text())
    assert decode["commit"] == "abc1234" and decode["device"] == "cpu"
    rows = {(r["batch"], r["context"]): r for r in decode["rows"]}
    assert set(rows) == {(1, 40), (3, 40)}
    # tiny: 3 MoE layers, top-2 -> one sequence touches up to 6 experts per step
    assert 1 <= rows[(1, 40)]["experts_touched_per_step"] <= 6
    assert rows[(3, 40)]["floor_ms"] > rows[(1, 40)]["floor_ms"] > 0
    prefill = json.loads((tmp_path / "engine_prefill_cpu.json").read_text())
    assert [r["prompt_tokens"] for r in prefill["rows"]] == [40, 100]
    assert [r["steps"] for r in prefill["rows"]] == [1, 2]  # 100 tokens in chunks of 64
    assert (tmp_path / "engine_prefill_cpu.md").read_text().startswith("# prefill — tiny on cpu")


def test_the_decode_floor_counts_only_real_tokens_experts():
    """A CUDA graph replays a padded token bucket, and its padding rows are routed and counted like
    real tokens; the floor's expert count comes from steps run with every graph off. Here each MoE
    layer pretends to replay a graph of 16 rows (the padding: random rows) on CPU."""
    args = argparse.Namespace(model="tiny", device="cpu", gpu_memory_utilization=0.9, enforce_eager=True)
    engine = bench_engine.make_engine(args, max_model_len=128, max_num_seqs=4, chunk=64)
    assert bench_engine.seat_decode_batch(engine, 1, 40, torch.Generator().manual_seed(0))
    padding = torch.Generator().manual_seed(1)

    def padded(moe):
        def run(x):
            rows = torch.randn(16 - x.shape[0], x.shape[1], generator=padding).to(x.dtype)
            return moe.forward_local(torch.cat([x, rows]))[: x.shape[0]]

        return run

    moes = engine.loaded.model.moe_layers()
    fakes = [padded(moe) for moe in moes]
    for moe, fake in zip(moes, fakes, strict=True):
        moe.graphed = fake
    # tiny: 3 MoE layers, top-2 of 8 experts: one token touches at most 6 a step, 16 rows many more
    assert max(bench_engine.time_steps(engine, 2)[1]) > 6  # what the padded graphs add
    assert 1 <= max(bench_engine.count_touched_experts(engine, 2)) <= 6
    assert [moe.graphed for moe in moes] == fakes  # put back afterwards
