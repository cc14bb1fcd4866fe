"""The OpenAI-compatible HTTP API in-process, driven by the official `openai` client and raw
HTTP, over a scripted cluster (see `scripted.py`): response shapes, streaming, thinking,
tool calls, logprobs, errors, auth, queueing and cancellation."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from engine.tokenizer import Tokenizer
from protos.pdserve.v1 import common_pb2
from router.auth import ApiKeys
from router.server import GenerationService, RouterConfig
from router.workers import WorkerPool
from tests.router.scripted import ScriptedService, serving

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
THINKING_OUTPUT = "<think>\nThe user asks.\n</think>\n\n<response>\nIt is sunny.\n</response>\n"
TOOL_OUTPUT = (
    'I need the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
)


def run(coro):
    return asyncio.run(coro)


def client(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# ------------------------------------------------------------------------------- chat


def test_chat_splits_reasoning_from_the_answer_whole_and_streamed():
    service = ScriptedService(pieces(THINKING_OUTPUT))

    async def scenario():
        async with serving(service) as url:
            api = client(url)
            whole = await api.chat.completions.create(model="tiny", messages=USER, max_tokens=50)
            stream = await api.chat.completions.create(
                model="tiny", messages=USER, max_tokens=50, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
            return whole, chunks

    whole, chunks = run(scenario())
    message = whole.choices[0].message
    assert (message.reasoning_content, message.content) == ("The user asks.", "It is sunny.")
    assert whole.choices[0].finish_reason == "stop" and whole.id.startswith("chatcmpl-")
    assert whole.usage.completion_tokens == len(pieces(THINKING_OUTPUT))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("The user asks.", "It is sunny.")
    assert sum(1 for d in deltas if getattr(d, "reasoning_content", None)) > 1  # streamed, not at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id for c in chunks)


def test_thinking_off_by_chat_template_kwargs_or_metadata():
    service = ScriptedService(["Plain ", "answer."])

    async def scenario():
        async with serving(service) as url:
            whole = await client(url).chat.completions.create(
                model="tiny", messages=USER, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
            )
            async with httpx.AsyncClient() as http:
                raw = await http.post(
                    url + "/v1/chat/completions", json={"messages": USER, "metadata": {"enable_thinking": False}}
                )
            return whole, raw

    whole, raw = run(scenario())
    assert whole.choices[0].message.content == "Plain answer."
    assert whole.choices[0].message.reasoning_content is None
    assert raw.status_code == 200 and raw.json()["choices"][0]["message"]["content"] == "Plain answer."
    assert all(p.endswith("Assistant: <think>\n\n</think>\n\n") for p in service.prompts)


def test_tool_call_streams_incrementally_and_round_trips_through_the_template():
    service = ScriptedService(
        lambda req: pieces(TOOL_OUTPUT, 2) if len(service.prompts) < 3 else ["</think>\n\nIt is sunny."]
    )

    async def scenario():
        async with serving(service) as url:
            api = client(url)
            whole = await api.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
            stream = await api.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, stream=True)
            chunks = [chunk async for chunk in stream]
            call = whole.choices[0].message.tool_calls[0]
            history = [
                *USER,
                whole.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21°C"},
            ]
            final = await api.chat.completions.create(model="tiny", messages=history, tools=TOOLS)
            return whole, chunks, final

    whole, chunks, final = run(scenario())
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.reasoning_content == "I need the tool."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})

    pieces_seen = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces_seen[0].id and pieces_seen[0].function.name == "get_weather"
    assert all(p.index == 0 and not p.id for p in pieces_seen[1:])
    assert len(pieces_seen) > 3  # the arguments arrive piece by piece
    assert "".join(p.function.arguments or "" for p in pieces_seen) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # the assistant's call and the tool's result are rendered back by the chat template
    prompt = service.prompts[-1]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "<think>\nI need the tool.\n</think>\n\n" in prompt
    assert "User: <tool_response>\nSunny, 21°C\n</tool_response>\nAssistant: " in prompt
    assert final.choices[0].message.content == "It is sunny." and final.choices[0].finish_reason == "stop"


def test_named_tool_choice_forces_the_call():
    service = ScriptedService(['{"city"', ': "Paris"}', "}"])

    async def scenario():
        async with serving(service) as url:
            choice = {"type": "function", "function": {"name": "get_weather"}}
            return await client(url).chat.completions.create(
                model="tiny", messages=USER, tools=TOOLS, tool_choice=choice
            )

    response = run(scenario())
    (call,) = response.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    assert response.choices[0].finish_reason == "stop"  # as OpenAI reports forced calls
    assert service.prompts[0].endswith('Assistant: <tool_call>{"name": "get_weather", "arguments": ')


def test_tool_choice_none_leaves_tools_out_and_text_alone():
    service = ScriptedService(['<tool_call>{"name": "x", "arguments": {}}</tool_call>'])

    async def scenario():
        async with serving(service, reasoning_parser=False) as url:
            return await client(url).chat.completions.create(
                model="tiny", messages=USER, tools=TOOLS, tool_choice="none"
            )

    response = run(scenario())
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].message.content.startswith("<tool_call>")
    assert "<tools>" not in service.prompts[0]


def test_n_choices_logprobs_and_request_id_header():
    service = ScriptedService(["a", "b", "c"])

    async def scenario():
        async with serving(service, reasoning_parser=False) as url:
            raw = await client(url).chat.completions.with_raw_response.create(
                model="tiny",
                messages=USER,
                n=3,
                seed=5,
                logprobs=True,
                top_logprobs=2,
                extra_headers={"X-Request-Id": "abc"},
            )
            return raw.headers, raw.parse()

    headers, response = run(scenario())
    assert headers["x-request-id"] == "chatcmpl-abc" == response.id
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content == "abc" for c in response.choices)
    entries = response.choices[0].logprobs.content
    assert [e.token for e in entries] == ["a", "b", "c"] and entries[0].logprob == -0.5
    assert [t.token for t in entries[0].top_logprobs] == ["t0", "t1"] and entries[0].bytes == [97]
    assert response.usage.completion_tokens == 9
    assert response.usage.prompt_tokens == len(Tokenizer.tiny().encode(service.prompts[0]))


# ------------------------------------------------------------------------------- completions


def test_completions_batch_stream_and_logprobs():
    service = ScriptedService(["Hel", "lo", "!"])

    async def scenario():
        async with serving(service) as url:
            api = client(url)
            batch = await api.completions.create(model="tiny", prompt=["one", [5, 6, 7]], n=2, logprobs=1)
            stream = await api.completions.create(model="tiny", prompt="one", stream=True, max_tokens=3)
            chunks = [chunk async for chunk in stream]
            return batch, chunks

    batch, chunks = run(scenario())
    assert batch.object == "text_completion" and [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert all(c.text == "Hello!" and c.finish_reason == "stop" for c in batch.choices)
    logprobs = batch.choices[0].logprobs
    assert logprobs.tokens == ["Hel", "lo", "!"] and logprobs.text_offset == [0, 3, 5]
    assert logprobs.top_logprobs[0] == {"t0": -1.0}
    assert batch.usage.prompt_tokens == len(Tokenizer.tiny().encode("one")) + 3  # each prompt counted once
    assert "".join(c.choices[0].text for c in chunks) == "Hello!"
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------- errors


async def _post(url: str, path: str, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(url + path, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"content": b"{not json"}, 400, None),
        ({"json": [1, 2]}, 400, None),
        ({"json": {"messages": USER, "temperature": "hot"}}, 400, "temperature"),
        ({"json": {"messages": USER, "max_tokens": 5000}}, 400, "max_tokens"),
        ({"json": {"messages": USER, "model": "gpt-9"}}, 404, None),
        ({"json": {"messages": [{"role": "user", "content": "x" * 5000}]}}, 400, None),  # prompt too long
        ({"json": {"messages": USER, "x": "y" * 20000}}, 413, None),
    ],
)
def test_bad_requests_get_openai_shaped_errors(kwargs, status, param):
    service = ScriptedService(["ok"], max_request_bytes=16384)

    async def scenario():
        async with serving(service, reasoning_parser=False) as url:
            bad = await _post(url, "/v1/chat/completions", **kwargs)
            good = await _post(url, "/v1/chat/completions", json={"messages": USER, "unknown_field": 1})
            return bad, good

    bad, good = run(scenario())
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "ok"


def test_unknown_routes_and_methods_are_openai_shaped():
    async def scenario():
        async with serving(ScriptedService()) as url, httpx.AsyncClient() as http:
            return await http.get(url + "/v1/nothing"), await http.get(url + "/v1/chat/completions")

    missing, wrong_method = run(scenario())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_models_and_health():
    async def scenario():
        async with serving(ScriptedService(), is_serving=lambda: False) as url:
            models = await client(url).models.list()
            model = await client(url).models.retrieve("tiny")
            async with httpx.AsyncClient() as http:
                health = await http.get(url + "/health")
                unknown = await http.get(url + "/v1/models/gpt-9")
            return models, model, health, unknown

    models, model, health, unknown = run(scenario())
    assert [m.id for m in models.data] == ["tiny"] and model.owned_by == "pdserve"
    assert health.status_code == 503 and unknown.status_code == 404


def test_full_queue_is_429_and_no_worker_is_503():
    service = ScriptedService(["a", "b"], max_inflight=1, max_queued=0)
    service.gate = asyncio.Event()
    no_workers = GenerationService(
        RouterConfig(model_id="tiny", max_model_len=1024, wait_for_workers_s=0.05), Tokenizer.tiny(), WorkerPool([])
    )

    async def scenario():
        async with serving(service) as url, serving(no_workers) as url2:
            first = asyncio.create_task(_post(url, "/v1/chat/completions", json={"messages": USER}))
            while not service.prompts:
                await asyncio.sleep(0.01)
            full = await _post(url, "/v1/chat/completions", json={"messages": USER})
            service.gate.set()
            done = await first
            with pytest.raises(openai.InternalServerError) as unavailable:
                await client(url2).chat.completions.create(model="tiny", messages=USER)
            return full, done, unavailable.value

    full, done, unavailable = run(scenario())
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"
    assert full.json()["error"]["type"] == "rate_limit_error"
    assert done.status_code == 200
    assert unavailable.status_code == 503 and "no decode worker" in unavailable.message


def test_api_key_guards_everything_but_health():
    service = ScriptedService(["ok"])

    async def scenario():
        async with serving(service, ApiKeys(["secret"])) as url:
            with pytest.raises(openai.AuthenticationError) as missing:
                await client(url, api_key="wrong").models.list()
            ok = await client(url, api_key="secret").chat.completions.create(model="tiny", messages=USER)
            async with httpx.AsyncClient() as http:
                bare = await http.post(url + "/v1/completions", json={"prompt": "x"})
                health = await http.get(url + "/health")
            return missing.value, ok, bare, health

    missing, ok, bare, health = run(scenario())
    assert missing.status_code == 401 and missing.code == "invalid_api_key"
    assert ok.choices[0].message.reasoning_content == "ok"  # thinking on: no </think> yet
    assert bare.status_code == 401 and health.status_code == 200


def test_client_disconnect_mid_stream_cancels_the_request():
    service = ScriptedService(["first", "never"])
    service.gate = asyncio.Event()  # holds the output after its first piece

    async def scenario():
        async with serving(service) as url:
            async with httpx.AsyncClient() as http:
                body = {"messages": USER, "stream": True, "chat_template_kwargs": {"enable_thinking": False}}
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if '"first"' in line:
                            break
            for _ in range(200):
                if service.num_cancelled:
                    break
                await asyncio.sleep(0.01)
            return service.num_cancelled, dict(service._calls)

    num_cancelled, calls = run(scenario())
    assert num_cancelled == 1 and calls == {}


def test_finish_reasons_map():
    service = ScriptedService(["x"], finish=common_pb2.FINISH_REASON_LENGTH)

    async def scenario():
        async with serving(service, reasoning_parser=False) as url:
            return await client(url).completions.create(model="tiny", prompt="p")

    assert run(scenario()).choices[0].finish_reason == "length"
