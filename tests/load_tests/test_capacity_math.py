"""Capacity planning arithmetic on a synthetic profile (numbers checked by hand)."""

from __future__ import annotations

import math

import pytest

from load_tests.capacity import (
    CapacityProfile,
    DecodePoint,
    PrefillPoint,
    Traffic,
    erlang_c,
    mmc_wait_quantile,
    plan,
    plan_markdown,
)
from load_tests.metrics import Slo
from load_tests.workload import LengthDist


def synthetic_profile() -> CapacityProfile:
    # prefill: 10k tokens/s at any length, unloaded TTFT = 20 ms + 0.1 ms per token
    prefill = [PrefillPoint(n, 0.02 + 0.0001 * n, 10_000.0) for n in (100, 200, 400, 800)]
    # decode: TPOT = 10 ms + 1 ms per sequence in the batch
    decode = [DecodePoint(b, 300, 0.010 + 0.001 * b, b / (0.010 + 0.001 * b)) for b in (1, 4, 16, 32)]
    return CapacityProfile(
        "tiny", "test", 1, 1, gpus_per_worker=1, kv_tokens_per_worker=None, prefill=prefill, decode=decode
    )


def test_erlang_c_matches_known_values():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.5) == 1.0  # unstable
    # M/M/1, λ = 5, μ = 10: P(W > t) = 0.5 e^{-5t} → the 90th percentile is ln(5)/5
    assert mmc_wait_quantile(1, 5.0, 10.0, 0.9) == pytest.approx(math.log(5) / 5)
    assert mmc_wait_quantile(4, 1.0, 10.0, 0.9) == 0.0  # almost nobody waits
    assert mmc_wait_quantile(1, 10.0, 10.0, 0.9) == math.inf


def test_decode_fit_recovers_a_linear_step_time():
    p = synthetic_profile()
    a, b, c = p.decode_fit()
    assert (a, b, c) == pytest.approx((0.010, 0.001, 0.0), abs=1e-9)
    assert p.max_batch(0.050, 300) == pytest.approx(40.0)


def test_plan_counts_follow_the_documented_arithmetic():
    traffic = Traffic(
        50.0, LengthDist.parse("400"), LengthDist.parse("200"), Slo(ttft_ms=200, tpot_ms=50, attainment=0.9)
    )
    result = plan(synthetic_profile(), traffic, decode_headroom=0.9)
    # prefill: μ = 10000/400 = 25 req/s, λ/μ = 2 → smallest c with TTFT_p90 = 60 ms + wait ≤ 200 ms
    expected_c = next(c for c in range(3, 20) if 0.06 + mmc_wait_quantile(c, 50.0, 25.0, 0.9) <= 0.2)
    assert result.num_prefill == expected_c
    # decode: S = 50 × 200 × 0.05 = 500 sequences; batch at TPOT 50 ms = 40, × 0.9 = 36 → ⌈500/36⌉ = 14
    assert result.num_decode == 14
    assert result.disaggregated_gpus == expected_c + 14
    assert result.num_mixed is not None and result.colocated_gpus == result.num_mixed
    text = "\n".join(result.lines)
    assert "50 req/s × 400 tokens = 20,000 prompt tokens/s" in text
    assert "⌈500.0 / 36.0⌉ = 14 decode worker(s)" in text
    assert "Colocated" in text and "Recommendation" in text
    assert "# pdserve capacity plan" in plan_markdown(result)


def test_plan_reports_an_unreachable_ttft():
    traffic = Traffic(1.0, LengthDist.parse("800"), LengthDist.parse("10"), Slo(ttft_ms=50, tpot_ms=50))
    result = plan(synthetic_profile(), traffic)
    assert result.num_prefill is None and result.disaggregated_gpus is None
    assert any("exceeds" in line for line in result.lines)


def test_traffic_and_profile_files_round_trip(tmp_path):
    path = tmp_path / "traffic.yaml"
    path.write_text("rate: 4\ninput: lognormal:256:0.5\noutput: {dist: uniform, min: 32, max: 96}\n"
                    "slo: {ttft_ms: 1000, tpot_ms: 50, attainment: 0.95}\n")  # fmt: skip
    traffic = Traffic.load(path)
    assert traffic.rate == 4 and traffic.output_len.mean == 64 and traffic.slo.attainment == 0.95
    saved = tmp_path / "capacity.json"
    synthetic_profile().save(saved)
    assert CapacityProfile.load(saved) == synthetic_profile()
    bad = tmp_path / "bad.yaml"
    bad.write_text("rate: 4\n")
    with pytest.raises(ValueError, match="needs rate"):
        Traffic.load(bad)
