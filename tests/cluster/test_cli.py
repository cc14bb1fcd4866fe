"""`pdserve generate --url`: what the command prints for a running router's stream."""

from __future__ import annotations

import asyncio

import grpc

from cluster.cli import main
from protos.pdserve.v1 import generate_pb2_grpc
from tests.router.scripted import ScriptedService


def run_generate_against(service: ScriptedService, argv: list[str]) -> int:
    """`pdserve generate --url ADDRESS *argv` against `service` served on a free loopback port."""

    async def scenario() -> int:
        server = grpc.aio.server()
        generate_pb2_grpc.add_GenerationServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await asyncio.to_thread(main, ["generate", "--url", f"127.0.0.1:{port}", *argv])
        finally:
            await server.stop(None)

    return asyncio.run(scenario())


def test_chat_prints_the_reasoning_on_stderr_and_the_answer_on_stdout(capsys):
    service = ScriptedService(["Let me", " think.", "</think>", "\n\n", "It is", " 4."], reasoning_parser=True)
    assert run_generate_against(service, ["--chat", "What is 2 + 2?"]) == 0
    out, err = capsys.readouterr()
    assert err == "[reasoning] Let me think.\n"  # labelled, no colour codes when stderr is not a terminal
    assert out == "It is 4.\n[finish_reason: stop]\n"


def test_chat_whose_output_is_all_reasoning_still_shows_it(capsys):
    service = ScriptedService(["Hmm,", " thinking"], reasoning_parser=True)
    assert run_generate_against(service, ["--chat", "Hi there"]) == 0
    out, err = capsys.readouterr()
    assert err == "[reasoning] Hmm, thinking\n"
    assert out == "[finish_reason: stop]\n"


def test_a_text_prompt_prints_the_text_as_the_model_wrote_it(capsys):
    service = ScriptedService(["Hello", " </think>", " world"], reasoning_parser=True)
    assert run_generate_against(service, ["Hello"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("Hello </think> world\n[finish_reason: stop]\n", "")
