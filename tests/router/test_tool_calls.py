"""The ERNIE tool-call parser: the formats ERNIE models and the tiny template write, streamed
at every boundary, incrementally, and round-tripped through the chat template."""

from __future__ import annotations

import json

import pytest

from engine.tokenizer import Tokenizer
from router.tool_calls import ToolCallParser, parse_tool_calls
from tests.router.splits import every_split

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'

CASES = [
    # ERNIE-4.5 (vLLM / FastDeploy): newlines around the JSON, a trailing newline
    (f"<tool_call>\n{WEATHER}\n</tool_call>\n", "", [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    # answer text first (its trailing newlines are layout)
    (
        f"Let me check.\n\n<tool_call>{WEATHER}</tool_call>",
        "Let me check.",
        [("get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))],
    ),
    # the tiny template: calls back to back, no newlines
    (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {"x": [1, 2]}}</tool_call>',
        "",
        [("a", "{}"), ("b", '{"x": [1, 2]}')],
    ),
    # braces, brackets, quotes and escapes inside argument strings
    (
        '<tool_call>{"name": "run", "arguments": '
        '{"code": "if (a) { b[\\"}\\"] = \'{\'; }", "n": {"deep": [{}]}}}</tool_call>',
        "",
        [("run", '{"code": "if (a) { b[\\"}\\"] = \'{\'; }", "n": {"deep": [{}]}}')],
    ),
    # arguments given as a JSON string: its content is the arguments text
    ('<tool_call>{"name": "s", "arguments": "{\\"q\\": 1}"}</tool_call>', "", [("s", '{"q": 1}')]),
    # name after the arguments: parsed whole at </tool_call>, re-serialised
    ('<tool_call>{"arguments": {"q": "é"}, "name": "late"}</tool_call> tail', " tail", [("late", '{"q": "é"}')]),
    # a call without arguments
    ('<tool_call>{"name": "ping"}</tool_call>', "", [("ping", "{}")]),
    # non-ASCII names and values pass unchanged
    ('<tool_call>{"name": "天气", "arguments": {"城市": "北京"}}</tool_call>', "", [("天气", '{"城市": "北京"}')]),
    # not a call: the text is given back, tags and the newlines before them included
    ("text\n<tool_call>not json</tool_call>", "text\n<tool_call>not json</tool_call>", []),
    ('<tool_call>{"nom": "x"}</tool_call>', '<tool_call>{"nom": "x"}</tool_call>', []),
    # cut off by max_tokens inside the arguments: the call keeps what was written
    ('<tool_call>{"name": "trunc", "arguments": {"q": "ab', "", [("trunc", '{"q": "ab')]),
    # cut off before the arguments began: an empty object
    ('<tool_call>{"name": "early", "argu', "", [("early", "{}")]),
    # cut off before the name was complete: text
    ('x <tool_call>{"name": "ge', 'x <tool_call>{"name": "ge', []),
    # no call at all, and look-alike tags
    ("plain answer\n\n", "plain answer\n\n", []),
    ("a <tool_calls> b </tool_call> c <tool_ca", "a <tool_calls> b </tool_call> c <tool_ca", []),
]


def collect(pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    parser = ToolCallParser(new_id=iter(f"call_{i}" for i in range(100)).__next__)
    deltas = [parser.push(p) for p in pieces] + [parser.finish()]
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        for piece in delta.calls:
            entry = calls.setdefault(piece.index, ["", "", ""])
            assert not (entry[0] and piece.id), "a call's id is sent once"
            entry[0] += piece.id
            entry[1] += piece.name
            entry[2] += piece.arguments
    content = "".join(d.content for d in deltas)
    return content, [(calls[i][1], calls[i][2]) for i in sorted(calls)], [calls[i][0] for i in sorted(calls)]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_calls_parse_the_same_at_every_boundary(text, content, calls):
    whole_content, whole_calls = parse_tool_calls(text)
    assert whole_content == content
    assert [(c["name"], c["arguments"]) for c in whole_calls] == calls
    for pieces in every_split(text):
        got_content, got_calls, ids = collect(pieces)
        assert (got_content, got_calls) == (content, calls), pieces
        assert ids == [f"call_{i}" for i in range(len(calls))]


def test_name_and_arguments_stream_before_the_call_ends():
    parser = ToolCallParser()
    text = f"<tool_call>\n{WEATHER}\n</tool_call>"
    name_at = None
    pieces_of_arguments = 0
    for i, char in enumerate(text):
        for piece in parser.push(char).calls:
            if piece.name:
                name_at = i
            if piece.arguments:
                pieces_of_arguments += 1
    assert name_at is not None and name_at < text.index('"arguments"')
    assert pieces_of_arguments > 10  # the arguments object streamed character by character
    assert parser.finish().calls == ()


def test_a_forced_prefix_gives_the_name_at_once():
    """tool_choice naming a function puts the call's start in the prompt; the parser reads it first."""
    parser = ToolCallParser(new_id=lambda: "call_x")
    first = parser.push('<tool_call>{"name": "get_weather", "arguments": ')
    assert [(c.id, c.name, c.arguments) for c in first.calls] == [("call_x", "get_weather", "")]
    rest = [parser.push('{"city": "Pa'), parser.push('ris"}}'), parser.finish()]
    assert "".join(c.arguments for d in rest for c in d.calls) == '{"city": "Paris"}'
    assert parser.num_calls == 1


def test_calls_rendered_by_the_chat_template_parse_back():
    """Round trip: an assistant turn with tool_calls, rendered by the tiny template, is what the
    parser reads back into the same calls."""
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}},
    ]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Checking.", "tool_calls": calls}]
    rendered = Tokenizer.tiny().apply_chat_template(messages, add_generation_prompt=False)
    turn = rendered[rendered.rindex("Assistant: ") + len("Assistant: ") : rendered.rindex("<|end_of_sentence|>")]
    content, parsed = parse_tool_calls(turn)
    assert content == "Checking."
    assert [(c["name"], json.loads(c["arguments"])) for c in parsed] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
