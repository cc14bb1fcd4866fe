"""The tiny-vl tokenizer (engine/assets/tiny-vl): tiny's ids plus ERNIE-4.5-VL's media tokens,
and its chat template: image parts numbered across the conversation, thinking on / off, tools."""

from __future__ import annotations

import json
import runpy

import pytest

from engine.tokenizer import TINY_VL_DIR, Tokenizer, model_dir

MEDIA = {
    "image_start_token": ("<|IMAGE_START|>", 378),
    "image_end_token": ("<|IMAGE_END|>", 379),
    "image_token": ("<|IMAGE_PLACEHOLDER|>", 380),
    "video_start_token": ("<|VIDEO_START|>", 381),
    "video_end_token": ("<|VIDEO_END|>", 382),
    "video_token": ("<|VIDEO_PLACEHOLDER|>", 383),
}
IMAGE = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.for_model("tiny-vl")


def test_vl_presets_pick_the_tiny_vl_tokenizer_and_text_presets_keep_tiny() -> None:
    assert model_dir("tiny-vl") == model_dir("ernie-4.5-vl-28b-a3b") == TINY_VL_DIR
    assert Tokenizer.for_model("ernie-4.5-vl-28b-a3b").special_token_id("image_token") == 380
    assert Tokenizer.for_model("tiny").special_token_id("image_token") is None


def test_media_tokens_take_the_last_ids_and_the_rest_are_tiny_s(tok: Tokenizer) -> None:
    tiny = Tokenizer.tiny()
    assert tok.vocab_size == tiny.vocab_size == 384
    for name, (text, token_id) in MEDIA.items():
        assert tok.token_to_id(text) == token_id and tok.special_token_id(name) == token_id
        assert tok.decode([token_id]) == "" and tok.decode([token_id], skip_special_tokens=False) == text
    for token_id in range(378):
        assert tok.decode([token_id], skip_special_tokens=False) == tiny.decode([token_id], skip_special_tokens=False)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == frozenset({2, 4})
    text = "User: Picture 1:" + IMAGE + "What is the weather in Paris?"
    ids = tok.encode(text)
    assert ids.count(380) == 1 and tok.decode(ids, skip_special_tokens=False) == text


def test_committed_files_are_what_make_tokenizer_writes() -> None:
    script = runpy.run_path(str(TINY_VL_DIR / "make_tokenizer.py"))
    assert json.loads((TINY_VL_DIR / "tokenizer.json").read_text()) == script["tokenizer_json"]()
    template = (TINY_VL_DIR / "chat_template.jinja").read_text()
    assert json.loads((TINY_VL_DIR / "tokenizer_config.json").read_text()) == script["tokenizer_config"](template)


def test_images_are_numbered_across_the_conversation_where_they_stand(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And"}, {"type": "image_url"}]},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": ["Now ", {"type": "image"}, {"type": "text", "text": " this?"}]},
    ]
    assert tok.apply_chat_template(messages) == (
        "<|begin_of_sentence|>Be brief.\n"
        f"User: Picture 1:{IMAGE}AndPicture 2:{IMAGE}\n"
        "Assistant: Two cats.<|end_of_sentence|>"
        f"User: Now Picture 3:{IMAGE} this?\n"
        "Assistant: "
    )
    video = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])
    assert "Video 1:<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>" in video


def test_thinking_switch_and_tools_render_as_in_the_text_template(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "2+2?"}]}]
    head = f"<|begin_of_sentence|>User: Picture 1:{IMAGE}2+2?\nAssistant: "
    assert tok.apply_chat_template(messages) == head
    assert tok.apply_chat_template(messages, enable_thinking=True) == head
    assert tok.apply_chat_template(messages, enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        *messages,
        {"role": "assistant", "content": None, "reasoning_content": "look", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    prompt = tok.apply_chat_template(history, tools=[WEATHER_TOOL])
    text_prompt = Tokenizer.tiny().apply_chat_template(
        [{"role": "user", "content": f"Picture 1:{IMAGE}2+2?"}, *history[1:]], tools=[WEATHER_TOOL]
    )
    assert prompt == text_prompt  # the same layout as the text template, image aside
    assert '<think>\nlook\n</think>\n\n<tool_call>{"name": "get_weather"' in prompt


def test_chat_template_matches_transformers(tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(TINY_VL_DIR))
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "héllo 🙂"}]},
        {"role": "assistant", "content": "hi", "reasoning_content": "think"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image"}]},
    ]
    for kwargs in ({}, {"enable_thinking": False}, {"tools": [WEATHER_TOOL]}):
        ours = tok.apply_chat_template(messages, **kwargs)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert tok.encode(ours) == hf.encode(ours, add_special_tokens=False)
