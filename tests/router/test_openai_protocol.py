"""OpenAI request bodies → GenerateRequests: types, defaults, thinking, tool choice, n, errors."""

from __future__ import annotations

import grpc
import pytest

from router.openai_protocol import ApiError, ParseOptions, error_from_status, parse_chat, parse_completion

OPTIONS = ParseOptions(model_id="tiny")
USER = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def chat(**body):
    return parse_chat({"model": "tiny", "messages": USER, **body}, OPTIONS)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
        (
            {"messages": [{"role": "user", "content": ["hi", {"type": "image_url"}]}]},
            "messages[0].content[1].image_url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
            "messages[0].content[0].image_url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}]},
            "messages[0].content[0].image_url.url",
        ),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": "8"}, "max_completion_tokens"),
        ({"stop": 3}, "stop"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"n": 0}, "n"),
        ({"n": 65}, "n"),
        ({"seed": "7"}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"logprobs": 2}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": {"name": "f"}}, "tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
        ({"metadata": {"enable_thinking": 3}}, "metadata.enable_thinking"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_k": -2}, "top_k"),
        ({"user": 42}, "user"),
    ],
)
def test_a_wrong_type_or_value_is_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as info:
        parse_chat({"model": "tiny", "messages": USER, **body}, OPTIONS)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored_and_sampling_fields_map():
    api = chat(
        temperature=0,
        top_p=0.5,
        top_k=-1,
        seed=3,
        max_tokens=7,
        stop="END",
        presence_penalty=0,
        frequency_penalty=0.0,
        some_future_field={"x": 1},
        ignore_eos=True,
        user="alice",
    )
    (request,) = api.requests
    s = request.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_tokens, list(s.stop)) == (0, 0.5, 0, 3, 7, ["END"])
    assert s.ignore_eos and not s.HasField("presence_penalty") and not s.HasField("frequency_penalty")
    assert not s.HasField("logprobs")
    assert request.request_id == api.id and api.id.startswith("chatcmpl-")
    assert chat(max_completion_tokens=5, max_tokens=9).requests[0].sampling.max_tokens == 5
    assert not chat().requests[0].sampling.HasField("max_tokens")  # the router's default applies
    assert parse_completion({"prompt": "x"}, OPTIONS).requests[0].sampling.max_tokens == 16  # OpenAI's default


def test_thinking_switch_vllm_and_fastdeploy_ways():
    assert chat().spec.thinking
    off = chat(chat_template_kwargs={"enable_thinking": False})
    assert not off.spec.thinking
    assert off.requests[0].chat.chat_template_kwargs["enable_thinking"] is False
    fastdeploy = chat(metadata={"enable_thinking": False})
    assert not fastdeploy.spec.thinking
    assert fastdeploy.requests[0].chat.chat_template_kwargs["enable_thinking"] is False
    assert not chat(metadata={"enable_thinking": "false"}).spec.thinking
    # vLLM's kwargs win over FastDeploy's metadata
    assert chat(chat_template_kwargs={"enable_thinking": True}, metadata={"enable_thinking": False}).spec.thinking
    # a model without a reasoning parser never splits
    assert not parse_chat({"messages": USER}, ParseOptions("tiny", has_reasoning_parser=False)).spec.thinking


def test_tool_choice_modes():
    auto = chat(tools=TOOLS)
    assert auto.spec.parse_tools and len(auto.requests[0].chat.tools) == 1
    none = chat(tools=TOOLS, tool_choice="none")
    assert not none.spec.parse_tools and len(none.requests[0].chat.tools) == 0  # tools left out of the prompt
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, stop="X")
    request = named.requests[0]
    assert named.spec.named_tool and not named.spec.thinking
    assert named.spec.tool_prefix == '<tool_call>{"name": "get_weather", "arguments": '
    assert request.chat.messages[-1].role == "assistant"
    assert request.chat.messages[-1].content == named.spec.tool_prefix
    assert request.chat.continue_final_message and not request.chat.HasField("add_generation_prompt")
    assert list(request.sampling.stop) == ["X", "</tool_call>"]
    required = chat(tools=TOOLS, tool_choice="required")
    assert required.spec.tool_prefix == '<tool_call>{"name": "' and not required.spec.named_tool


def test_history_with_tool_calls_and_tool_results():
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Need the tool.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
    ]
    (request,) = parse_chat({"messages": messages, "tools": TOOLS}, OPTIONS).requests
    system, _user, assistant, tool = request.chat.messages
    assert (system.role, system.content) == ("system", "Be brief.")
    assert assistant.reasoning_content == "Need the tool."
    assert assistant.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "c1", "Sunny")


def test_n_fans_out_with_per_choice_ids_and_seeds():
    api = chat(n=3, seed=10)
    assert [r.request_id for r in api.requests] == [f"{api.id}-{i}" for i in range(3)]
    assert [r.sampling.seed for r in api.requests] == [10, 11, 12]
    assert all(not r.sampling.HasField("seed") for r in chat(n=2).requests)
    batch = parse_completion({"prompt": ["a", [5, 6]], "n": 2}, OPTIONS, request_id="abc")
    assert batch.id == "cmpl-abc"
    assert [r.WhichOneof("prompt") for r in batch.requests] == ["text", "text", "token_ids", "token_ids"]


def test_completion_prompts_and_logprobs():
    assert parse_completion({"prompt": [1, 2, 3]}, OPTIONS).requests[0].token_ids.token_ids == [1, 2, 3]
    api = parse_completion({"prompt": "x", "logprobs": 3}, OPTIONS)
    assert api.logprobs and api.requests[0].sampling.logprobs == 3
    for body, param in [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1], "a", 3.5]}, "prompt[2]"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
    ]:
        with pytest.raises(ApiError) as info:
            parse_completion(body, OPTIONS)
        assert (info.value.status, info.value.param) == (400, param), body


def test_grpc_statuses_map_to_http_in_one_place():
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.INTERNAL: 500,
    }
    for code, status in cases.items():
        assert error_from_status(code, "x").status == status
    error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be a finite number >= 0")
    assert error.param == "temperature"
    assert error_from_status(grpc.StatusCode.NOT_FOUND, "model").code == "model_not_found"


def test_image_parts_become_content_parts_one_for_one_and_text_parts_stay_text():
    content = ["Look ", {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}}, "?"]
    (message,) = chat(messages=[{"role": "user", "content": content}]).requests[0].chat.messages
    assert message.content == "" and [p.WhichOneof("part") for p in message.content_parts] == ["text", "image", "text"]
    image = message.content_parts[1].image
    assert (image.url, image.detail) == ("https://x.test/a.png", "low")
    bare = chat(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AA"}]}]
    )
    assert bare.requests[0].chat.messages[0].content_parts[0].image.url == "data:image/png;base64,AA"
    (text,) = (
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]).requests[0].chat.messages
    )
    assert text.content == "ab" and not text.content_parts
