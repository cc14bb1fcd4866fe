"""Every main message survives serialize -> parse with every field set.

`assert_all_fields_set` fails on any field left at its default, so a field added to a .proto
must also be added here before this suite passes again.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from protos.pdserve.v1 import common_pb2, generate_pb2, registry_pb2, worker_pb2


def assert_all_fields_set(message: Message, path: str = "") -> None:
    """Fails naming the first pdserve field left unset (for a oneof: its set member is checked)."""
    for field in message.DESCRIPTOR.fields:
        where = f"{path}{message.DESCRIPTOR.name}.{field.name}"
        oneof = field.containing_oneof
        if oneof is not None:
            chosen = message.WhichOneof(oneof.name)
            assert chosen is not None, f"{where}: no member of oneof {oneof.name} set"
            if chosen != field.name:
                continue
        value = getattr(message, field.name)
        if field.is_repeated:
            assert len(value) > 0, f"{where} is empty"
            if field.message_type is not None and not field.message_type.GetOptions().map_entry:
                for item in value:
                    _check_nested(item, f"{where}[]/")
        elif field.message_type is not None:
            assert message.HasField(field.name), f"{where} is unset"
            _check_nested(value, f"{where}/")
        elif field.has_presence:
            assert message.HasField(field.name), f"{where} is unset"
        else:
            assert value != field.default_value, f"{where} has its default {value!r}"


def _check_nested(message: Message, path: str) -> None:
    if message.DESCRIPTOR.full_name.startswith("pdserve."):
        assert_all_fields_set(message, path)


def round_trip(message: Message) -> Message:
    wire = message.SerializeToString(deterministic=True)
    parsed = type(message).FromString(wire)
    assert parsed == message
    assert parsed.SerializeToString(deterministic=True) == wire
    return parsed


# ---- fixtures: one fully populated instance of each main message --------------------------------


def sampling_params() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=0.0,  # greedy: present although zero
        top_p=0.9,
        top_k=50,
        min_p=0.05,
        seed=-1234567890123,
        max_tokens=256,
        min_tokens=4,
        stop=["</s>", "\n\nUser:"],
        stop_token_ids=[2, 100272],
        ignore_eos=True,
        logprobs=0,  # only the sampled token's: present although zero
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        repetition_penalty=1.05,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
    )


def token_logprobs(token_id: int = 17) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        sampled=common_pb2.Logprob(token_id=token_id, logprob=-0.125, token="Hel"),
        top=[
            common_pb2.Logprob(token_id=token_id, logprob=-0.125, token="Hel"),
            common_pb2.Logprob(token_id=4, logprob=-2.5, token="Hi"),
        ],
    )


def usage() -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=40, completion_tokens=12, cached_prompt_tokens=32)


def worker_ref(name: str = "pdserve-worker-1") -> common_pb2.WorkerRef:
    return common_pb2.WorkerRef(worker_id=name, incarnation_id="3f2a9c", grpc_address="10.0.0.7:50061")


def worker_info() -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id="pdserve-worker-1",
        incarnation_id="3f2a9c",
        host="10.0.0.7",
        grpc_port=50061,
        kv_store_host="10.0.0.7",
        kv_store_port=50071,
        role=common_pb2.WORKER_ROLE_DECODE,
        role_epoch=3,
        device="cuda:0 NVIDIA H100 80GB HBM3",
        model_id="ernie-4.5-21b-a3b",
        metrics_port=9400,
        num_ranks=2,
        state=common_pb2.WORKER_STATE_READY,
    )


def chat_prompt(tool_choice: generate_pb2.ToolChoice) -> generate_pb2.ChatPrompt:
    template_kwargs = struct_pb2.Struct()
    template_kwargs.update({"enable_thinking": False, "style": "terse"})
    parameters = struct_pb2.Struct()
    parameters.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    call = generate_pb2.ToolCall(
        id="call_1",
        type="function",
        function=generate_pb2.FunctionCall(name="get_weather", arguments='{"city": "Beijing"}'),
    )
    return generate_pb2.ChatPrompt(
        messages=[
            generate_pb2.ChatMessage(  # content and content_parts exclude each other; the wire holds both
                role="assistant",
                content="Let me look that up.",
                name="helper",
                tool_call_id="call_0",
                tool_calls=[call],
                reasoning_content="The user wants the weather.",
                content_parts=[
                    generate_pb2.ContentPart(text="What is in "),
                    generate_pb2.ContentPart(image=image_part("url")),
                    generate_pb2.ContentPart(image=image_part("data")),
                ],
            ),
        ],
        tools=[
            generate_pb2.Tool(
                type="function",
                function=generate_pb2.FunctionDefinition(
                    name="get_weather", description="Current weather in a city", parameters=parameters
                ),
            )
        ],
        tool_choice=tool_choice,
        chat_template_kwargs=template_kwargs,
        add_generation_prompt=False,
        continue_final_message=True,
    )


def image_part(source: str) -> generate_pb2.ImagePart:
    if source == "url":
        return generate_pb2.ImagePart(url="https://example.com/cat.png", detail="high")
    return generate_pb2.ImagePart(data=b"\x89PNG\r\n\x1a\n\x00", detail="low")


def generate_request(prompt: str) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(
        request_id="req-1",
        model="ernie-4.5-21b-a3b",
        sampling=sampling_params(),
        images=[image_part("data"), image_part("url")],
    )
    if prompt == "text":
        request.text = "Hello, ERNIE!"
    elif prompt == "chat_auto":
        request.chat.CopyFrom(chat_prompt(generate_pb2.ToolChoice(mode="auto")))
    elif prompt == "chat_named":
        request.chat.CopyFrom(chat_prompt(generate_pb2.ToolChoice(function_name="get_weather")))
    else:
        request.token_ids.token_ids.extend([1, 5, 100271, 7])
    return request


def generate_response(matched: str) -> generate_pb2.GenerateResponse:
    response = generate_pb2.GenerateResponse(
        token_ids=[17, 2],
        text="Hello",
        logprobs=[token_logprobs(17), token_logprobs(2)],
        reasoning_text="greeting back",
        tool_calls=[generate_pb2.ToolCallDelta(index=1, id="call_2", name="get_weather", arguments='{"ci')],
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=usage(),
        metadata=generate_pb2.GenerateMetadata(request_id="req-1", model="ernie-4.5-21b-a3b", num_prompt_tokens=40),
    )
    if matched == "str":
        response.matched_stop_str = "\n\nUser:"
    else:
        response.matched_stop_token_id = 100272
    return response


def engine_request() -> worker_pb2.EngineRequest:
    return worker_pb2.EngineRequest(
        request_id="req-1",
        prompt_token_ids=[1, 5, 100271, 7],
        output_token_ids=[17],
        sampling=sampling_params(),
        prompt_block_hashes=[0xFFFF_FFFF_FFFF_FFFF, 0x0123_4567_89AB_CDEF],
        mm_items=[
            worker_pb2.MultiModalItem(
                modality=worker_pb2.MODALITY_IMAGE,
                data=b"\x89PNG\r\n\x1a\n\x00",
                content_hash="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                grid_t=1,
                grid_h=32,
                grid_w=46,
                offset=5,
                num_tokens=368,
            )
        ],
    )


def transfer_stats() -> worker_pb2.KVTransferStats:
    return worker_pb2.KVTransferStats(num_bytes=3 << 30, num_blocks=96, seconds=0.0375)


def kv_cache_spec(dtype: str = "bfloat16") -> worker_pb2.KVCacheSpec:
    return worker_pb2.KVCacheSpec(
        model_hash="sha256:9c1e",
        dtype=dtype,
        block_size=16,
        num_layers=28,
        num_kv_heads=4,
        head_dim=128,
        layout="kv,block,token,head,dim",
    )


MESSAGES: dict[str, Callable[[], Message]] = {
    "GenerateRequest.text": lambda: generate_request("text"),
    "GenerateRequest.chat.mode": lambda: generate_request("chat_auto"),
    "GenerateRequest.chat.function": lambda: generate_request("chat_named"),
    "GenerateRequest.token_ids": lambda: generate_request("token_ids"),
    "GenerateResponse.stop_str": lambda: generate_response("str"),
    "GenerateResponse.stop_token": lambda: generate_response("token"),
    "AbortRequest": lambda: generate_pb2.AbortRequest(request_id="req-1"),
    "AbortResponse": lambda: generate_pb2.AbortResponse(aborted=True),
    "ListModelsResponse": lambda: generate_pb2.ListModelsResponse(
        models=[
            generate_pb2.ModelInfo(
                id="ernie-4.5-21b-a3b",
                max_model_len=131072,
                owned_by="pdserve",
                created=1_763_800_000,
                root="baidu/ERNIE-4.5-21B-A3B-PT",
                num_workers=4,
            )
        ]
    ),
    "WorkerInfo": worker_info,
    "DecodeRequest": lambda: worker_pb2.DecodeRequest(
        request=engine_request(),
        prefill_peer=worker_ref("pdserve-worker-0"),
        transfer_id=(1 << 63) - 1,
        role_epoch=3,
        incarnation_id="3f2a9c",
    ),
    "DecodeResponse": lambda: worker_pb2.DecodeResponse(
        token_ids=[17],
        logprobs=[token_logprobs(17)],
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        matched_stop_token_id=100272,
        usage=usage(),
        prefill=worker_pb2.PrefillInfo(
            worker_id="pdserve-worker-0",
            is_remote=True,
            num_prefilled_tokens=8,
            num_cached_tokens=32,
            queue_seconds=0.002,
            prefill_seconds=0.031,
            transfer=transfer_stats(),
        ),
    ),
    "PrefillRequest": lambda: worker_pb2.PrefillRequest(
        request=engine_request(),
        destination=worker_pb2.KVDestination(
            worker=worker_ref(),
            kv_store_host="10.0.0.7",
            kv_store_port=50071,
            block_ids=[12, 13, 40],
            num_cached_tokens=16,
        ),
        transfer_id=42,
        role_epoch=7,
        incarnation_id="77aa01",
    ),
    "PrefillResponse": lambda: worker_pb2.PrefillResponse(
        first_token_id=17,
        first_token_logprobs=token_logprobs(17),
        num_prefilled_tokens=8,
        num_cached_tokens=16,
        transfer=transfer_stats(),
        queue_seconds=0.002,
        prefill_seconds=0.031,
    ),
    "WorkerAbortRequest": lambda: worker_pb2.WorkerAbortRequest(
        request_id="req-1", transfer_id=42, reason="client_cancelled"
    ),
    "WorkerAbortResponse": lambda: worker_pb2.WorkerAbortResponse(freed=True, num_freed_blocks=3),
    "LoadReport": lambda: worker_pb2.LoadReport(
        worker_id="pdserve-worker-1",
        incarnation_id="3f2a9c",
        role=common_pb2.WORKER_ROLE_PREFILL,
        role_epoch=3,
        state=common_pb2.WORKER_STATE_DRAINING,
        num_running_requests=5,
        num_waiting_requests=2,
        num_queued_prefill_tokens=20480,
        oldest_waiting_seconds=0.25,
        num_kv_blocks_used=700,
        num_kv_blocks_total=4096,
        num_kv_blocks_cached=300,
        avg_ttft_seconds=0.18,
        avg_itl_seconds=0.021,
        avg_batch_size=37.5,
        num_transferring_requests=1,
        window_seconds=10.0,
        timestamp_unix_ms=1_763_800_000_123,
    ),
    "SetRoleRequest": lambda: worker_pb2.SetRoleRequest(
        target_role=common_pb2.WORKER_ROLE_DECODE,
        expected_role_epoch=3,
        drain_timeout_seconds=30.0,
        reason="planner: prefill queue over SLO for 5 windows",
    ),
    "SetRoleResponse": lambda: worker_pb2.SetRoleResponse(
        result=worker_pb2.SET_ROLE_RESULT_OK,
        role=common_pb2.WORKER_ROLE_DECODE,
        role_epoch=4,
        message="drained in 1.2 s",
    ),
    "HeartbeatRequest": lambda: registry_pb2.HeartbeatRequest(record=worker_record()),
    "HeartbeatResponse": lambda: registry_pb2.HeartbeatResponse(created=True),
    "DeregisterRequest": lambda: registry_pb2.DeregisterRequest(worker_id="pdserve-worker-1", incarnation_id="3f2a9c"),
    "DeregisterResponse": lambda: registry_pb2.DeregisterResponse(removed=True),
    "ListWorkersResponse": lambda: registry_pb2.ListWorkersResponse(workers=[worker_record()]),
    "KVHandshakeRequest": lambda: worker_pb2.KVHandshakeRequest(
        spec=kv_cache_spec(), worker_id="pdserve-worker-0", incarnation_id="77aa01"
    ),
    "KVHandshakeResponse": lambda: worker_pb2.KVHandshakeResponse(
        ok=True,
        spec=kv_cache_spec("float8_e4m3fn"),
        mismatched_fields=["dtype"],
        message="dtype: bfloat16 != float8_e4m3fn",
        worker_id="pdserve-worker-1",
        incarnation_id="3f2a9c",
    ),
}


def worker_record() -> registry_pb2.WorkerRecord:
    return registry_pb2.WorkerRecord(
        info=worker_info(), load=MESSAGES["LoadReport"](), heartbeat_unix_ms=1_763_800_000_456, ttl_seconds=3.0
    )


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_round_trips_with_every_field_set(name: str) -> None:
    message = MESSAGES[name]()
    assert_all_fields_set(message)
    assert_all_fields_set(round_trip(message))


def test_every_message_of_the_services_has_a_round_trip_fixture() -> None:
    covered = {factory().DESCRIPTOR.full_name for factory in MESSAGES.values()}
    for module in (generate_pb2, worker_pb2, registry_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                for message_type in (method.input_type, method.output_type):
                    if message_type.fields:  # empty requests have nothing to round-trip
                        assert message_type.full_name in covered, f"{service.name}.{method.name}"


def test_unset_optional_fields_are_distinguishable_from_zero() -> None:
    params = common_pb2.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert round_trip(params).HasField("temperature")


def test_assert_all_fields_set_names_a_missing_field() -> None:
    message = worker_info()
    message.ClearField("metrics_port")
    with pytest.raises(AssertionError, match=r"WorkerInfo\.metrics_port"):
        assert_all_fields_set(message)
