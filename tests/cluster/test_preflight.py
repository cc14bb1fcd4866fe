"""`pdserve preflight`: nccl-tests' bandwidth definitions, the threshold gate, and a real gloo run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli
from cluster.preflight import (
    Measurement,
    PreflightConfig,
    busbw_factor,
    check_thresholds,
    parse_size,
    parse_thresholds,
    run_preflight,
)

REPO = Path(__file__).resolve().parents[2]


def test_busbw_factors_are_nccl_tests():
    assert busbw_factor("sendrecv", 2) == busbw_factor("sendrecv", 8) == 1.0
    assert busbw_factor("all_reduce", 2) == 1.0
    assert busbw_factor("all_reduce", 4) == 1.5
    assert busbw_factor("all_reduce", 8) == 1.75
    with pytest.raises(ValueError, match="unknown operation 'broadcast'"):
        busbw_factor("broadcast", 2)


def test_sizes_and_thresholds_parse_like_the_cli():
    assert [parse_size(s) for s in ("8", "64K", "16M", "1G", "2mb")] == [8, 64 << 10, 16 << 20, 1 << 30, 2 << 20]
    with pytest.raises(ValueError, match="byte count"):
        parse_size("lots")
    with pytest.raises(ValueError, match="positive"):
        parse_size("0")
    assert parse_thresholds(["100"]) == {"sendrecv": 100.0, "all_reduce": 100.0}
    assert parse_thresholds(["100", "all_reduce=300"]) == {"sendrecv": 100.0, "all_reduce": 300.0}
    with pytest.raises(ValueError, match="unknown operation 'alltoall'"):
        parse_thresholds(["alltoall=5"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_procs": 1}, "at least 2 processes"),
        ({"ops": ("gather",)}, "unknown operations"),
        ({"sizes": ()}, "at least one message size"),
        ({"sizes": (6,)}, "multiples of the float32 element size"),
        ({"iters": 0}, "iters >= 1"),
        ({"device": "tpu"}, "cuda or cpu"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    base = {"num_procs": 2, "device": "cpu", "sizes": (1024,)}
    with pytest.raises(ValueError, match=message):
        PreflightConfig(**{**base, **kwargs})


def _m(op: str, size: int, busbw: float, wrong: int = 0) -> Measurement:
    return Measurement(op, size, size // 4, "float32", 1.0, busbw, busbw, wrong)


def test_threshold_applies_to_the_largest_size_and_wrong_results_always_fail():
    results = [_m("sendrecv", 1 << 20, 10.0), _m("sendrecv", 1 << 30, 300.0), _m("all_reduce", 1 << 30, 250.0)]
    assert check_thresholds(results, {"sendrecv": 200.0}) == []  # the 1 MiB row is below, but it is not the largest
    failures = check_thresholds(results, {"sendrecv": 200.0, "all_reduce": 280.0})
    assert failures == [f"all_reduce busbw 250.00 GB/s at {1 << 30} B is under 280 GB/s"]
    assert check_thresholds([_m("all_reduce", 64, 1.0, wrong=3)], {}) == ["all_reduce at 64 B: 3 wrong elements"]


def test_gloo_run_with_three_ranks_reports_consistent_numbers():
    config = PreflightConfig(num_procs=3, device="cpu", sizes=(4096, 65536), warmup=1, iters=3)
    report = run_preflight(config)
    assert report.passed and report.backend == "gloo" and report.num_ranks == 3
    assert [(m.op, m.size_bytes) for m in report.results] == [
        ("sendrecv", 4096),
        ("sendrecv", 65536),
        ("all_reduce", 4096),
        ("all_reduce", 65536),
    ]
    for m in report.results:
        assert m.num_wrong == 0 and m.count == m.size_bytes // 4 and m.time_us > 0
        assert m.algbw_gbps == pytest.approx(m.size_bytes / (m.time_us * 1e-6) / 1e9)
        assert m.busbw_gbps == pytest.approx(m.algbw_gbps * (1.0 if m.op == "sendrecv" else 4 / 3))


def test_cli_writes_json_and_markdown_and_fails_under_the_threshold(tmp_path, capsys):
    out_json, out_md = tmp_path / "preflight.json", tmp_path / "preflight.md"
    argv = ["preflight", "--device", "cpu", "--nprocs", "2", "--sizes", "4K", "--iters", "2", "--warmup", "0"]
    argv += ["--min-busbw", "all_reduce=1e6", "--json", str(out_json), "--markdown", str(out_md)]
    assert cli.main(argv) == 1
    report = json.loads(out_json.read_text())
    assert report["passed"] is False and report["num_ranks"] == 2
    assert report["failures"] == [
        f"all_reduce busbw {report['results'][1]['busbw_gbps']:.2f} GB/s at 4096 B is under 1e+06 GB/s"
    ]
    assert "| all_reduce | 4096 | float32 |" in out_md.read_text()
    assert "FAIL" in out_md.read_text()
    assert "algbw GB/s" in capsys.readouterr().out


def test_module_entry_point_runs_without_the_cli(tmp_path):
    """`python -m cluster.preflight` is what the GPU machine runs (no pdserve install there)."""
    out = tmp_path / "p.json"
    argv = [sys.executable, "-m", "cluster.preflight", "--device", "cpu", "--sizes", "4K", "--iters", "1"]
    done = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["passed"] is True


@pytest.mark.gpu
def test_nccl_run_on_two_gpus():
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    report = run_preflight(PreflightConfig(num_procs=2, device="cuda", sizes=(1 << 20, 64 << 20), iters=5))
    assert report.passed and report.backend == "nccl" and report.nccl_version != "-"
    assert all(m.busbw_gbps > 1.0 for m in report.results if m.size_bytes == 64 << 20)
