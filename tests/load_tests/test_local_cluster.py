"""`pdserve bench` against the real local cluster (router + 1 prefill + 1 decode worker on CPU):
short bounded runs that must produce every output file, and a small profile → plan."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from cluster.launcher import ClusterSpec, LocalCluster

WORKER_ARGS = ("--num-kv-blocks", "256", "--max-model-len", "1024")


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(num_prefill=1, num_decode=1, router_port=0, worker_args=WORKER_ARGS,
                       router_args=("--max-model-len", "1024"))  # fmt: skip
    with LocalCluster(spec) as running:
        yield running


def test_bench_sweep_over_grpc_writes_every_output_file(cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main([
        "bench", "sweep", "--url", cluster.address, "--rates", "8,16", "--num-prompts", "12",
        "--input-len", "uniform:16:64", "--output-len", "8", "--slo", "ttft:2000 tpot:500", "--seed", "1",
        "--max-duration", "20", "--drain-timeout", "20", "--scrape-interval", "0.25", "--gpus", "2",
        "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert code == 0
    for name in (
        "summary.json",
        "summary.csv",
        "report.md",
        "latency_cdf.png",
        "throughput_vs_rate.png",
        "goodput_vs_rate.png",
    ):
        assert (out / name).stat().st_size > 0, name
    study = json.loads((out / "summary.json").read_text())
    assert [r["request_rate"] for r in study["runs"]] == [8.0, 16.0]
    for run in study["runs"]:
        assert run["completed"] == 12 and run["failed"] == 0, run["errors_by_status"]
        assert run["total_output_tokens"] == 12 * 8  # ignore_eos + max_tokens: exact output lengths
        assert run["slo_attainment"] == 1.0 and run["request_goodput_per_gpu"] == pytest.approx(
            run["request_goodput"] / 2
        )
        for name in ("result.json", "requests.json", "requests.csv", "timeline.csv", "timeline.png"):
            assert (out / run["run"] / name).stat().st_size > 0, name
        timeline = (out / run["run"] / "timeline.csv").read_text()
        assert "prefill-0" in timeline and "decode-1" in timeline  # workers discovered through the router's registry
    report = (out / "report.md").read_text()
    assert "## Runs" in report and "decode-1 | decode" in report
    # `bench report` rebuilds the report from the files alone.
    (out / "report.md").unlink()
    assert main(["bench", "report", str(out), "--no-plots"]) == 0 and (out / "report.md").exists()
    assert "report:" in capsys.readouterr().out


def test_bench_run_over_the_openai_api(cluster, tmp_path):
    out = tmp_path / "http"
    code = main([
        "bench", "run", "--backend", "openai", "--url", f"http://{cluster.http_address}", "--request-rate", "inf",
        "--max-concurrency", "4", "--num-prompts", "8", "--input-len", "32", "--output-len", "6",
        "--max-duration", "20", "--out", str(out), "--quiet", "--no-plots",
    ])  # fmt: skip
    assert code == 0
    result = json.loads((out / "run-01-rate-inf-conc-4" / "result.json").read_text())
    assert result["completed"] == 8 and result["total_output_tokens"] == 48
    assert result["max_concurrent_requests"] <= 4 and result["input_lens"] == [32] * 8


def test_profile_then_plan(cluster, tmp_path):
    capacity = tmp_path / "capacity.json"
    code = main([
        "bench", "profile", "--url", cluster.address, "--prompt-lens", "32,128", "--batches", "1,4",
        "--decode-output-len", "12", "--out", str(capacity),
    ])  # fmt: skip
    assert code == 0 and capacity.with_suffix(".md").exists() and capacity.with_suffix(".png").exists()
    profile = json.loads(capacity.read_text())
    assert (profile["num_prefill"], profile["num_decode"]) == (1, 1)  # roles read from the workers' /metrics
    assert profile["kv_tokens_per_worker"] == 256 * 16
    assert [p["prompt_len"] for p in profile["prefill"]] == [32, 128] and len(profile["decode"]) == 2
    code = main([
        "bench", "plan", "--capacity", str(capacity), "--rate", "2", "--input-len", "uniform:32:128",
        "--output-len", "16", "--slo", "ttft:5000 tpot:1000", "--out", str(tmp_path / "plan"),
        "--validate", "--validate-requests", "8", "--validate-max-duration", "15",
        *(f"--worker-arg={a}" for a in WORKER_ARGS), "--router-arg=--max-model-len=1024",
    ])  # fmt: skip
    assert code == 0
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert (plan["num_prefill"], plan["num_decode"]) == (1, 1) and plan["num_mixed"] == 1
    [validation] = plan["validation"]  # the recommended shape, started with the local launcher
    assert validation["shape"] == "disaggregated" and validation["num_sent"] == 8 and validation["passed"]
    assert "Recommendation" in (tmp_path / "plan" / "plan.md").read_text()
