"""The end-to-end PD benchmark script runs (tiny preset on CPU: the code path of the GPU runs,
not a measurement): the TTFT comparison starts both shapes, loads them through the harness and
writes its JSON and Markdown."""

from __future__ import annotations

import json

from load_tests import bench_pd


def test_ttft_benchmark_compares_disaggregated_and_colocated(tmp_path):
    bench_pd.main(
        ["ttft", "--gpus", "2", "--model", "tiny", "--device", "cpu", "--prompt-len", "200", "--requests", "3"]
        + ["--out", str(tmp_path), "--git-commit", "abc1234"]
    )
    result = json.loads((tmp_path / "pd_ttft_2gpu_cpu.json").read_text())
    assert result["commit"] == "abc1234" and result["gpus"] == 2
    shapes = result["result"]["shapes"]
    assert shapes["disaggregated"]["completed"] == shapes["colocated"]["completed"] == 3
    overhead = shapes["disaggregated"]["median_ttft_ms"] / shapes["colocated"]["median_ttft_ms"] - 1
    assert result["result"]["ttft_overhead"] == overhead
    assert (tmp_path / "pd_ttft_2gpu" / "disaggregated" / "summary.json").exists()
