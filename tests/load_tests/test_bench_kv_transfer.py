"""The KV transfer benchmark runs end to end on CPU (gloo) and reports every measurement."""

from __future__ import annotations

import json

from load_tests.kernels import bench_kv_transfer


def test_the_benchmark_runs_on_cpu_and_writes_single_burst_and_layerwise_numbers(tmp_path):
    argv = ["--device", "cpu", "--tokens", "16,48", "--repeats", "1", "--layerwise-repeats", "1"]
    argv += ["--variants", "1:2", "--burst", "3", "--out", str(tmp_path), "--git-commit", "test"]
    assert bench_kv_transfer.main(argv) == 0
    data = json.loads((tmp_path / "kv_transfer_cpu.json").read_text())
    assert data["meta"]["burst"] == 3 and data["meta"]["backend"] == "gloo"
    for row in data["rows"]:
        assert "error" not in row, row.get("error")
        assert row["raw_s"] > 0 and row["whole_s"] > 0 and row["raw_burst_s"] > 0 and row["whole_burst_s"] > 0
        assert set(row["variants_burst_s"]) == {"1MiB x2"}
        # one timeline per transfer of the last burst, each side stamped
        timelines = row["burst_timelines_ms"]["0"]
        assert len(timelines) == 3 and all("S:complete" in t and "R:complete" in t for t in timelines)
    markdown = (tmp_path / "kv_transfer_cpu.md").read_text()
    assert "bursts of 3" in markdown and "| 48 |" in markdown
