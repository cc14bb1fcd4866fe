"""The OpenAI-compatible HTTP API on a real local cluster (router + prefill + decode processes),
driven by the official `openai` client and raw HTTP, with an API key configured.

The tiny model's text is noise, so each test computes what the response must be from the
single-process engine (`engine.LLM`) on the same prompt and seed, run through the same parsers:
the cluster must return exactly that, split into reasoning, answer and tool calls."""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from protos.pdserve.v1 import generate_pb2, generate_pb2_grpc
from router.openai_protocol import ParseOptions, parse_chat
from router.reasoning import THINK_END, parse_reasoning
from router.server import render_chat
from router.tool_calls import ToolCallParser
from tests.integration.conftest import start_cluster, wait_idle

KEY = "sk-pdserve-test"
USER = [{"role": "user", "content": "Think, then answer: 2+2?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
# Seeds whose sampled output (48 tokens, temperature 1) closes the think block on the tiny
# preset, so the reasoning / answer split is not trivial; the first one that does is used.
THINKING_SEEDS = (17, 25)
SAMPLED = {"max_tokens": 48, "temperature": 1.0}


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster(1, 1, router_args=("--api-key", KEY))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny", max_model_len=1024)


@pytest.fixture
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key=KEY, max_retries=0, timeout=120)


def prompt_ids(llm: LLM, body: dict) -> list[int]:
    """The prompt the router builds for a chat body (same parsing, same template rendering)."""
    request = parse_chat({"model": "tiny", **body}, ParseOptions("tiny")).requests[0]
    return llm.tokenizer.encode(render_chat(llm.tokenizer, request.chat))


@pytest.fixture(scope="module")
def thinking_outputs(llm):
    """Offline outputs for USER with thinking on: seed -> text (both thinking seeds and seed + 1)."""
    ids = prompt_ids(llm, {"messages": USER})
    seeds = sorted({*THINKING_SEEDS, THINKING_SEEDS[0] + 1})
    outs = llm.generate([ids] * len(seeds), [SamplingParams(**SAMPLED, seed=s) for s in seeds])
    return {s: o for s, o in zip(seeds, outs, strict=True)}


def test_thinking_on_splits_exactly_what_the_engine_generates(client, cluster, thinking_outputs):
    seed = next((s for s in THINKING_SEEDS if THINK_END in thinking_outputs[s].text), None)
    assert seed is not None, "no THINKING_SEEDS output closes the think block any more: pick new seeds"
    offline = thinking_outputs[seed]
    reasoning, content = parse_reasoning(offline.text)
    assert reasoning and content

    whole = client.chat.completions.create(model="tiny", messages=USER, seed=seed, **SAMPLED)
    message = whole.choices[0].message
    assert (message.reasoning_content, message.content) == (reasoning, content)
    assert whole.usage.completion_tokens == len(offline.token_ids)
    assert whole.usage.prompt_tokens == len(offline.prompt_token_ids)

    stream = client.chat.completions.create(
        model="tiny", messages=USER, seed=seed, stream=True, stream_options={"include_usage": True}, **SAMPLED
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content
    assert chunks[-1].usage.completion_tokens == len(offline.token_ids)
    wait_idle(cluster)


def test_n_choices_use_consecutive_seeds(client, thinking_outputs):
    seed = THINKING_SEEDS[0]
    response = client.chat.completions.create(model="tiny", messages=USER, seed=seed, n=2, **SAMPLED)
    for i, choice in enumerate(response.choices):
        reasoning, content = parse_reasoning(thinking_outputs[seed + i].text)
        assert (choice.index, choice.message.reasoning_content, choice.message.content) == (i, reasoning, content)
    assert response.usage.completion_tokens == sum(len(thinking_outputs[seed + i].token_ids) for i in range(2))


def test_thinking_off_vllm_and_fastdeploy_ways(client, cluster, llm):
    ids = prompt_ids(llm, {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}})
    assert llm.tokenizer.decode(ids, skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    offline = llm.generate(ids, SamplingParams(max_tokens=24, temperature=0))[0]
    vllm_way = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=24,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert vllm_way.choices[0].message.content == offline.text
    assert vllm_way.choices[0].message.reasoning_content is None
    body = {
        "model": "tiny",
        "messages": USER,
        "max_tokens": 24,
        "temperature": 0,
        "metadata": {"enable_thinking": False},
    }
    fastdeploy_way = httpx.post(
        f"http://{cluster.http_address}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert fastdeploy_way.json()["choices"][0]["message"]["content"] == offline.text


def test_completions_text_logprobs_and_stop_match_the_engine(client, llm):
    params = {"max_tokens": 16, "temperature": 1.0, "seed": 3}
    offline = llm.generate("Hello there", SamplingParams(**params, logprobs=2))[0]
    response = client.completions.create(model="tiny", prompt="Hello there", logprobs=2, **params)
    choice = response.choices[0]
    assert choice.text == offline.text and choice.finish_reason == "length"
    tokens = [llm.tokenizer.decode([t], skip_special_tokens=False) for t in offline.token_ids]
    assert choice.logprobs.tokens == tokens
    assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in offline.logprobs], abs=1e-4)
    decode = llm.tokenizer.decode
    expected_top = [{decode([t], skip_special_tokens=False) for t, _ in lp.top} for lp in offline.logprobs]
    assert [set(top) for top in choice.logprobs.top_logprobs] == expected_top  # keyed by text, as OpenAI's

    stop = offline.text[5:8]
    stopped = client.completions.create(model="tiny", prompt="Hello there", stop=[stop], **params)
    assert stopped.choices[0].text == offline.text[: offline.text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=[list(offline.prompt_token_ids)], stream=True, **params)
    assert "".join(c.choices[0].text for c in streamed) == offline.text


def test_tool_call_round_trip(client, cluster, llm):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": USER, "tools": TOOLS, "tool_choice": choice}
    api = parse_chat({"model": "tiny", **body}, ParseOptions("tiny"))
    ids = prompt_ids(llm, body)
    offline = llm.generate(ids, SamplingParams(max_tokens=16, temperature=0, stop=("</tool_call>",)))[0]
    parser = ToolCallParser()
    deltas = [parser.push(api.spec.tool_prefix), parser.push(offline.text), parser.finish()]
    expected_arguments = "".join(c.arguments for d in deltas for c in d.calls)

    response = client.chat.completions.create(model="tiny", max_tokens=16, temperature=0, **body)
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == expected_arguments
    assert response.usage.prompt_tokens == len(ids)
    streamed = client.chat.completions.create(model="tiny", max_tokens=16, temperature=0, stream=True, **body)
    pieces = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == expected_arguments

    # feed the call and its result back: the template renders both into the next prompt
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})},
    ]
    follow_up = {"messages": history, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}
    ids = prompt_ids(llm, follow_up)
    text = llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert f'<tool_call>{{"name": "get_weather", "arguments": {expected_arguments}}}</tool_call>' in text
    assert '<tool_response>\n{"forecast": "sunny"}\n</tool_response>' in text
    offline = llm.generate(ids, SamplingParams(max_tokens=12, temperature=0))[0]
    final = client.chat.completions.create(
        model="tiny",
        messages=history,
        tools=TOOLS,
        max_tokens=12,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert final.usage.prompt_tokens == len(ids)
    assert final.choices[0].message.content == offline.text
    wait_idle(cluster)


def test_raw_http_errors_and_api_key_on_both_apis(cluster):
    url = f"http://{cluster.http_address}"
    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"model": "tiny", "messages": USER, "max_tokens": 2}
    with httpx.Client(timeout=60) as http:
        assert http.post(url + "/v1/chat/completions", json=good).status_code == 401
        assert (
            http.post(url + "/v1/chat/completions", json=good, headers={"Authorization": "Bearer no"}).status_code
            == 401
        )
        assert http.get(url + "/health").status_code == 200  # probes need no key
        malformed = http.post(url + "/v1/chat/completions", content=b'{"messages": [', headers=auth)
        wrong_type = http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": "2"}, headers=auth)
        oversized = http.post(url + "/v1/completions", json={"prompt": "x" * (5 << 20)}, headers=auth)
        unknown = http.post(url + "/v1/chat/completions", json={**good, "frobnicate": True}, headers=auth)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "max_tokens"
    assert oversized.status_code == 413 and oversized.json()["error"]["type"] == "invalid_request_error"
    assert unknown.status_code == 200 and unknown.headers["X-Request-Id"] == unknown.json()["id"]

    request = generate_pb2.GenerateRequest(text="Hello")
    request.sampling.max_tokens = 2
    with grpc.insecure_channel(cluster.address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        messages = list(stub.Generate(request, timeout=30, metadata=[("authorization", f"Bearer {KEY}")]))
        assert sum(len(m.token_ids) for m in messages) == 2
    wait_idle(cluster)


def test_client_disconnect_mid_stream_frees_every_block(cluster):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 800, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"http://{cluster.http_address}/v1/completions"
    received = 0
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body, headers=headers) as response:
        for line in response.iter_lines():
            received += line.startswith("data: {")
            if received >= 3:
                break
    assert received >= 3
    wait_idle(cluster)
