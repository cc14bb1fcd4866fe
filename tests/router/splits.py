"""Ways to cut one output text into streamed deltas, for the streaming-parser tests."""

from __future__ import annotations

from collections.abc import Iterator


def every_split(text: str) -> Iterator[list[str]]:
    """The whole text; every cut into two pieces (so each tag is split at each of its
    characters); every cut into three pieces around the middle; one character at a time."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for i in range(len(text) + 1):
        for j in range(i, min(len(text), i + 12) + 1):
            yield [text[:i], text[i:j], text[j:]]
    yield list(text)
