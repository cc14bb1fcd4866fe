"""The harness against a server with known timings (real gRPC / HTTP sockets, fake model).

A TTFT of exactly 100 ms must be reported as 100 ms plus scheduling noise; goodput must count
exactly the requests that met both SLOs; bounds must cut runs short as documented.
"""

from __future__ import annotations

import json
import math

import grpc
import pytest

from load_tests.backends import BackendConfig
from load_tests.fake_server import FakeRequest, FakeServer, Timing
from load_tests.metrics import Slo, summarize
from load_tests.modes import RunConfig, SearchResult, execute, search
from load_tests.outputs import write_study
from load_tests.runner import RunLimits, run_load
from load_tests.scrape import MetricsSampler, Target, timeline
from load_tests.workload import LengthDist, RequestSpec, WorkloadConfig

NOISE_MS = 30.0  # asyncio timers + two busy cores; the lower bound is exact (nothing arrives early)


def specs(n: int, tokens: int = 6) -> list[RequestSpec]:
    """Request i carries token id 20 + i first, so a script can tell requests apart."""
    return [RequestSpec(i, [20 + i, 30, 31, 32], 4, tokens) for i in range(n)]


@pytest.fixture(scope="module")
def steady_server():
    with FakeServer(Timing(ttft_s=0.100, itl_s=0.020)) as server:
        yield server


@pytest.mark.parametrize("kind", ["grpc", "openai"])
def test_known_timings_are_reported_within_scheduling_noise(steady_server, kind):
    target = steady_server.grpc_address if kind == "grpc" else steady_server.http_url
    start, records = run_load(BackendConfig(kind, target), specs(8), [0.03 * i for i in range(8)], RunLimits(8, 10, 10))
    s = summarize(records, Slo(ttft_ms=150, tpot_ms=25), start=start)
    assert s["completed"] == 8 and s["total_output_tokens"] == 48
    assert s["min_ttft_ms"] >= 100.0 and s["max_ttft_ms"] <= 100.0 + NOISE_MS
    assert s["median_tpot_ms"] == pytest.approx(20.0, abs=3.0)
    assert s["median_itl_ms"] == pytest.approx(20.0, abs=3.0)
    assert s["min_e2el_ms"] >= 200.0 and s["median_e2el_ms"] <= 200.0 + NOISE_MS  # 100 + 5 × 20
    assert s["num_good"] == 8 and s["slo_attainment"] == 1.0
    assert s["input_lens"] == [4] * 8  # the server's count (metadata / usage)


def script(request: FakeRequest) -> Timing:
    """By request index: 0-3 good, 4-5 slow first token, 6-7 slow tokens, 8-9 rejected."""
    i = request.prompt_ids[0] - 20
    if i < 4:
        return Timing(0.030, 0.010)
    if i < 6:
        return Timing(0.400, 0.010)
    if i < 8:
        return Timing(0.030, 0.060)
    return Timing(error=grpc.StatusCode.RESOURCE_EXHAUSTED)


@pytest.mark.parametrize("kind, rejected", [("grpc", "RESOURCE_EXHAUSTED"), ("openai", "HTTP_429")])
def test_goodput_counts_exactly_the_requests_that_met_both_slos(kind, rejected):
    with FakeServer(script) as server:
        target = server.grpc_address if kind == "grpc" else server.http_url
        start, records = run_load(BackendConfig(kind, target), specs(10), [0.0] * 10, RunLimits(10, 10, 10))
    slo = Slo(ttft_ms=200, tpot_ms=30, attainment=0.9)
    s = summarize(records, slo, start=start)
    assert s["num_sent"] == 10 and s["completed"] == 8
    assert s["num_good"] == 4
    assert s["request_goodput"] == pytest.approx(4 / s["duration"])
    assert s["slo_attainment"] == pytest.approx(0.4) and s["slo_met"] is False
    assert s["errors_by_status"] == {rejected: 2}


def test_several_client_processes_measure_the_same_timings(steady_server):
    start, records = run_load(
        BackendConfig("grpc", steady_server.grpc_address), specs(8), [0.02 * i for i in range(8)], RunLimits(8, 10, 10),
        num_procs=2,
    )  # fmt: skip
    s = summarize(records, None, start=start)
    assert s["completed"] == 8 and [r.index for r in records] == list(range(8))
    assert s["min_ttft_ms"] >= 100.0 and s["max_ttft_ms"] <= 100.0 + NOISE_MS


def test_time_bounds_cut_sending_and_cancel_stragglers():
    with FakeServer(Timing(0.01, 0.5)) as server:  # 10 tokens: a 4.5 s request
        start, records = run_load(
            BackendConfig("grpc", server.grpc_address), specs(4, tokens=10), [0.0, 0.0, 0.1, 5.0],
            RunLimits(4, max_duration_s=0.5, drain_timeout_s=0.3),
        )  # fmt: skip
    assert [r.status for r in records] == ["INCOMPLETE", "INCOMPLETE", "INCOMPLETE", "NOT_SENT"]
    assert max(r.ended_at for r in records[:3]) - start < 0.5 + 0.3 + 0.3
    s = summarize(records, Slo(ttft_ms=100), start=start)
    assert s["num_sent"] == 3 and s["errors_by_status"] == {"INCOMPLETE": 3} and s["slo_attainment"] == 0.0


def test_concurrency_cap_is_a_closed_loop(steady_server):
    start, records = run_load(
        BackendConfig("openai", steady_server.http_url), specs(6, tokens=2), [0.0] * 6, RunLimits(6, 10, 10),
        max_concurrency=2,
    )  # fmt: skip
    s = summarize(records, None, start=start)
    assert s["max_concurrent_requests"] == 2
    assert s["duration"] >= 3 * 0.12  # three waves of 100 + 20 ms


def test_server_metrics_are_sampled_into_a_timeline(steady_server):
    sampler = MetricsSampler([Target.parse(f"fake={steady_server.metrics_url}")], interval_s=0.1)
    with sampler:
        start, _ = run_load(BackendConfig("grpc", steady_server.grpc_address), specs(6), [0.05 * i for i in range(6)],
                            RunLimits(6, 10, 10))  # fmt: skip
    rows = timeline(sampler.samples, start)
    assert len(rows) >= 3 and {r["target"] for r in rows} == {"fake"}
    assert all(r["role"] == "decode" and r["role_code"] == 1 for r in rows)
    assert max(r["running"] for r in rows) >= 1
    assert any(r.get("kv_recv_gbps", 0) > 0 for r in rows)  # the byte counter became a rate


def test_search_bisects_to_the_highest_passing_rate(monkeypatch):
    from load_tests import modes

    def fake_execute(config, specs=None, label=""):
        rate = config.arrival.rate
        return modes.RunResult({"request_rate": rate, "slo_met": rate <= 3.3}, [], [], [])

    monkeypatch.setattr(modes, "execute", fake_execute)
    monkeypatch.setattr(modes, "build_specs", lambda config: [])
    config = RunConfig(BackendConfig("grpc", "unused:1"), slo=Slo(ttft_ms=100))
    found = search(config, start_rate=1.0, max_runs=10, tolerance=0.05)
    assert isinstance(found, SearchResult)
    assert found.best_rate <= 3.3 < found.lowest_failing_rate
    assert (found.lowest_failing_rate - found.best_rate) / found.best_rate <= 0.05
    assert [r.rate for r in found.runs][:3] == [1.0, 2.0, 4.0]  # doubling until it fails, then bisection
    bounded = search(config, start_rate=1.0, max_runs=3, tolerance=0.0)
    assert len(bounded.runs) == 3


def test_each_search_run_sends_prompts_of_its_own(monkeypatch):
    from load_tests import modes

    sent: list[list[tuple[int, ...]]] = []

    def fake_execute(config, specs=None, label=""):
        sent.append([tuple(spec.prompt) for spec in specs])
        rate = config.arrival.rate
        return modes.RunResult({"request_rate": rate, "slo_met": rate <= 3.3}, [], [], [])

    monkeypatch.setattr(modes, "execute", fake_execute)
    workload = WorkloadConfig("random", 8, LengthDist.parse("16"), LengthDist.parse("4"), seed=5)
    config = RunConfig(BackendConfig("grpc", "unused:1"), workload=workload, slo=Slo(ttft_ms=100))
    found = search(config, start_rate=1.0, max_runs=4, tolerance=0.0)
    assert len(found.runs) == len(sent) == 4
    assert sent[0] == [tuple(spec.prompt) for spec in modes.build_specs(config)]  # run 1: the seed given
    prompts = [prompt for run in sent for prompt in run]
    assert len(set(prompts)) == len(prompts)  # no prompt is sent twice across the runs


def test_a_run_writes_every_output_file(steady_server, tmp_path):
    config = RunConfig(
        BackendConfig("grpc", steady_server.grpc_address),
        workload=WorkloadConfig("random", 6, LengthDist.parse("8"), LengthDist.parse("4")),
        limits=RunLimits(6, 10, 10),
        slo=Slo(ttft_ms=150, tpot_ms=25),
        scrape_targets=(Target("fake", steady_server.metrics_url),),
        scrape_interval_s=0.1,
        progress=False,
    )
    results = [execute(config.at_rate(20.0)), execute(config.at_rate(40.0))]
    report = write_study(tmp_path, "sweep", results)
    for name in (
        "summary.json",
        "summary.csv",
        "report.md",
        "latency_cdf.png",
        "throughput_vs_rate.png",
        "goodput_vs_rate.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    for run in ("run-01-rate-20", "run-02-rate-40"):
        for name in ("result.json", "requests.json", "requests.csv", "timeline.csv", "timeline.png"):
            assert (tmp_path / run / name).stat().st_size > 0, f"{run}/{name}"
    result = json.loads((tmp_path / "run-01-rate-20" / "result.json").read_text())
    assert result["completed"] == 6 and len(result["ttfts"]) == 6 and result["request_rate"] == 20.0
    assert 100.0 <= result["median_ttft_ms"] <= 100.0 + NOISE_MS
    assert "| run-02-rate-40 | 40.000 | 6 | 6 | 0 |" in report.read_text()
    assert math.isfinite(json.loads((tmp_path / "summary.json").read_text())["runs"][1]["request_goodput"])


def test_seconds_per_run_holds_each_rate_for_the_same_time(steady_server):
    config = RunConfig(
        BackendConfig("grpc", steady_server.grpc_address),
        workload=WorkloadConfig("random", 100, LengthDist.parse("8"), LengthDist.parse("2")),
        limits=RunLimits(100, 10, 10),
        progress=False,
        seconds_per_run=0.5,
    )
    assert execute(config.at_rate(40.0)).summary["num_sent"] == 20
    assert execute(config.at_rate(4.0)).summary["num_sent"] == 10  # at least 10
