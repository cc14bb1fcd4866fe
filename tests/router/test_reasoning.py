"""The ERNIE reasoning parser: every output format vLLM's `ernie45` and FastDeploy's
`ernie-45-vl-thinking` parsers accept, split into streamed deltas at every boundary."""

from __future__ import annotations

import pytest

from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from router.reasoning import ReasoningParser, parse_reasoning, reasoning_parser_enabled
from tests.router.splits import every_split

THINKING_CASES = [
    # vLLM ernie45: reasoning, </think>, answer wrapped in <response> tags
    ("abc\n</think>\n\n<response>\ndef\n</response>\n", "abc", "def"),
    # vLLM ernie45: plain answer after </think>
    ("abc\n</think>\ndef", "abc", "def"),
    # FastDeploy ernie-45-vl-thinking: the model opens <think> itself
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    # a tool call as the answer (the tool-call parser takes it from there)
    (
        'I should call it.\n</think>\n\n\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n',
        "I should call it.",
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n',
    ),
    # newlines inside the reasoning and the answer are text
    ("line 1\n\nline 2\n</think>\n\nanswer\n\nmore\n", "line 1\n\nline 2", "answer\n\nmore\n"),
    # the model skipped reasoning
    ("</think>\n\nanswer", "", "answer"),
    ("<think>\n\n</think>\n\nanswer", "", "answer"),
    # no </think> (cut off by max_tokens): all reasoning, a partial tag included
    ("still thinking </thi", "still thinking </thi", ""),
    ("<thin", "<thin", ""),
    ("", "", ""),
    # tags after the reasoning ended are answer text; look-alikes are text
    ("r</think>a <think> b </think> c", "r", "a <think> b </think> c"),
    ("r <thinking> </th1nk> x</think>y", "r <thinking> </th1nk> x", "y"),
    ("思考中……\n</think>\n\n答案：四", "思考中……", "答案：四"),
]


@pytest.mark.parametrize(("text", "reasoning", "content"), THINKING_CASES)
def test_thinking_output_splits_the_same_at_every_boundary(text, reasoning, content):
    assert parse_reasoning(text) == (reasoning, content)
    for pieces in every_split(text):
        parser = ReasoningParser(thinking=True)
        deltas = [parser.push(p) for p in pieces] + [parser.finish()]
        got = ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas))
        assert got == (reasoning, content), pieces


@pytest.mark.parametrize("text", [c[0] for c in THINKING_CASES])
def test_thinking_off_passes_everything_through_as_the_answer(text):
    for pieces in every_split(text):
        parser = ReasoningParser(thinking=False)
        deltas = [parser.push(p) for p in pieces] + [parser.finish()]
        assert "".join(d.reasoning for d in deltas) == ""
        assert "".join(d.content for d in deltas) == text


def test_reasoning_streams_before_the_end_tag_and_holds_only_a_possible_tag():
    parser = ReasoningParser()
    first = parser.push("<think>\nStep one")
    assert first.reasoning == "Step one" and first.content == ""
    held = parser.push(", two\n</thi")  # "\n</thi" could still be the end tag: held back
    assert held.reasoning == ", two" and not parser.reasoning_ended
    ended = parser.push("nk>\n\nDone")
    assert ended.reasoning == "" and ended.content == "Done" and parser.reasoning_ended


def test_split_at_token_boundaries_of_the_tiny_tokenizer():
    """What the router feeds the parser: the incremental detokenizer's text deltas."""
    tokenizer = Tokenizer.tiny()
    text = "<think>\nThe user greets me.\n</think>\n\n<response>\nHello, 你好!\n</response>\n"
    ids = tokenizer.encode(text)
    assert tokenizer.token_to_id("</think>") in ids  # the tag is one token
    detok = IncrementalDetokenizer(tokenizer)
    parser = ReasoningParser()
    deltas = [parser.push(detok.push(t)) for t in ids] + [parser.finish()]
    assert "".join(d.reasoning for d in deltas) == "The user greets me."
    assert "".join(d.content for d in deltas) == "Hello, 你好!"


def test_auto_enables_the_parser_for_templates_with_thinking():
    template = Tokenizer.tiny().chat_template
    assert reasoning_parser_enabled("auto", template)
    assert not reasoning_parser_enabled("auto", "{{ messages }}")
    assert not reasoning_parser_enabled("auto", None)
    assert reasoning_parser_enabled("ernie45", None) and reasoning_parser_enabled("ernie-45-vl-thinking", None)
    assert not reasoning_parser_enabled("none", template)
    with pytest.raises(ValueError, match="deepseek"):
        reasoning_parser_enabled("deepseek", template)
