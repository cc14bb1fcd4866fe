"""The paged-attention benchmark script runs end to end: tiny heads on CPU through the Triton
interpreter (a smoke run of the code path the GPU run takes), and writes its JSON and Markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from load_tests.kernels import bench_paged_attention

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_plans_the_21b_sweep_without_launching(capsys):
    bench_paged_attention.main(["--dry-run", "--shape", "ernie-21b", "--num-sms", "132"])
    plan = capsys.readouterr().out.splitlines()[1:]
    assert len(plan) == 8  # batches 1, 8, 64, 256 x contexts 1k, 8k
    assert "batch    1 context  8192: grid (1, 4, 64)" in plan[4]
    assert "batch  256 context  8192: grid (256, 4, 1)" in plan[7]


def test_interpreted_run_writes_its_results(tmp_path):
    command = [sys.executable, "-m", "load_tests.kernels.bench_paged_attention", "--out", str(tmp_path)]
    command += ["--batches", "1,3", "--contexts", "40,100", "--git-commit", "abc1234"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads((tmp_path / "paged_attention_bench_cpu_interpreter.json").read_text())
    assert report["git_commit"] == "abc1234" and report["device"] == "cpu-interpreter"
    assert [(r["batch"], r["context"]) for r in report["rows"]] == [(1, 40), (3, 40), (1, 100), (3, 100)]
    for row in report["rows"]:
        assert row["rel_err_vs_fp32_ref"] < 1e-5 and row["baseline_rel_err"] < 1e-5, row
        assert row["kv_bytes"] == row["batch"] * row["context"] * 2 * 16 * 2 * 4  # Hkv 2, D 16, K+V, fp32
    assert (tmp_path / "paged_attention_bench_cpu_interpreter.md").read_text().startswith("# paged decode attention")
