"""Workloads and arrival processes: seeded, with the distributions they claim."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

from engine.tokenizer import Tokenizer
from load_tests.arrivals import ArrivalConfig, arrival_offsets, read_trace
from load_tests.workload import LengthDist, TokenPool, WorkloadConfig, build_workload


def test_length_distributions_parse_sample_and_clip():
    rng = np.random.default_rng(0)
    assert (LengthDist.parse("128").sample(rng, 5) == 128).all()
    uniform = LengthDist.parse("uniform:10:20").sample(rng, 2000)
    assert uniform.min() == 10 and uniform.max() == 20
    normal = LengthDist.parse("normal:100:10").sample(rng, 4000)
    assert abs(normal.mean() - 100) < 1.5 and abs(normal.std() - 10) < 1.0
    lognormal = LengthDist.parse("lognormal:200:0.5").sample(rng, 20000)
    assert abs(lognormal.mean() - 200) / 200 < 0.03  # MEAN is the mean of the lengths
    assert LengthDist.parse("normal:5:50").sample(rng, 1000).min() >= 1
    assert LengthDist.parse({"dist": "uniform", "min": 4, "max": 8}).describe() == "uniform:4:8"
    assert LengthDist.parse("lognormal:200:0.5").quantile(0.5) == pytest.approx(200 * math.exp(-0.125))
    for bad in ("pareto:1:2", "uniform:9:3", "fixed:1:2", "uniform:a:b"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_random_workload_is_seeded_and_exact_in_lengths():
    config = WorkloadConfig("random", 20, LengthDist.parse("uniform:8:32"), LengthDist.parse("normal:16:4"), seed=3)
    a, b = build_workload(config), build_workload(config)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert all(len(s.prompt) == s.prompt_len for s in a)
    pool = set(TokenPool.for_model("tiny").ids)
    assert all(set(s.prompt) <= pool for s in a)  # no special tokens
    other = build_workload(WorkloadConfig("random", 20, config.input_len, config.output_len, seed=4))
    assert [s.prompt for s in other] != [s.prompt for s in a]


def test_shared_prefix_workload_reuses_prefixes_at_the_ratio():
    config = WorkloadConfig("shared-prefix", 400, LengthDist.parse("8"), LengthDist.parse("4"), seed=1,
                            num_prefixes=3, prefix_len=32, prefix_reuse=0.75)  # fmt: skip
    specs = build_workload(config)
    groups = [s.prefix_group for s in specs]
    assert abs(sum(g >= 0 for g in groups) / 400 - 0.75) < 0.06
    for group in range(3):
        prefixes = {tuple(s.prompt[:32]) for s in specs if s.prefix_group == group}
        assert len(prefixes) == 1
    assert all(s.prompt_len == 40 for s in specs)


def test_sharegpt_file_gives_prompts_and_output_lengths(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "Tell me a story about a cat."},
                           {"from": "gpt", "value": "Once upon a time there was a cat."}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there!"}]},  # too short
        {"conversations": [{"from": "gpt", "value": "no question"}]},
    ]  # fmt: skip
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    specs = build_workload(WorkloadConfig("sharegpt", 3, dataset_path=str(path), prompt_format="text"))
    assert [s.prompt for s in specs] == ["Tell me a story about a cat."] * 3
    tokenizer = Tokenizer.tiny()
    assert specs[0].max_tokens == len(tokenizer.encode("Once upon a time there was a cat."))
    assert specs[0].prompt_len == len(tokenizer.encode("Tell me a story about a cat."))
    with pytest.raises(ValueError, match="no usable"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data[1:]))
        build_workload(WorkloadConfig("sharegpt", 1, dataset_path=str(bad)))


def test_multimodal_requests_carry_png_images():
    specs = build_workload(WorkloadConfig("multimodal", 2, images_per_request=2, image_size=8, prompt_format="text"))
    assert all(len(s.images) == 2 for s in specs)
    png = base64.b64decode(specs[0].images[0].split(",", 1)[1])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IHDR" in png[:20]


def test_arrival_processes_have_the_rate_and_burstiness_they_claim():
    n = 20000
    poisson = np.diff(arrival_offsets(ArrivalConfig("poisson", 10.0, seed=1), n))
    assert abs(poisson.mean() - 0.1) < 0.004 and abs(poisson.std() / poisson.mean() - 1) < 0.05
    bursty = np.diff(arrival_offsets(ArrivalConfig("gamma", 10.0, burstiness=0.25, seed=1), n))
    assert abs(bursty.mean() - 0.1) < 0.006 and abs(bursty.std() / bursty.mean() - 2.0) < 0.15  # CV = 1/sqrt(shape)
    constant = arrival_offsets(ArrivalConfig("constant", 4.0), 5)
    assert constant.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert (arrival_offsets(ArrivalConfig("poisson", math.inf), 3) == 0).all()
    assert (
        arrival_offsets(ArrivalConfig("poisson", 3.0, seed=7), 50)
        == arrival_offsets(ArrivalConfig("poisson", 3.0, seed=7), 50)
    ).all()


def test_trace_replay_rebases_scales_and_cycles(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 5000, "input_length": 10, "output_length": 3}, {"timestamp": 5500}, {"timestamp": 6000}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    config = ArrivalConfig("trace", trace_path=str(path), trace_time_unit="ms", trace_speedup=2.0)
    assert [r.offset_s for r in read_trace(config)] == pytest.approx([0.0, 0.25, 0.5])
    assert read_trace(config)[0].input_length == 10
    offsets = arrival_offsets(config, 5)
    assert offsets[:3].tolist() == pytest.approx([0.0, 0.25, 0.5])
    assert offsets[3] > offsets[2]  # the second pass starts after the first
