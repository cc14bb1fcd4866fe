"""The engine serving ERNIE-4.5-VL: greedy tokens against transformers' `generate` with images,
chunked prefill through an image, prefix caching keyed by image content, the prefill -> decode
hand-off (the decode side never sees pixels), and requests that cannot be served."""

from __future__ import annotations

import io

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import InvalidRequestError, LLMEngine
from engine.mm_inputs import MultiModalInputError
from engine.multimodal import ImageInput, MultiModalItem, VisionGeometry, content_hash, expand_placeholders, image_grid
from engine.request import Request, RequestStatus
from engine.scheduler import SampledToken
from tests.helpers.hf_vl_models import (
    IMAGE_END,
    IMAGE_START,
    IMAGE_TOKEN,
    hf_vl_greedy,
    image_input,
    items_without_data,
    load_hf_vl_model,
    make_hf_vl_model_dir,
    png,
    prompt_with_images,
)

NUM_TOKENS = 8
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
IMAGES = {"28x28": png(28, 28, seed=1), "56x84": png(56, 84, seed=2), "100x60": png(100, 60, seed=3)}
BIG_IMAGE = png(150, 200, seed=4)  # resized to 140x196: 10x14 patches, 35 placeholders
# text pieces around the images, and the images
PROMPTS = {
    "text_only": ([[1, 5, 6, 7, 8, 9]], []),
    "28x28": ([[1, 5, 6], [7, 8]], [IMAGES["28x28"]]),
    "56x84": ([[1, 5], [9, 10, 11]], [IMAGES["56x84"]]),
    "100x60": ([[1], [9, 10]], [IMAGES["100x60"]]),
    "two_images": ([[1, 5], [6, 7], [8, 9]], [IMAGES["28x28"], IMAGES["100x60"]]),
    "big_image": ([[1, 5, 6], [20, 21, 22, 23]], [BIG_IMAGE]),
}


def _single_placeholder_ids(pieces: list[list[int]]) -> list[int]:
    """The prompt as a chat template writes it: one placeholder per image between start / end."""
    ids = list(pieces[0])
    for piece in pieces[1:]:
        ids += [IMAGE_START, IMAGE_TOKEN, IMAGE_END, *piece]
    return ids


def _request(name: str) -> dict:
    pieces, images = PROMPTS[name]
    return {"prompt_token_ids": _single_placeholder_ids(pieces), "images": images}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(make_hf_vl_model_dir(tmp_path_factory.mktemp("vl_engine") / "model", seed=5))


@pytest.fixture(scope="module")
def expected(folder: str) -> dict[str, list[int]]:
    """transformers' greedy tokens for every prompt."""
    model = load_hf_vl_model(folder)
    return {
        name: hf_vl_greedy(model, prompt_with_images(pieces, images)[0], images, NUM_TOKENS)
        for name, (pieces, images) in PROMPTS.items()
    }


def test_batched_greedy_matches_transformers_generate(folder: str, expected) -> None:
    llm = LLM(folder)
    outputs = llm.generate([_request(name) for name in PROMPTS], GREEDY)
    for name, out in zip(PROMPTS, outputs, strict=True):
        pieces, images = PROMPTS[name]
        assert list(out.prompt_token_ids) == prompt_with_images(pieces, images)[0]
        assert list(out.token_ids) == expected[name], name
    assert llm.engine.runner.multimodal.num_cached_images() == 0
    llm.engine.check_idle_invariants()


def test_image_inputs_and_encoded_bytes_give_the_same_tokens(folder: str, expected) -> None:
    pieces, images = PROMPTS["two_images"]
    request = {"prompt_token_ids": _single_placeholder_ids(pieces), "images": [image_input(d) for d in images]}
    assert list(LLM(folder).generate(request, GREEDY)[0].token_ids) == expected["two_images"]


def test_chunked_prefill_through_an_image_gives_the_same_tokens(folder: str, expected) -> None:
    llm = LLM(folder, max_num_batched_tokens=8, enable_prefix_caching=False)
    encoded = []
    inputs = llm.engine.runner.multimodal
    original = inputs.model.encode_images
    inputs.model.encode_images = lambda pixels, grids: encoded.append(grids) or original(pixels, grids)
    try:
        outputs = llm.generate([_request("big_image"), _request("two_images")], GREEDY)
    finally:
        inputs.model.encode_images = original
    assert [list(o.token_ids) for o in outputs] == [expected["big_image"], expected["two_images"]]
    assert sum(len(grids) for grids in encoded) == 3  # each image ran through the tower once
    assert inputs.num_cached_images() == 0


def test_prefix_cache_shares_blocks_only_for_the_same_image(folder: str, expected) -> None:
    llm = LLM(folder, block_size=4)
    pieces = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24]]  # placeholders start at token 11
    cat, dog = png(56, 84, seed=7), png(56, 84, seed=8)
    first = llm.generate({"prompt_token_ids": _single_placeholder_ids(pieces), "images": [cat]}, GREEDY)[0]
    other = llm.generate({"prompt_token_ids": _single_placeholder_ids(pieces), "images": [dog]}, GREEDY)[0]
    again = llm.generate({"prompt_token_ids": _single_placeholder_ids(pieces), "images": [cat]}, GREEDY)[0]
    assert first.prompt_token_ids == other.prompt_token_ids and len(first.prompt_token_ids) == 23
    assert other.num_cached_tokens == 8  # blocks [0, 4) and [4, 8); block [8, 12) holds a placeholder
    assert again.num_cached_tokens == 20  # every full block before the last token
    cold = LLM(folder, enable_prefix_caching=False)
    for out, image in ((first, cat), (other, dog), (again, cat)):
        prompt = {"prompt_token_ids": _single_placeholder_ids(pieces), "images": [image]}
        assert out.token_ids == cold.generate(prompt, GREEDY)[0].token_ids
    assert first.token_ids == again.token_ids
    llm.engine.check_idle_invariants()


def test_decode_worker_continues_without_pixels(folder: str, expected) -> None:
    """Prefill on one engine, hand the KV and the request (images without data) to another, decode
    there: the tokens are the single engine's. The decode side needs only grids for its positions."""
    prefill = LLMEngine.from_model(folder)
    decode = LLMEngine.from_model(folder)
    block_size = decode.runtime.block_size
    handed = []
    for name in ("two_images", "big_image", "text_only"):
        pieces, images = PROMPTS[name]
        ids, items = prompt_with_images(pieces, images)
        sent = prefill.submit(prefill.make_request(f"p-{name}", ids, GREEDY, mm_items=items))
        while not sent.output_token_ids:
            prefill.step()
        received = decode.make_request(f"d-{name}", ids, GREEDY, mm_items=items_without_data(items))
        assert decode.preallocate(received) is not None
        num_blocks = -(-len(ids) // block_size)
        src = torch.tensor(sent.block_ids[:num_blocks])
        dst = torch.tensor(received.block_ids[:num_blocks])
        decode.kv_cache[:, :, dst] = prefill.kv_cache[:, :, src]
        decode.adopt(received, SampledToken(sent.output_token_ids[0], None))
        prefill.abort(f"p-{name}")
        handed.append((name, received))
    while decode.has_unfinished:
        decode.step()
    for name, request in handed:
        assert list(request.output_token_ids) == expected[name], name
    decode.check_idle_invariants()


def _run_with_a_bad_image(engine: LLMEngine, bad: Request) -> tuple[list, list[int]]:
    """Step `bad` beside a good text request and a good image request: the failed outputs and the
    good requests' tokens (which must be as if `bad` had never come)."""
    pieces, images = PROMPTS["28x28"]
    ids, items = prompt_with_images(pieces, images)
    good_text = engine.add_request("good-text", [1, 2, 3], GREEDY)
    good_image = engine.submit(engine.make_request("good-image", ids, GREEDY, mm_items=items))
    engine.submit(bad)
    failed = []
    while engine.has_unfinished:
        failed += [out for out in engine.step() if out.request_id == bad.request_id]
    engine.check_idle_invariants()
    return failed, [list(good_text.output_token_ids), list(good_image.output_token_ids)]


def _alone(folder: str) -> list[list[int]]:
    engine = LLMEngine.from_model(folder)
    pieces, images = PROMPTS["28x28"]
    ids, items = prompt_with_images(pieces, images)
    requests = [engine.add_request("good-text", [1, 2, 3], GREEDY)]
    requests.append(engine.submit(engine.make_request("good-image", ids, GREEDY, mm_items=items)))
    while engine.has_unfinished:
        engine.step()
    return [list(r.output_token_ids) for r in requests]


def test_a_prompt_image_without_pixels_fails_that_request_alone(folder: str) -> None:
    engine = LLMEngine.from_model(folder)
    pieces, images = PROMPTS["56x84"]
    ids, items = prompt_with_images(pieces, images)
    bad = engine.make_request("no-pixels", ids, GREEDY, mm_items=items_without_data(items))
    failed, good = _run_with_a_bad_image(engine, bad)
    assert [(out.finished, out.request.status) for out in failed] == [(True, RequestStatus.FINISHED_ERROR)]
    assert good == _alone(folder)
    with pytest.raises(MultiModalInputError, match="has no pixels here") as raised:
        engine.runner.multimodal.preprocess(items_without_data(items))
    assert raised.value.request_ids == ()


def test_an_image_of_another_grid_fails_that_request_alone(folder: str) -> None:
    engine = LLMEngine.from_model(folder)
    data = IMAGES["56x84"]  # a 4x6 grid here; claim 3x8 (6 placeholders too, but 3 rows cannot merge by 2)
    ids = [1, IMAGE_START] + [IMAGE_TOKEN] * 6 + [IMAGE_END, 7]
    item = MultiModalItem("image", data, content_hash(data), (1, 3, 8), 2, 6)
    failed, good = _run_with_a_bad_image(engine, engine.make_request("r", ids, GREEDY, mm_items=(item,)))
    assert [out.request.status for out in failed] == [RequestStatus.FINISHED_ERROR]
    assert good == _alone(folder)
    with pytest.raises(
        MultiModalInputError, match=r"makes a \(1, 4, 6\) patch grid here but the request was built for \(1, 3, 8\)"
    ):
        engine.runner.multimodal.preprocess([item])


@pytest.mark.parametrize("size", ["56x84", "100x60"])
def test_a_grid_built_with_other_pixel_limits_is_honoured_exactly(folder: str, size: str) -> None:
    """The router's --image-min/max-pixels change the grid a request is built with; the worker
    gives the patches transformers' processor makes under those limits, bit for bit."""
    from PIL import Image
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    engine = LLMEngine.from_model(folder)
    data = IMAGES[size]
    image = Image.open(io.BytesIO(data))
    limits = VisionGeometry(min_pixels=28 * 28, max_pixels=28 * 28 * 4)
    _, items = expand_placeholders([1, IMAGE_TOKEN], [ImageInput(data, image.height, image.width)], IMAGE_TOKEN, limits)
    assert items[0].grid_thw != image_grid(image.height, image.width, VisionGeometry())
    patches, grids = engine.runner.multimodal.preprocess(items)
    size_rule = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
    expected = Ernie4_5_VLMoeImageProcessorPil(size=size_rule, temporal_patch_size=1)(
        images=[image], return_tensors="pt"
    )
    assert grids == [tuple(items[0].grid_thw)] == [tuple(expected["image_grid_thw"][0].tolist())]
    assert torch.equal(patches, expected["pixel_values"])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"prompt_token_ids": [1, IMAGE_TOKEN, 5], "images": []}, "placeholders without an image at \\[1\\]"),
        (
            {"prompt_token_ids": [1, IMAGE_TOKEN, 5, IMAGE_TOKEN], "images": [IMAGES["28x28"]]},
            "2 image placeholders for 1 images",
        ),
        ({"prompt_token_ids": [1, 383, 5]}, "takes images, not videos"),
        ({"prompt_token_ids": [1, IMAGE_TOKEN], "images": [b"not an image"]}, "cannot be decoded"),
        ({"prompt_token_ids": [1, IMAGE_TOKEN], "images": [ImageInput(b"x", 10, 3000)]}, "aspect ratio"),
        ({"images": [IMAGES["28x28"]]}, "needs 'prompt'"),
    ],
)
def test_bad_image_requests_raise_and_the_engine_keeps_serving(folder: str, prompt: dict, message: str) -> None:
    llm = LLM(folder)
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate(prompt, GREEDY)
    assert len(llm.generate([1, 2, 3], GREEDY)[0].token_ids) == NUM_TOKENS
    llm.engine.check_idle_invariants()


def test_a_text_model_refuses_images() -> None:
    llm = LLM("tiny")
    with pytest.raises(InvalidRequestError, match="does not accept images"):
        llm.generate({"prompt_token_ids": [1, 380, 5], "images": [IMAGES["28x28"]]}, GREEDY)


def test_tiny_vl_preset_serves_images_deterministically() -> None:
    request = {"prompt_token_ids": _single_placeholder_ids([[1, 5], [9]]), "images": [IMAGES["56x84"]]}
    first = LLM("tiny-vl").generate([request, [1, 2, 3]], GREEDY)
    again = LLM("tiny-vl").generate([request, [1, 2, 3]], GREEDY)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len(first[0].prompt_token_ids) == 3 + 6 + 2


def test_text_prompts_and_chat_messages_with_images_use_the_tiny_vl_tokenizer() -> None:
    """The tiny-vl preset's tokenizer maps the placeholder text to the image token; its chat
    template writes one placeholder per image part."""
    llm = LLM("tiny-vl")
    text = "Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> What is it?"
    out = llm.generate({"prompt": text, "images": [IMAGES["56x84"]]}, GREEDY)[0]
    assert out.prompt_token_ids.count(IMAGE_TOKEN) == 6
    parts = [{"type": "text", "text": "Compare "}, {"type": "image", "image": IMAGES["28x28"]}]
    parts += [{"type": "text", "text": " and "}, {"type": "image", "image": IMAGES["100x60"]}]
    chat = llm.chat([{"role": "user", "content": parts}], GREEDY)
    assert chat.prompt_token_ids.count(IMAGE_TOKEN) == 4 + 8
    assert chat.prompt_token_ids.count(IMAGE_START) == 2 and len(chat.token_ids) == NUM_TOKENS


@pytest.mark.gpu
def test_tiny_vl_on_a_gpu_decodes_under_graphs_to_the_eager_tokens() -> None:
    """On CUDA the image prompt prefills eagerly (vision tower, Triton experts of both pools) and its
    decode steps replay CUDA graphs with the 3D-RoPE delta positions: the same tokens as eager."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [
        {"prompt_token_ids": _single_placeholder_ids([[1, 5], [9]]), "images": [IMAGES["56x84"]]},
        {"prompt_token_ids": _single_placeholder_ids([[1, 6], [7], [8]]), "images": [BIG_IMAGE, IMAGES["28x28"]]},
        [1, 2, 3],
    ]
    graphed = LLM("tiny-vl", device="cuda", num_kv_blocks=128)
    assert graphed.engine.runner.decode_graphs is not None
    eager = LLM("tiny-vl", device="cuda", num_kv_blocks=128, enforce_eager=True)
    assert [o.token_ids for o in graphed.generate(prompts, params)] == [
        o.token_ids for o in eager.generate(prompts, params)
    ]
