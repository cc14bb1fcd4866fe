"""The metric math on records with exact, hand-made timestamps (no sockets, no clock)."""

from __future__ import annotations

import math

import pytest

from load_tests.backends import RequestRecord
from load_tests.metrics import Slo, request_metrics, stats_ms, summarize


def record(index: int, sent: float, ttft: float, itl: float, tokens: int, status: str = "OK") -> RequestRecord:
    r = RequestRecord(index, prompt_len=10, max_tokens=tokens, scheduled_at=sent, sent_at=sent, status=status)
    if status == "OK":
        r.chunk_times = [sent + ttft + k * itl for k in range(tokens)]
        r.chunk_tokens = [1] * tokens
        r.ended_at = r.chunk_times[-1]
        r.num_output_tokens = tokens
    else:
        r.ended_at = sent + 0.01
        r.error = "scripted"
    return r


def test_per_request_ttft_tpot_itl_e2el_follow_the_definitions():
    m = request_metrics(record(0, 1.0, ttft=0.1, itl=0.02, tokens=11))
    assert m.ttft == pytest.approx(0.1)
    assert m.tpot == pytest.approx(0.02)  # (last - first) / (tokens - 1)
    assert m.itl == pytest.approx([0.02] * 10)
    assert m.e2el == pytest.approx(0.1 + 10 * 0.02)


def test_a_message_with_several_tokens_counts_them_for_tpot_but_is_one_itl_gap():
    r = record(0, 0.0, ttft=0.1, itl=0.04, tokens=3)
    r.chunk_tokens = [1, 2, 1]  # 4 tokens in 3 messages
    r.num_output_tokens = 4
    m = request_metrics(r)
    assert m.tpot == pytest.approx(0.08 / 3)
    assert len(m.itl) == 2


def test_one_token_output_has_no_tpot_and_meets_any_tpot_slo():
    m = request_metrics(record(0, 0.0, ttft=0.05, itl=0.0, tokens=1), Slo(ttft_ms=100, tpot_ms=1))
    assert m.tpot is None and m.meets_slo


def test_goodput_counts_exactly_the_requests_that_met_both_slos():
    slo = Slo(ttft_ms=200, tpot_ms=30, attainment=0.5)
    records = [
        record(0, 0.0, ttft=0.05, itl=0.01, tokens=5),  # good
        record(1, 0.1, ttft=0.05, itl=0.01, tokens=5),  # good
        record(2, 0.2, ttft=0.201, itl=0.01, tokens=5),  # TTFT just over
        record(3, 0.3, ttft=0.05, itl=0.031, tokens=5),  # TPOT just over
        record(4, 0.4, ttft=0.0, itl=0.0, tokens=1, status="RESOURCE_EXHAUSTED"),
        RequestRecord(5, 10, 5),  # never sent (cut off by the time limit)
    ]
    s = summarize(records, slo, start=0.0)
    assert s["num_sent"] == 5 and s["completed"] == 4 and s["failed"] == 1
    assert s["num_good"] == 2
    assert s["duration"] == pytest.approx(0.3 + 0.05 + 4 * 0.031)
    assert s["request_goodput"] == pytest.approx(2 / s["duration"])
    assert s["request_throughput"] == pytest.approx(4 / s["duration"])
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["slo_met"] is False
    assert s["errors_by_status"] == {"RESOURCE_EXHAUSTED": 1}
    assert s["total_output_tokens"] == 20 and s["total_input_tokens"] == 40


def test_summary_statistics_and_vllm_field_names():
    records = [record(i, i * 1.0, ttft=0.01 * (i + 1), itl=0.005, tokens=3) for i in range(10)]
    s = summarize(records, None, percentiles=(50, 90, 99))
    ttfts_ms = [10.0 * (i + 1) for i in range(10)]
    assert s["mean_ttft_ms"] == pytest.approx(55.0)
    assert s["median_ttft_ms"] == pytest.approx(55.0)
    assert s["p90_ttft_ms"] == pytest.approx(91.0)  # numpy linear interpolation, as vLLM
    assert s["max_ttft_ms"] == pytest.approx(100.0) and s["min_ttft_ms"] == pytest.approx(10.0)
    assert s["std_ttft_ms"] == pytest.approx(math.sqrt(sum((x - 55) ** 2 for x in ttfts_ms) / 10))
    assert s["mean_tpot_ms"] == pytest.approx(5.0) and s["p99_itl_ms"] == pytest.approx(5.0)
    assert s["request_goodput"] is None and s["slo_attainment"] is None
    for key in ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls",
                "errors", "max_output_tokens_per_s", "max_concurrent_requests"):  # fmt: skip
        assert key in s, key
    assert s["max_concurrent_requests"] == 1


def test_stats_of_nothing_are_none():
    assert stats_ms("ttft", [], (50,)) == {
        "mean_ttft_ms": None, "median_ttft_ms": None, "std_ttft_ms": None, "min_ttft_ms": None,
        "max_ttft_ms": None, "p50_ttft_ms": None,
    }  # fmt: skip


def test_slo_parsing_and_validation():
    slo = Slo.parse("ttft:1000 tpot:50", attainment=0.9)
    assert (slo.ttft_ms, slo.tpot_ms, slo.e2el_ms, slo.attainment) == (1000, 50, None, 0.9)
    assert Slo.parse("ttft:1,e2el:5").e2el_ms == 5
    assert not Slo.parse("").is_set
    with pytest.raises(ValueError, match="ttft:MS"):
        Slo.parse("latency:5")
    with pytest.raises(ValueError, match="attainment"):
        Slo(ttft_ms=1, attainment=1.5)
