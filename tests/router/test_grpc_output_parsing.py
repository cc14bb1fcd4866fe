"""gRPC chat streams carry the thinking in `reasoning_text` and tool calls in `tool_calls`, as the
OpenAI API carries them in reasoning_content / tool_calls (over a scripted cluster: exact outputs)."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import struct_pb2

from protos.pdserve.v1 import generate_pb2, generate_pb2_grpc
from tests.router.scripted import ScriptedService

THINKING_OUTPUT = "<think>\nThe user asks.\n</think>\n\n<response>\nIt is sunny.\n</response>\n"
TOOL_OUTPUT = (
    'I need the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
)


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def chat_request(thinking: bool | None = None, tools: bool = False) -> generate_pb2.GenerateRequest:
    chat = generate_pb2.ChatPrompt(messages=[generate_pb2.ChatMessage(role="user", content="Weather in Paris?")])
    if thinking is not None:
        chat.chat_template_kwargs.CopyFrom(
            struct_pb2.Struct(fields={"enable_thinking": struct_pb2.Value(bool_value=thinking)})
        )
    if tools:
        parameters = struct_pb2.Struct()
        parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
        tool = chat.tools.add()
        tool.type = "function"
        tool.function.name = "get_weather"
        tool.function.parameters.CopyFrom(parameters)
    request = generate_pb2.GenerateRequest(chat=chat)
    request.sampling.max_tokens = 64
    return request


def stream(service: ScriptedService, requests: list[generate_pb2.GenerateRequest]) -> list[list]:
    async def scenario():
        server = grpc.aio.server()
        generate_pb2_grpc.add_GenerationServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = generate_pb2_grpc.GenerationStub(channel)
                return [[m async for m in stub.Generate(r)] for r in requests]
        finally:
            await server.stop(None)

    return asyncio.run(scenario())


def test_thinking_is_split_off_streamed_and_text_prompts_are_left_alone():
    text_request = generate_pb2.GenerateRequest(text="Hello")
    text_request.sampling.max_tokens = 64
    on, off, raw = stream(
        ScriptedService(pieces(THINKING_OUTPUT), reasoning_parser=True),
        [chat_request(), chat_request(thinking=False), text_request],
    )
    assert "".join(m.reasoning_text for m in on).strip() == "The user asks."
    assert "".join(m.text for m in on).strip() == "It is sunny."
    assert sum(1 for m in on if m.reasoning_text) > 1  # streamed as it comes, not at the end
    assert "".join(m.text for m in off) == THINKING_OUTPUT and not any(m.reasoning_text for m in off)
    assert "".join(m.text for m in raw) == THINKING_OUTPUT


def test_tool_calls_come_out_of_the_text_incrementally():
    (messages,) = stream(ScriptedService(pieces(TOOL_OUTPUT), reasoning_parser=True), [chat_request(tools=True)])
    calls = [c for m in messages for c in m.tool_calls]
    assert calls[0].name == "get_weather" and calls[0].id
    assert "".join(c.arguments for c in calls).replace(" ", "") == '{"city":"Paris"}'
    assert len(calls) > 2  # the arguments stream in pieces
    assert "".join(m.reasoning_text for m in messages).strip() == "I need the tool."
    assert "<tool_call>" not in "".join(m.text for m in messages)


def test_without_a_reasoning_parser_the_text_is_the_models():
    (messages,) = stream(ScriptedService(pieces(THINKING_OUTPUT), reasoning_parser=False), [chat_request()])
    assert "".join(m.text for m in messages) == THINKING_OUTPUT
