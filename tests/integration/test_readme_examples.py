"""The README's client examples run as written against a real local cluster (router + prefill +
decode processes): the curl commands and the `openai` Python example of "OpenAI-compatible API",
and the `pdserve generate --url` commands of "The two commands".

The examples are taken from README.md's fenced code blocks, so an edit there is what is tested.
They assume `make serve`'s ports (HTTP 8000, gRPC 50051); the test cluster binds free ports, and
only those `host:port` strings are rewritten. The tiny model's text is noise, so the checks are
on shapes: exit status, JSON with choices, SSE ending in `[DONE]`, the Python example's prints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_HTTP = "127.0.0.1:8000"
README_GRPC = "127.0.0.1:50051"
TIMEOUT_S = 120
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    section: str  # the `## ` heading it sits under
    language: str
    code: str


def readme_blocks() -> list[Block]:
    """Every fenced code block of README.md with the `## ` section it belongs to."""
    text = README.read_text()
    headings = [(m.start(), m.group(1).strip()) for m in re.finditer(r"^## (.+)$", text, re.MULTILINE)]
    blocks = []
    for fence in FENCE.finditer(text):
        section = next((title for start, title in reversed(headings) if start < fence.start()), "")
        blocks.append(Block(section, fence.group(1), fence.group(2)))
    return blocks


def section_blocks(section: str, language: str) -> list[str]:
    found = [b.code for b in readme_blocks() if b.section == section and b.language == language]
    assert found, f"README.md has no {language} block under '## {section}'"
    return found


def curl_commands() -> list[str]:
    """The curl commands of the OpenAI section: each starts a line with `curl` and runs until the
    next one (a command spans lines through `\\` and a quoted multi-line body)."""
    commands = []
    for code in section_blocks("OpenAI-compatible API", "bash"):
        if "curl" not in code or "/v1/" not in code:
            continue
        starts = [m.start() for m in re.finditer(r"^curl\b", code, re.MULTILINE)]
        commands += [code[a:b].strip() for a, b in zip(starts, [*starts[1:], len(code)], strict=True)]
    return commands


def openai_examples() -> list[str]:
    return [code for code in section_blocks("OpenAI-compatible API", "python") if "from openai import" in code]


def generate_commands() -> list[str]:
    """The `pdserve generate --url` lines of the README's first section."""
    lines = [line for code in section_blocks("The two commands", "bash") for line in code.splitlines()]
    return [line.strip() for line in lines if "pdserve generate --url" in line]


def run_example(cluster, argv: list[str], example: str) -> subprocess.CompletedProcess:
    """Run one example with the README's addresses pointed at `cluster`, from the repository root."""
    example = example.replace(README_HTTP, cluster.http_address).replace(README_GRPC, cluster.address)
    # A proxy configured on the machine must not take the loopback requests.
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    out = subprocess.run(
        [*argv, example], cwd=ROOT, env=env, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S
    )
    assert out.returncode == 0, f"{example}\nexited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


def test_the_readme_examples_are_found():
    """Guards the extraction: an edited README that hides an example fails here, not silently."""
    commands = curl_commands()
    assert len(commands) >= 2 and any('"stream": true' in c for c in commands), commands
    assert all(README_HTTP in c for c in commands), commands
    assert len(openai_examples()) == 1
    assert README_HTTP in openai_examples()[0]
    commands = generate_commands()
    assert len(commands) == 2 and sum("--chat" in c for c in commands) == 1, commands
    assert all(README_GRPC in c for c in commands), commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize("index", range(len(curl_commands())))
def test_readme_curl_command_works_as_written(cluster_1p1d, index):
    command = curl_commands()[index]
    stdout = run_example(cluster_1p1d, ["bash", "-c"], command).stdout
    if '"stream": true' not in command:
        response = json.loads(stdout)
        assert response["object"] == "chat.completion", stdout
        choice = response["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert response["usage"]["completion_tokens"] >= 1
        return
    events = [line for line in stdout.splitlines() if line]
    assert all(line.startswith("data: ") for line in events), stdout
    assert events[-1] == "data: [DONE]", stdout
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), stdout
    choices = [c["choices"][0] for c in chunks if c["choices"]]  # a usage chunk has none
    assert choices and choices[0]["delta"]["role"] == "assistant", stdout
    assert choices[-1]["finish_reason"] in ("stop", "length"), stdout


def test_readme_openai_example_works_as_written(cluster_1p1d):
    code = openai_examples()[0]
    out = run_example(cluster_1p1d, [sys.executable, "-c"], code)
    assert "Traceback" not in out.stderr, out.stderr
    # One check per print of the example, in its order (the words themselves are noise).
    assert " | " in out.stdout  # reasoning | answer
    assert "CompletionUsage(completion_tokens=" in out.stdout  # thinking off: answer and usage
    assert re.search(r"^get_weather ", out.stdout, re.MULTILINE)  # the named tool call and its arguments
    assert "ChatCompletionMessage(" in out.stdout  # the reply after the tool's result
    assert re.search(r"\{.+\}$", out.stdout.rstrip().splitlines()[-1])  # completion text, top logprobs


@pytest.mark.skipif(not (ROOT / ".venv/bin/pdserve").exists(), reason="no .venv (the README's commands use it)")
@pytest.mark.parametrize("index", range(len(generate_commands())))
def test_readme_generate_command_works_as_written(cluster_1p1d, index):
    command = generate_commands()[index]
    out = run_example(cluster_1p1d, ["bash", "-c"], command)
    assert re.search(r"^\[finish_reason: (stop|length)\]$", out.stdout, re.MULTILINE), out.stdout
    if "--chat" in command:
        # Thinking is on and the tiny model's reasoning takes every token (the answer is empty):
        # the command shows the reasoning, labelled, on stderr.
        assert "[reasoning] " in out.stderr, out.stderr
    else:
        assert out.stdout.splitlines()[0].strip(), out.stdout  # a text prompt streams its text
