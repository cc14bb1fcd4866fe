"""Serving images end to end on the `tiny-vl` preset: a real router, one prefill and one decode
worker process (CPU, KV over gloo), against the single-process engine (`engine.LLM`) given the
same images. The router builds the prompt (chat template, one placeholder per image expanded
to the image's tokens), the decode worker forwards the images' bytes to the prefill worker and
keeps only their grids, the KV crosses over gloo: the tokens and their log-probabilities must be
the offline engine's. The tiny model's greedy tokens hardly depend on the image, so the
log-probabilities (which do) are what shows each image reached the model."""

from __future__ import annotations

import base64
import io

import grpc
import httpx
import openai
import pytest
from PIL import Image

from engine import LLM, SamplingParams
from router.client import Client
from router.openai_protocol import ParseOptions, parse_chat
from router.server import render_chat
from tests.integration.conftest import start_cluster, wait_idle

RED, BLUE = (200, 30, 30), (30, 30, 200)
PARAMS = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
TOLERANCE = 1e-4  # log-probabilities: the same float32 math in other processes and batch shapes
# One full block (16 tokens) of text before the image, so prefix caching has a text-only block.
LEAD = "Look carefully at the picture below and then describe its colour."


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def openai_messages(*parts: str | bytes) -> list[dict]:
    content = [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": data_url(p)}}
        for p in parts
    ]
    return [{"role": "user", "content": content}]


def grpc_messages(*parts: str | bytes) -> list[dict]:
    return [{"role": "user", "content": [p if isinstance(p, str) else {"type": "image", "image": p} for p in parts]}]


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster(1, 1, model="tiny-vl")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny-vl", max_model_len=1024)


def offline(llm: LLM, messages: list[dict], **body):
    """What the cluster must answer: the router's own prompt building, then the offline engine."""
    chat = parse_chat({"model": "tiny-vl", "messages": messages, **body}, ParseOptions("tiny-vl")).requests[0].chat
    images = [base64.b64decode(part["image_url"]["url"].split(",", 1)[1]) for part in _image_parts(messages)]
    prompt = {"prompt": render_chat(llm.tokenizer, chat), "images": images}
    return llm.generate(prompt, SamplingParams(**PARAMS))[0]


def _image_parts(messages: list[dict]) -> list[dict]:
    return [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url"]


def logprobs_of(result) -> list[float]:
    return [entry.sampled.logprob for entry in result.logprobs]


def assert_same_as_offline(result, expected) -> None:
    assert result.token_ids == list(expected.token_ids)
    assert logprobs_of(result) == pytest.approx([lp.logprob for lp in expected.logprobs], abs=TOLERANCE)
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)


@pytest.mark.parametrize(
    "parts",
    [
        (png(64, 48, RED), "What colour is this?"),
        ("Compare ", png(64, 48, RED), " with ", png(224, 112, BLUE), ": which is wider?"),
    ],
    ids=["one image", "two images"],
)
def test_grpc_image_prompts_give_the_offline_engine_s_tokens(cluster, llm, parts):
    expected = offline(llm, openai_messages(*parts))
    assert num_images(llm, expected.prompt_token_ids) == sum(isinstance(p, bytes) for p in parts)
    with Client(cluster.address, timeout=120) as client:
        result = client.generate(grpc_messages(*parts), **PARAMS)
    assert_same_as_offline(result, expected)
    wait_idle(cluster)


def num_images(llm: LLM, ids) -> int:
    """Runs of image placeholder tokens in a prompt."""
    image_token = llm.tokenizer.special_token_id("image_token")
    return sum(1 for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != image_token))


def test_a_prompt_prefilled_on_the_decode_worker_keeps_its_images(llm):
    """Conditional disaggregation: short prompts prefill on the decode worker, which then needs
    the images' bytes itself."""
    parts = (png(64, 48, BLUE), "Short?")
    expected = offline(llm, openai_messages(*parts))
    local = start_cluster(1, 1, model="tiny-vl", router_args=("--local-prefill-max-tokens", "1000"))
    try:
        with Client(local.address, timeout=120) as client:
            result = client.generate(grpc_messages(*parts), **PARAMS)
        assert_same_as_offline(result, expected)
        prefill = next(r for r in wait_idle(local) if r.worker_id.startswith("prefill"))
        assert prefill.num_kv_blocks_cached == 0  # the prefill worker never saw the request
    finally:
        local.stop()


def test_images_across_turns_and_a_raw_prompt_with_image_bytes(cluster, llm):
    history = [
        *openai_messages(png(64, 48, RED), "What is this?"),
        {"role": "assistant", "content": "A red square."},
        *openai_messages("And this one?", png(64, 48, BLUE)),
    ]
    expected = offline(llm, history)
    raw = "<|begin_of_sentence|>User: <|IMAGE_PLACEHOLDER|> vs <|IMAGE_PLACEHOLDER|>\nAssistant: "
    raw_images = [png(64, 48, RED), png(112, 56, BLUE)]
    raw_expected = llm.generate({"prompt": raw, "images": raw_images}, SamplingParams(**PARAMS))[0]
    with Client(cluster.address, timeout=120) as client:
        turns = client.generate(
            [
                grpc_messages(png(64, 48, RED), "What is this?")[0],
                {"role": "assistant", "content": "A red square."},
                grpc_messages("And this one?", png(64, 48, BLUE))[0],
            ],
            **PARAMS,
        )
        text = client.generate(raw, images=raw_images, **PARAMS)
    assert_same_as_offline(turns, expected)
    assert_same_as_offline(text, raw_expected)
    wait_idle(cluster)


def test_openai_client_with_a_data_url_gets_the_offline_answer(cluster, llm):
    messages = openai_messages(png(64, 48, RED), "Describe it.")
    body = {"chat_template_kwargs": {"enable_thinking": False}}
    expected = offline(llm, messages, **body)
    client = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.chat.completions.create(
        model="tiny-vl",
        messages=messages,
        max_tokens=PARAMS["max_tokens"],
        temperature=0,
        extra_body={"ignore_eos": True, **body},
    )
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == PARAMS["max_tokens"]
    wait_idle(cluster)


def test_the_same_text_with_another_image_reuses_only_the_text_blocks(cluster, llm):
    red, blue = png(224, 112, RED), png(224, 112, BLUE)  # the same size: the same prompt tokens
    expected = {color: offline(llm, openai_messages(LEAD, image)) for color, image in (("red", red), ("blue", blue))}
    assert expected["red"].prompt_token_ids == expected["blue"].prompt_token_ids
    ids = list(expected["red"].prompt_token_ids)
    image_token = llm.tokenizer.special_token_id("image_token")
    first_image_token, last_image_token = ids.index(image_token), len(ids) - ids[::-1].index(image_token) - 1
    assert first_image_token >= 16  # a full block of text comes first
    with Client(cluster.address, timeout=120) as client:
        red_cold = client.generate(grpc_messages(LEAD, red), **PARAMS)
        blue_after_red = client.generate(grpc_messages(LEAD, blue), **PARAMS)
        red_again = client.generate(grpc_messages(LEAD, red), **PARAMS)
    for result, color in ((red_cold, "red"), (blue_after_red, "blue"), (red_again, "red")):
        assert_same_as_offline(result, expected[color])
    # Another image changes the model's view (the log-probabilities), not just a hash.
    assert max(abs(a - b) for a, b in zip(logprobs_of(red_cold), logprobs_of(blue_after_red), strict=True)) > 1e-3
    # The decode worker shares the text-only blocks, never a block that holds image tokens...
    assert blue_after_red.usage.cached_prompt_tokens == first_image_token // 16 * 16
    # ...and the same image again finds its blocks.
    assert red_again.usage.cached_prompt_tokens >= (last_image_token + 1) // 16 * 16
    wait_idle(cluster)


def test_a_refused_image_is_a_400_and_the_cluster_keeps_serving(cluster):
    with httpx.Client(timeout=60) as http:
        bad = http.post(
            f"http://{cluster.http_address}/v1/chat/completions",
            json={"model": "tiny-vl", "messages": openai_messages("What?", b"\x89PNG\r\n\x1a\n broken")},
        )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages[0].content[1]"
    with Client(cluster.address, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate("<|IMAGE_PLACEHOLDER|>", images=["http://169.254.169.254/latest/meta-data"])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images[0]" in info.value.details()
        assert len(client.generate(grpc_messages(png(64, 48, RED), "ok?"), max_tokens=2).token_ids) == 2
    wait_idle(cluster)
