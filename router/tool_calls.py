"""ERNIE-4.5 tool-call parser: finds `<tool_call>` blocks in the answer and streams OpenAI tool calls.

ERNIE-4.5 models (and the tiny preset's template) write a call as a JSON object between tags,
one block per call, optionally after some answer text and, for thinking models, after the
reasoning (which `router.reasoning` has already taken off):

    answer text\\n<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>\\n
    <tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>

Each block becomes one call: an id and the name as soon as `"name": "..."` is complete, then
the raw text of the `arguments` value piece by piece as the model writes it (so a client can
render a long argument while it is generated). Newlines next to the tags are layout and are
dropped; any other text outside blocks stays answer text. A block whose JSON has no leading
`"name"` is parsed whole at `</tool_call>`; one that never yields a name (not JSON, no name) is
given back as answer text, tags included. Output that ends inside a block (max_tokens) closes
the call with what was streamed (`{}` if no argument value began), or gives the text back if no
name was found yet.

Streaming-safe like the reasoning parser: a possible partial tag or tag-adjacent newlines are
held back, so every split of the same text into deltas yields the same answer and calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from router.reasoning import partial_tag_len, split_undecided

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_NAME_RE = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_KEY_RE = re.compile(r'\s*,\s*"arguments"\s*:')


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a call. Pieces with one index form one call; `id` and `name` come once, first."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class ToolParseDelta:
    content: str = ""
    calls: tuple[ToolCallDelta, ...] = ()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _Arguments:
    """Scans the `arguments` value as it arrives: objects and arrays stream, strings and scalars
    are sent whole once complete (a JSON string's content *is* the arguments text)."""

    kind: str = ""  # "" before the value's first character, then "structured", "string" or "scalar"
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False
    num_scanned: int = 0  # characters of the region after `"arguments":` scanned, whitespace included
    raw: str = ""  # the value's text so far

    def feed(self, region: str) -> str:
        """Scan the region's new characters; returns the piece to stream now (structured values only)."""
        start = len(self.raw)
        while self.num_scanned < len(region) and not self.done:
            char = region[self.num_scanned]
            if self.kind == "scalar" and (char in ",}]" or char.isspace()):
                self.done = True
                break
            self.num_scanned += 1
            if not self.kind and char.isspace():
                continue
            self.raw += char
            self._track(char)
        return self.raw[start:] if self.kind == "structured" else ""

    def _track(self, char: str) -> None:
        if not self.kind:
            self.kind = {"{": "structured", "[": "structured", '"': "string"}.get(char, "scalar")
            self.depth = int(self.kind == "structured")
            self.in_string = self.kind == "string"
        elif self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                self.done = self.kind == "string"
        elif self.kind == "structured":
            if char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                self.done = self.depth == 0

    def final_text(self) -> str:
        """What to send at the end for values that do not stream."""
        if self.kind == "string":
            try:
                value = json.loads(self.raw)
            except json.JSONDecodeError:
                return self.raw
            return value if isinstance(value, str) else self.raw
        return self.raw if self.kind == "scalar" else ""


@dataclass
class _Call:
    index: int
    newlines_before: str = ""  # dropped before the tag; given back if the block is not a call
    body: str = ""
    name_sent: bool = False
    name_end: int = -1  # body offset after the name
    args_from: int = -1  # body offset just after `"arguments":`
    args: _Arguments | None = None


class ToolCallParser:
    """One output sequence's streaming tool-call extraction. Not thread-safe."""

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        self._new_id = new_id
        self._buffer = ""
        self._call: _Call | None = None
        self._after_call = False  # drop the newlines that follow a </tool_call>
        self.num_calls = 0

    def push(self, text: str) -> ToolParseDelta:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> ToolParseDelta:
        return self._drain(final=True)

    def _drain(self, final: bool) -> ToolParseDelta:
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        while self._step(content, calls, final):
            pass
        return ToolParseDelta("".join(content), tuple(calls))

    def _step(self, content: list[str], calls: list[ToolCallDelta], final: bool) -> bool:
        if self._call is not None:
            return self._step_in_call(content, calls, final)
        if self._after_call:
            self._buffer = self._buffer.lstrip("\n")
            if not self._buffer:
                return False
            self._after_call = False
        at = self._buffer.find(TOOL_CALL_START)
        if at >= 0:
            before = self._buffer[:at].rstrip("\n")
            content.append(before)
            self._call = _Call(index=self.num_calls, newlines_before=self._buffer[len(before) : at])
            self._buffer = self._buffer[at + len(TOOL_CALL_START) :]
            return True
        if final:
            content.append(self._buffer)
            self._buffer = ""
            return False
        safe, self._buffer = split_undecided(self._buffer, (TOOL_CALL_START,))
        content.append(safe)
        return False

    def _step_in_call(self, content: list[str], calls: list[ToolCallDelta], final: bool) -> bool:
        call = self._call
        assert call is not None
        at = self._buffer.find(TOOL_CALL_END)
        closed = at >= 0
        if closed:
            call.body += self._buffer[:at]
            self._buffer = self._buffer[at + len(TOOL_CALL_END) :]
        elif final:
            call.body += self._buffer
            self._buffer = ""
        else:
            # Newlines inside a call are JSON whitespace: hold back only a partial end tag.
            cut = len(self._buffer) - partial_tag_len(self._buffer, (TOOL_CALL_END,))
            call.body += self._buffer[:cut]
            self._buffer = self._buffer[cut:]
        calls.extend(self._advance(call))
        if not (closed or final):
            return False
        self._close(call, content, calls, closed)
        return closed

    def _advance(self, call: _Call) -> list[ToolCallDelta]:
        """Stream what the body now settles: the name once complete, then argument text."""
        out: list[ToolCallDelta] = []
        if not call.name_sent:
            match = _NAME_RE.match(call.body)
            if match is None:
                return out
            call.name_sent, call.name_end = True, match.end()
            self.num_calls += 1
            out.append(ToolCallDelta(call.index, id=self._new_id(), name=_json_string(match.group(1))))
        if call.args is None:
            match = _ARGUMENTS_KEY_RE.match(call.body, call.name_end)
            if match is None:
                return out
            call.args, call.args_from = _Arguments(), match.end()
        piece = call.args.feed(call.body[call.args_from :])
        if piece:
            out.append(ToolCallDelta(call.index, arguments=piece))
        return out

    def _close(self, call: _Call, content: list[str], calls: list[ToolCallDelta], closed: bool) -> None:
        """The block ended (`</tool_call>`, or the output ended inside it)."""
        self._call = None
        self._after_call = True
        if call.name_sent:
            # No arguments written (none, or cut off before the value began): an empty object.
            rest = call.args.final_text() if call.args is not None and call.args.kind else "{}"
            if rest:
                calls.append(ToolCallDelta(call.index, arguments=rest))
            return
        whole = _parse_whole(call.body) if closed else None
        if whole is None:  # not a call: give the text back as answer
            content.append(call.newlines_before + TOOL_CALL_START + call.body + (TOOL_CALL_END if closed else ""))
            self._after_call = False
            return
        name, arguments = whole
        self.num_calls += 1
        calls.append(ToolCallDelta(call.index, id=self._new_id(), name=name, arguments=arguments))


def _json_string(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except json.JSONDecodeError:
        return raw


def _parse_whole(body: str) -> tuple[str, str] | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return data["name"], arguments


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(answer text, calls as {"id", "name", "arguments"}) of a whole output."""
    parser = ToolCallParser()
    deltas = [parser.push(text), parser.finish()]
    calls: dict[int, dict] = {}
    for delta in deltas:
        for piece in delta.calls:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or piece.id
            call["name"] = call["name"] or piece.name
            call["arguments"] += piece.arguments
    return "".join(d.content for d in deltas), [calls[i] for i in sorted(calls)]
