"""Images through the router's front ends, in-process over a scripted cluster (`scripted.py`) on
the `tiny-vl` preset: the OpenAI client with data: URLs, the gRPC API with image bytes, the
prompt the workers get (placeholders expanded, items with their bytes, block hashes keyed by
the images), thinking mode on the VL template, and every refusal as a 400 / INVALID_ARGUMENT
that names the part, after which the router keeps serving."""

from __future__ import annotations

import asyncio
import base64
import io
import os

import grpc
import httpx
import openai
import pytest
from PIL import Image

from engine.multimodal import content_hash, image_grid, num_placeholder_tokens
from protos.pdserve.v1 import generate_pb2, generate_pb2_grpc, worker_pb2
from router.client import AsyncClient
from router.media import MediaConfig
from router.workers import WorkerHandle
from tests.router.media_server import png
from tests.router.scripted import ScriptedService, serving

IMAGE_TOKEN = 380  # <|IMAGE_PLACEHOLDER|> in engine/assets/tiny-vl
RED, BLUE = png(64, 48, (200, 30, 30)), png(64, 48, (30, 30, 200))
WIDE = png(224, 112)  # 1 x 8 x 16 patches: 32 tokens
THINKING_OUTPUT = "<think>\nA red square.\n</think>\n\nIt is red."


def run(coro):
    return asyncio.run(coro)


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_part(image: bytes | str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image) if isinstance(image, bytes) else image}}


def user(*parts: bytes | str | dict) -> list[dict]:
    content = [image_part(p) if isinstance(p, bytes) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def vl_service(script=("ok",), **config) -> ScriptedService:
    return ScriptedService(list(script), model_id="tiny-vl", **config)


def noise_png(size: int) -> bytes:
    """A PNG of random pixels: it barely compresses (size x size x 3 bytes and a little more)."""
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(out, "PNG")
    return out.getvalue()


def answering(service: ScriptedService):
    """Serve without the reasoning parser: the scripted text is the answer."""
    return serving(service, reasoning_parser=False)


def api(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def chat(url: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(url + "/v1/chat/completions", json={"model": "tiny-vl", **body})


# --------------------------------------------------------------------------------------------- prompts


def test_openai_client_data_url_image_reaches_the_workers_expanded_with_its_bytes():
    service = vl_service()

    async def scenario():
        async with answering(service) as url:
            return await api(url).chat.completions.create(model="tiny-vl", messages=user(RED, "What is this?"))

    response = run(scenario())
    assert response.choices[0].message.content == "ok"
    (req,) = service.prepared
    (item,) = req.mm_items
    assert item.modality == "image" and item.data == RED and item.content_hash == content_hash(RED)
    assert item.grid_thw == (1, 4, 4) and item.num_tokens == 4  # 64x48 -> 56x56 pixels -> 4x4 patches
    assert req.prompt_ids[item.offset : item.end] == [IMAGE_TOKEN] * 4
    assert req.prompt_ids.count(IMAGE_TOKEN) == 4
    assert service.prompts[0].startswith("<|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|>")
    assert service.prompts[0].endswith("<|IMAGE_END|>What is this?\nAssistant: ")
    assert response.usage.prompt_tokens == len(req.prompt_ids)


def test_several_images_across_messages_keep_their_order_and_sizes():
    service = vl_service()
    messages = [
        *user("Compare ", RED, " with ", WIDE),
        {"role": "assistant", "content": "Two images."},
        *user(BLUE, "And this one?"),
    ]

    async def scenario():
        async with answering(service) as url:
            return await chat(url, {"messages": messages})

    assert run(scenario()).status_code == 200
    (req,) = service.prepared
    assert [i.data for i in req.mm_items] == [RED, WIDE, BLUE]
    assert [i.grid_thw for i in req.mm_items] == [(1, 4, 4), (1, 8, 16), (1, 4, 4)]
    assert [i.num_tokens for i in req.mm_items] == [4, 32, 4]
    offsets = [i.offset for i in req.mm_items]
    assert offsets == sorted(offsets) and req.prompt_ids.count(IMAGE_TOKEN) == 40
    prompt = service.prompts[0]
    assert prompt.index("Picture 1:") < prompt.index("Picture 2:") < prompt.index("Picture 3:")


def test_worker_request_carries_items_with_bytes_and_image_keyed_block_hashes():
    service = vl_service(block_size=16)
    text = "Describe the picture below in one careful sentence, please."

    async def prepare(image: bytes):
        request = generate_pb2.GenerateRequest(
            chat=generate_pb2.ChatPrompt(
                messages=[
                    generate_pb2.ChatMessage(
                        role="user",
                        content_parts=[
                            generate_pb2.ContentPart(text=text),
                            generate_pb2.ContentPart(image=generate_pb2.ImagePart(data=image)),
                        ],
                    )
                ]
            )
        )
        return await service._prepare(request)

    red, blue, red_again = run(prepare(WIDE)), run(prepare(png(224, 112, (0, 90, 0)))), run(prepare(WIDE))
    assert red.prompt_ids == blue.prompt_ids  # same text, same image size: the same tokens
    first_image_block = red.mm_items[0].offset // 16
    assert first_image_block >= 1
    assert red.block_hashes[:first_image_block] == blue.block_hashes[:first_image_block]  # text-only blocks
    assert all(
        r != b for r, b in zip(red.block_hashes[first_image_block:], blue.block_hashes[first_image_block:], strict=True)
    )
    assert red.block_hashes == red_again.block_hashes

    decode = WorkerHandle("d:1", None, None, report=worker_pb2.LoadReport(role_epoch=4))  # type: ignore[arg-type]
    msg = service._decode_request(red, [], decode, None)
    (item,) = msg.request.mm_items
    assert item.modality == worker_pb2.MODALITY_IMAGE and item.data == WIDE
    assert (item.grid_t, item.grid_h, item.grid_w, item.offset, item.num_tokens) == (
        1,
        8,
        16,
        red.mm_items[0].offset,
        32,
    )
    assert item.content_hash == content_hash(WIDE) and list(msg.request.prompt_block_hashes) == red.block_hashes


def test_geometry_flags_change_the_token_count():
    service = vl_service(media=MediaConfig(image_max_pixels=28 * 28 * 8))  # at most 8 tokens per image
    big = png(640, 480)

    async def scenario():
        async with answering(service) as url:
            return await chat(url, {"messages": user(big, "?")})

    assert run(scenario()).status_code == 200
    (item,) = service.prepared[0].mm_items
    assert item.grid_thw == image_grid(480, 640, service.vision.geometry)
    assert item.num_tokens == num_placeholder_tokens(item.grid_thw, 2) <= 8


# --------------------------------------------------------------------------------------------- gRPC


async def _grpc_service(service: ScriptedService):
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", service.max_body_bytes + (64 << 10))])
    generate_pb2_grpc.add_GenerationServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_grpc_image_bytes_in_chat_parts_and_with_text_and_token_prompts():
    service = vl_service(media=MediaConfig(image_max_pixels=28 * 28 * 16))  # at most 16 tokens per image
    large = noise_png(1300)
    assert len(large) > 4 << 20  # over gRPC's default 4 MiB message limit

    async def scenario():
        server, address = await _grpc_service(service)
        try:
            async with AsyncClient(address, timeout=30) as client:
                chat = [{"role": "user", "content": [{"type": "image", "image": RED}, "What is it?"]}]
                first = await client.generate(chat, max_tokens=4)
                text = await client.generate("<|IMAGE_PLACEHOLDER|> and <|IMAGE_PLACEHOLDER|>", images=[RED, BLUE])
                tokens = await client.generate([5, IMAGE_TOKEN, 6], images=[data_url(BLUE)])
                big = await client.generate([IMAGE_TOKEN], images=[large])
                return first, text, tokens, big
        finally:
            await server.stop(None)

    results = run(scenario())
    assert all(r.text == "ok" and r.finish_reason == "stop" for r in results)
    chat_req, text_req, token_req, big_req = service.prepared
    assert [i.data for i in chat_req.mm_items] == [RED]
    assert [i.data for i in text_req.mm_items] == [RED, BLUE] and text_req.prompt_ids.count(IMAGE_TOKEN) == 8
    assert token_req.prompt_ids == [5, *[IMAGE_TOKEN] * 4, 6] and token_req.mm_items[0].offset == 1
    assert big_req.mm_items[0].data == large and big_req.mm_items[0].grid_thw == (1, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "no placeholder", "images": [RED]}, "0 image placeholders for 1 images"),
        ({"prompt": "<|IMAGE_PLACEHOLDER|> typed in"}, "1 image placeholders for 0 images"),
        ({"prompt": "<|VIDEO_PLACEHOLDER|>?"}, "videos are not supported"),
        ({"prompt": [{"role": "user", "content": [{"type": "image", "image": b"junk"}]}]}, "messages[0].content[0]:"),
        ({"prompt": [{"role": "user", "content": "hi"}], "images": [RED]}, "content_parts"),
        ({"prompt": "<|IMAGE_PLACEHOLDER|>", "images": ["http://10.0.0.1/a.png"]}, "images[0]: image URL refused"),
    ],
)
def test_grpc_refusals_are_invalid_argument_and_serving_goes_on(kwargs, message):
    service = vl_service()
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")

    async def scenario():
        server, address = await _grpc_service(service)
        try:
            async with AsyncClient(address, timeout=30) as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.generate(prompt, **kwargs)
                fine = await client.generate("<|IMAGE_PLACEHOLDER|>?", images=[RED])
                return info.value, fine
        finally:
            await server.stop(None)

    error, fine = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()
    assert fine.text == "ok"


# --------------------------------------------------------------------------------------------- refusals

HUGE = png(200, 200)
ERRORS = [
    # (case, service config, model, message content, param, code, message)
    (
        "corrupt",
        {},
        "tiny-vl",
        [image_part(b"not a png")],
        "messages[0].content[0]",
        "invalid_image",
        "accepted format",
    ),
    (
        "truncated",
        {},
        "tiny-vl",
        ["Look: ", image_part(HUGE[: len(HUGE) // 2])],
        "messages[0].content[1]",
        "invalid_image",
        "cannot be decoded",
    ),
    (
        "too many",
        {"media": MediaConfig(max_images_per_request=2)},
        "tiny-vl",
        [image_part(RED), image_part(BLUE), "and", image_part(RED)],
        "messages[0].content[3]",
        "too_many_images",
        "at most 2 images per request, got 3",
    ),
    (
        "bytes",
        {"media": MediaConfig(max_image_bytes=len(RED) - 1)},
        "tiny-vl",
        [image_part(RED)],
        "messages[0].content[0]",
        "image_too_large",
        "larger than the limit of",
    ),
    (
        "pixels",
        {"media": MediaConfig(max_image_pixels=64 * 47)},
        "tiny-vl",
        [image_part(RED)],
        "messages[0].content[0]",
        "image_too_large",
        "64x48 = 3072 pixels exceeds the limit of 3008",
    ),
    (
        "loopback url",
        {},
        "tiny-vl",
        [image_part("http://127.0.0.1:8000/cat.png")],
        "messages[0].content[0]",
        "image_url_refused",
        "not a public address",
    ),
    (
        "name to loopback",
        {},
        "tiny-vl",
        [{"type": "text", "text": "hi"}, image_part("http://localhost:9/cat.png")],
        "messages[0].content[1]",
        "image_url_refused",
        "localhost resolves to",
    ),
    (
        "scheme",
        {},
        "tiny-vl",
        [image_part("file:///etc/passwd")],
        "messages[0].content[0]",
        "invalid_image_url",
        "scheme 'file'",
    ),
    (
        "content type",
        {},
        "tiny-vl",
        ["hi", {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
        "messages[0].content[1].type",
        "invalid_value",
        "'input_audio' is not supported",
    ),
    (
        "detail",
        {},
        "tiny-vl",
        [{"type": "image_url", "image_url": {"url": data_url(RED), "detail": "ultra"}}],
        "messages[0].content[0].image_url.detail",
        "invalid_value",
        "detail",
    ),
    (
        "no url",
        {},
        "tiny-vl",
        [{"type": "image_url", "image_url": {}}],
        "messages[0].content[0].image_url.url",
        "invalid_value",
        "is required",
    ),
    (
        "text-only model",
        {},
        "tiny",
        ["What is this?", image_part(RED)],
        "messages[0].content[1]",
        "images_not_supported",
        "model 'tiny' does not accept images",
    ),
]


@pytest.mark.parametrize(("case", "config", "model", "content", "param", "code", "message"), ERRORS, ids=lambda v: v)
def test_refused_images_are_400s_naming_the_part_and_serving_goes_on(
    case, config, model, content, param, code, message
):
    service = ScriptedService(["ok"], model_id=model, **config)

    async def scenario():
        async with answering(service) as url, httpx.AsyncClient(timeout=30) as http:
            body = {"model": model, "messages": [{"role": "user", "content": content}]}
            bad = await http.post(url + "/v1/chat/completions", json=body)
            good = await http.post(url + "/v1/chat/completions", json={"model": model, "messages": user("hi")})
            return bad, good

    bad, good = run(scenario())
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert message in error["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "ok"


def test_images_have_their_own_size_limit_beside_max_request_bytes():
    vl, text_only = vl_service(max_request_bytes=16384), ScriptedService(["ok"], max_request_bytes=16384)
    noisy = noise_png(100)
    assert len(noisy) > 16384

    async def scenario():
        async with answering(vl) as vl_url, answering(text_only) as text_url:
            image = await chat(vl_url, {"messages": user(noisy, "?")})
            long_text = await chat(vl_url, {"messages": user("x" * 20000)})
            text_model = await chat(text_url, {"messages": user(noisy, "?")})
            return image, long_text, text_model

    image, long_text, text_model = run(scenario())
    assert image.status_code == 200 and vl.prepared[0].mm_items[0].data == noisy
    assert long_text.status_code == 400 and "too large" in long_text.json()["error"]["message"]
    assert text_model.status_code == 413  # a text-only model reads no more than max_request_bytes


# --------------------------------------------------------------------------------------------- thinking


def test_thinking_on_the_vl_template_splits_reasoning_and_off_passes_everything_through():
    service = vl_service([THINKING_OUTPUT[i : i + 4] for i in range(0, len(THINKING_OUTPUT), 4)])
    messages = user(RED, "What colour?")

    async def scenario():
        async with serving(service) as url:
            client = api(url)
            on = await client.chat.completions.create(model="tiny-vl", messages=messages)
            off = await client.chat.completions.create(
                model="tiny-vl", messages=messages, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
            )
            metadata_off = await chat(url, {"messages": messages, "metadata": {"enable_thinking": "false"}})
            return on, off, metadata_off

    on, off, metadata_off = run(scenario())
    assert (on.choices[0].message.reasoning_content, on.choices[0].message.content) == ("A red square.", "It is red.")
    assert off.choices[0].message.content == THINKING_OUTPUT and off.choices[0].message.reasoning_content is None
    assert metadata_off.json()["choices"][0]["message"]["content"] == THINKING_OUTPUT
    on_prompt, off_prompt, metadata_prompt = service.prompts
    assert on_prompt.endswith("What colour?\nAssistant: ")
    assert off_prompt == metadata_prompt == on_prompt + "<think>\n\n</think>\n\n"
    assert all(len(req.mm_items) == 1 for req in service.prepared)
