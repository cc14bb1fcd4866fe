"""One output stream's text through the reasoning parser, then the tool-call parser.

    text ──▶ ReasoningParser ──reasoning──────────────────────────▶ reasoning
                             ──answer──▶ ToolCallParser ──text────▶ content
                                                        ──calls───▶ tool-call deltas

Both APIs use it: the OpenAI API per choice (`router.openai_api.ChoiceState`), gRPC per chat
request (`GenerateResponse.reasoning_text` / `tool_calls`). Torch-free, not thread-safe (one
stream's consumer owns it).
"""

from __future__ import annotations

from router.reasoning import ReasoningParser
from router.tool_calls import ToolCallDelta, ToolCallParser


class OutputParsers:
    """`thinking`: split the reasoning off; `parse_tools`: pull tool calls out of the answer;
    `tool_prefix`: output the prompt already holds (a forced call), read first."""

    def __init__(self, thinking: bool, parse_tools: bool, tool_prefix: str = "") -> None:
        self.reasoning = ReasoningParser(thinking=True) if thinking else None
        self.tools = ToolCallParser() if parse_tools else None
        # A forced call's prefix is in the prompt: its name (if any) goes out with the first delta.
        self._pending = self.tools.push(tool_prefix).calls if self.tools and tool_prefix else ()

    @property
    def num_calls(self) -> int:
        return self.tools.num_calls if self.tools is not None else 0

    def feed(self, text: str, finished: bool) -> tuple[str, str, tuple[ToolCallDelta, ...]]:
        """(reasoning, content, tool-call deltas) that `text` completes; `finished` flushes."""
        reasoning, content = "", text
        if self.reasoning is not None:
            parts = [self.reasoning.push(text)] + ([self.reasoning.finish()] if finished else [])
            reasoning, content = "".join(p.reasoning for p in parts), "".join(p.content for p in parts)
        calls, self._pending = self._pending, ()
        if self.tools is not None:
            parts = [self.tools.push(content)] + ([self.tools.finish()] if finished else [])
            content = "".join(p.content for p in parts)
            calls += tuple(c for p in parts for c in p.calls)
        return reasoning, content, calls
