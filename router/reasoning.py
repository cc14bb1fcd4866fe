"""ERNIE-4.5 reasoning parser: splits a thinking model's output into reasoning and answer.

Output formats accepted (the union of what vLLM's `ernie45` and FastDeploy's
`ernie-45-vl-thinking` parsers accept):

    [<think>\\n] reasoning \\n</think>\\n\\n answer
    [<think>\\n] reasoning \\n</think>\\n\\n<response>\\n answer \\n</response>\\n
    [<think>\\n] reasoning \\n</think>\\n\\n<tool_call>...</tool_call>        (answer = the tool calls)
    [<think>\\n] reasoning ...                                                 (no </think>: all reasoning)

The opening `<think>` is optional: ERNIE's thinking templates open the think block in the prompt.
Newlines directly inside the tags (after `<think>` / `<response>`, before `</think>` /
`</response>`) and directly after a closing tag are layout, not text, and are dropped; every
other character of the output lands in exactly one of the two parts. With thinking off (the
template pre-fills `<think>\\n\\n</think>\\n\\n`) the parser passes everything through as answer.

Streaming-safe: `push` returns only what can no longer change. A tail that could still become
a tag (`</thi`), or newlines that a following tag would swallow, are held back until the next
push decides them or `finish` flushes them, so any split of the same output into deltas gives
the same concatenated reasoning and answer as parsing it whole (`parse_reasoning`).
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
RESPONSE_START = "<response>"
RESPONSE_END = "</response>"
_CONTENT_TAGS = (RESPONSE_START, RESPONSE_END)

# Names accepted for `--reasoning-parser`: both ERNIE names select this parser (it accepts both
# formats); "auto" selects it when the chat template knows thinking; "none" turns it off.
PARSER_NAMES = ("auto", "ernie45", "ernie-45-vl-thinking", "none")


def reasoning_parser_enabled(name: str, chat_template: str | None) -> bool:
    """Whether `--reasoning-parser name` parses reasoning for a model with this chat template."""
    if name not in PARSER_NAMES:
        raise ValueError(f"--reasoning-parser must be one of {', '.join(PARSER_NAMES)}, got {name!r}")
    if name == "auto":
        return bool(chat_template) and (THINK_END in chat_template or "enable_thinking" in chat_template)
    return name != "none"


@dataclass(frozen=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


def partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:size]):
                best = size
                break
    return best


def split_undecided(text: str, tags: tuple[str, ...]) -> tuple[str, str]:
    """(safe, held): `held` is a trailing partial tag plus the newlines before it, which a tag
    could still swallow; `safe` can be emitted now."""
    cut = len(text) - partial_tag_len(text, tags)
    safe = text[:cut].rstrip("\n")
    return safe, text[len(safe) :]


class ReasoningParser:
    """One request's streaming split. Not thread-safe; one instance per output sequence.

    `thinking=False` (thinking mode off for this request) passes the output through as answer.
    """

    _START, _REASONING, _ANSWER, _PASSTHROUGH = range(4)

    def __init__(self, thinking: bool = True) -> None:
        self._phase = self._START if thinking else self._PASSTHROUGH
        self._buffer = ""
        self._at_section_start = True  # drop the newlines that open a section
        self.reasoning_ended = not thinking

    def push(self, text: str) -> ReasoningDelta:
        """Feed the next piece of output text; returns the reasoning and answer it settles."""
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> ReasoningDelta:
        """End of output: flush what was held back (a partial tag at the very end is text)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> ReasoningDelta:
        reasoning: list[str] = []
        content: list[str] = []
        while self._step(reasoning, content, final):
            pass
        return ReasoningDelta("".join(reasoning), "".join(content))

    def _step(self, reasoning: list[str], content: list[str], final: bool) -> bool:
        """Advance one phase transition or emit what is safe; True while there is more to do."""
        if self._phase == self._PASSTHROUGH:
            content.append(self._buffer)
            self._buffer = ""
            return False
        if self._phase == self._START:
            return self._skip_think_start(final)
        if self._at_section_start:
            self._buffer = self._buffer.lstrip("\n")
            if not self._buffer:
                return False
            self._at_section_start = False
        if self._phase == self._REASONING:
            return self._scan(reasoning, (THINK_END,), final)
        return self._scan(content, _CONTENT_TAGS, final)

    def _skip_think_start(self, final: bool) -> bool:
        rest = self._buffer.lstrip("\n")
        if rest.startswith(THINK_START):
            self._buffer = rest[len(THINK_START) :]
        elif THINK_START.startswith(rest) and not final:
            return False  # could still become "<think>"
        self._phase = self._REASONING
        return True

    def _scan(self, out: list[str], tags: tuple[str, ...], final: bool) -> bool:
        found = [(at, tag) for tag in tags if (at := self._buffer.find(tag)) >= 0]
        if found:
            at, tag = min(found)
            out.append(self._buffer[:at].rstrip("\n"))
            self._buffer = self._buffer[at + len(tag) :]
            self._at_section_start = True
            if tag == THINK_END:
                self._phase = self._ANSWER
                self.reasoning_ended = True
            return True
        if final:
            out.append(self._buffer)
            self._buffer = ""
            return False
        safe, self._buffer = split_undecided(self._buffer, tags)
        out.append(safe)
        return False


def parse_reasoning(text: str, thinking: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of a whole output; equals the concatenation of any streamed split."""
    parser = ReasoningParser(thinking)
    first, last = parser.push(text), parser.finish()
    return first.reasoning + last.reasoning, first.content + last.content
