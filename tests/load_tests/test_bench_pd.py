"""The end-to-end PD benchmark script runs (tiny preset on CPU: the code path of the GPU runs,
not a measurement): the TTFT comparison starts both shapes, loads them through the harness and
writes its JSON and Markdown."""

from __future__ import annotations

import json

import pytest

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


def test_goodput_searches_only_the_shapes_asked_for(tmp_path):
    bench_pd.main(
        ["goodput", "--gpus", "2", "--model", "tiny", "--device", "cpu", "--shapes", "disaggregated"]
        + ["--start-rate", "2", "--max-runs", "1", "--seconds-per-run", "2", "--drain-timeout", "5"]
        + ["--input-len", "uniform:32:64", "--output-len", "uniform:4:8", "--warmup", "1"]
        + ["--out", str(tmp_path), "--git-commit", "abc1234"]
    )
    result = json.loads((tmp_path / "pd_goodput_2gpu_cpu.json").read_text())["result"]
    assert list(result["shapes"]) == ["disaggregated"] and result["ratio"] is None
    assert len(result["shapes"]["disaggregated"]["runs"]) == 1


def test_goodput_refuses_unknown_shapes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_pd.main(["goodput", "--shapes", "mixed", "--out", str(tmp_path)])
    assert "--shapes takes disaggregated and/or colocated" in capsys.readouterr().err
