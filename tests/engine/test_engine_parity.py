"""The whole engine against transformers' Ernie4_5_MoeForCausalLM: greedy tokens, batching, chunking, caching.

Each config is a tiny random model saved with `save_pretrained`; our engine loads the folder.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import InvalidRequestError
from engine.sampling_params import SamplingParamsError
from tests.helpers.hf_models import make_hf_model_dir

NUM_TOKENS = 32
PROMPTS = [[5, 9, 13], list(range(20, 37)), [(7 * i) % 250 + 3 for i in range(41)]]
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)

CONFIGS = {
    "shared_topk2_gqa2": dict(moe_num_shared_experts=1, moe_k=2, num_attention_heads=4, num_key_value_heads=2),
    "no_shared_topk1_mha": dict(moe_num_shared_experts=0, moe_k=1, num_attention_heads=4, num_key_value_heads=4),
    "interval2_topk3": dict(moe_layer_interval=2, moe_k=3, num_attention_heads=4, num_key_value_heads=1),
}


@cache
def model_dir(name: str, tmp_root: str) -> str:
    """Config `name` saved under `tmp_root`, with untied output embeddings: with tied ones these random
    models repeat each prompt's last token (its logit is |embedding|^2) whatever the MoE layers
    compute -- with `interval2_topk3` even zeroing the experts' output changed none of the 32 tokens."""
    from pathlib import Path

    return str(make_hf_model_dir(Path(tmp_root) / name, seed=1, tie_word_embeddings=False, **CONFIGS[name]))


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_models"))


def hf_greedy(path: str, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding with transformers' own model and KV cache (EOS not special: we ignore it too)."""
    from transformers import DynamicCache

    model = _hf_model(path)
    past = DynamicCache(config=model.config)
    step_ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(num_tokens):
            result = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            step_ids = torch.tensor([[token]])
    return out


@cache
def _hf_model(path: str):
    from transformers import Ernie4_5_MoeForCausalLM

    return Ernie4_5_MoeForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_greedy_matches_transformers_and_single_runs(name, tmp_root):
    check_batched_greedy_matches_transformers_and_single_runs(model_dir(name, tmp_root))


# The check_* functions take the engine's constructor: tests/engine/test_parity_with_moe_kernel.py
# passes one that swaps the Triton MoE kernels in.
def check_batched_greedy_matches_transformers_and_single_runs(path: str, make_llm: Callable[..., LLM] = LLM) -> None:
    llm = make_llm(model=path, dtype="float32")
    batched = [list(o.token_ids) for o in llm.generate(PROMPTS, GREEDY)]
    for prompt, tokens in zip(PROMPTS, batched, strict=True):
        assert len(tokens) == NUM_TOKENS
        assert tokens == hf_greedy(path, prompt, NUM_TOKENS)
        assert list(llm.generate(prompt, GREEDY)[0].token_ids) == tokens


def test_chunked_prefill_and_prefix_hits_give_cold_tokens(tmp_root):
    check_chunked_prefill_and_prefix_hits_give_cold_tokens(model_dir("shared_topk2_gqa2", tmp_root))


def check_chunked_prefill_and_prefix_hits_give_cold_tokens(path: str, make_llm: Callable[..., LLM] = LLM) -> None:
    cold = make_llm(model=path, dtype="float32", enable_prefix_caching=False)
    expected = [list(o.token_ids) for o in cold.generate(PROMPTS, GREEDY)]

    chunked = make_llm(model=path, dtype="float32", max_num_batched_tokens=8, enable_prefix_caching=False)
    assert [list(o.token_ids) for o in chunked.generate(PROMPTS, GREEDY)] == expected

    cached = make_llm(model=path, dtype="float32", block_size=4)
    first = cached.generate(PROMPTS, GREEDY)
    again = cached.generate(PROMPTS, GREEDY)
    assert [list(o.token_ids) for o in first] == expected
    assert [list(o.token_ids) for o in again] == expected
    assert [o.num_cached_tokens for o in again] == [0, 16, 40]  # all full blocks before the last token
    # A longer prompt sharing the cached prefix also matches a cold run.
    longer = PROMPTS[2] + [11, 12, 13, 14, 15]
    assert cached.generate(longer, GREEDY)[0].token_ids == cold.generate(longer, GREEDY)[0].token_ids
    cached.engine.check_idle_invariants()


def test_preemption_under_a_small_kv_pool_keeps_tokens(tmp_root):
    path = model_dir("shared_topk2_gqa2", tmp_root)
    expected = [list(o.token_ids) for o in LLM(model=path, dtype="float32").generate(PROMPTS, GREEDY)]
    small = LLM(model=path, dtype="float32", block_size=4, num_kv_blocks=26)  # 3 prompts need 31 at the end
    out = small.generate(PROMPTS, GREEDY)
    assert [list(o.token_ids) for o in out] == expected
    assert small.engine.scheduler.stats.num_preemptions > 0
    small.engine.check_idle_invariants()


def test_logprobs_match_transformers_distribution(tmp_root):
    path = model_dir("shared_topk2_gqa2", tmp_root)
    llm = LLM(model=path, dtype="float32")
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=3, temperature=0, logprobs=5, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    model = _hf_model(path)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[1]])).logits[0, -1]
    expected = torch.log_softmax(logits, -1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert abs(first.logprob - float(expected[first.token_id])) < 1e-4
    assert [t for t, _ in first.top] == torch.topk(expected, 5).indices.tolist()
    assert first.top[0][0] == first.token_id  # greedy picks the most likely token


def test_seeded_sampling_is_reproducible_and_differs_by_seed():
    llm = LLM(model="tiny")
    params = [
        SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=s, ignore_eos=True) for s in (1, 1, 2)
    ]
    a, b, c = (list(o.token_ids) for o in llm.generate(["same prompt"] * 3, params))
    assert a == b and a != c


def test_stop_strings_and_eos_finish_requests():
    llm = LLM(model="tiny")
    free = llm.generate("abc", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    stop = free.text[3:5]
    stopped = llm.generate("abc", SamplingParams(max_tokens=24, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stop not in stopped.text and free.text.startswith(stopped.text)
    llm.engine.check_idle_invariants()


@pytest.mark.parametrize(
    ("prompt", "message"),
    [([], "prompt is empty"), ([1, 99999], "outside the vocabulary"), ([1] * 9000, "context holds")],
)
def test_bad_prompts_raise_and_engine_keeps_serving(prompt, message):
    llm = LLM(model="tiny")
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate([prompt], GREEDY)
    assert len(llm.generate("still serving", SamplingParams(max_tokens=4))[0].token_ids) >= 1
    llm.engine.check_idle_invariants()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"top_k": -3}, "top_k"),
    ],
)
def test_nonsense_sampling_values_name_the_value(kwargs, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**kwargs)
