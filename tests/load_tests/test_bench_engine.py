"""The engine benchmark script runs end to end (tiny preset on CPU: a smoke run of the code path
the GPU run takes) and writes its JSON and Markdown."""

from __future__ import annotations

import json

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
