"""Tokenizer: lossless byte-level round trips, streaming detokenization, the ERNIE chat template,
and no torch import (the router loads this module)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from engine.tokenizer import TINY_DIR, IncrementalDetokenizer, Tokenizer, TokenizerError

TEXTS = ["Hello, world!", "  leading and trailing spaces  \n\ttabs", "你好，世界！", "emoji 🙂👍🏽 mixed 中文 text", ""]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.tiny()


def test_tiny_vocabulary_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 384
    assert tok.bos_token_id == 1 and tok.eos_token_ids == frozenset({2, 4})
    expected = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<think>", "</think>",
                "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]  # fmt: skip
    assert [tok.token_to_id(t) for t in expected] == list(range(11))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_every_byte_is_a_token(tok: Tokenizer) -> None:
    text = bytes(range(32, 127)).decode() + "\x00\x01\x7f"
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_encode_to_their_ids_and_only_specials_are_skipped(tok: Tokenizer) -> None:
    ids = tok.encode("<|begin_of_sentence|>hi<think>x</think></s>")
    assert ids[0] == 3 and ids[-1] == 2 and 5 in ids and 6 in ids
    assert tok.decode(ids) == "hi<think>x</think>"  # think tags are text the reasoning parser needs
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_sentence|>hi<think>x</think></s>"


def test_ids_outside_the_vocabulary_decode_to_nothing(tok: Tokenizer) -> None:
    assert tok.decode([tok.encode("a")[0], 10_000]) == "a"


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    return [detok.push(i) for i in ids]


@pytest.mark.parametrize("text", TEXTS[:4] + ["a你b好c🙂d"])
def test_incremental_detokenizer_matches_full_decode_at_every_step(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = _stream(tok, ids, prompt=tok.encode("User: hi\nAssistant: "))
    for step in range(1, len(ids) + 1):
        so_far, full = "".join(deltas[:step]), tok.decode(ids[:step])
        assert full.startswith(so_far)
        assert set(full[len(so_far) :]) <= {"\ufffd"}  # only an incomplete character may lag
    assert "".join(deltas) == text


def test_multibyte_character_split_over_tokens_waits_for_its_last_byte(tok: Tokenizer) -> None:
    ids = tok.encode("🙂")
    assert len(ids) == 4  # one token per byte
    assert _stream(tok, ids) == ["", "", "", "🙂"]


def test_incremental_detokenizer_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("ok</s>")
    assert "".join(_stream(tok, ids)) == "ok"
    assert "".join(_stream(tok, ids, skip=False)) == "ok</s>"


def test_invalid_bytes_do_not_stall_the_stream(tok: Tokenizer) -> None:
    lead_byte = tok.encode("你")[0]  # a UTF-8 lead byte; six in a row can never complete
    ids = [lead_byte] * 6 + tok.encode("a")
    deltas = _stream(tok, ids)
    assert deltas[:4] == ["", "", "", "\ufffd" * 4]  # held back at most MAX_PENDING tokens
    assert "".join(deltas) == tok.decode(ids) == "\ufffd" * 6 + "a"


def test_chat_template_basic(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    expected = "<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: Hello!<|end_of_sentence|>User: Bye\nAssistant: "
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected.removesuffix("Assistant: ")
    ids = tok.encode(expected)
    assert ids[0] == 3 and 4 in ids  # the markers are single special tokens


def test_chat_template_thinking_switch(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(messages) == "<|begin_of_sentence|>User: 2+2?\nAssistant: "
    assert tok.apply_chat_template(messages, enable_thinking=True).endswith("Assistant: ")
    no_think = tok.apply_chat_template(messages, enable_thinking=False)
    assert no_think == "<|begin_of_sentence|>User: 2+2?\nAssistant: <think>\n\n</think>\n\n"


def test_chat_template_with_tools(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
    ]
    prompt = tok.apply_chat_template(messages, tools=[WEATHER_TOOL])
    system, _, conversation = prompt.partition("\nUser: ")
    assert system.startswith("<|begin_of_sentence|># Tools")
    assert json.dumps(WEATHER_TOOL) in system
    assert conversation == (
        "Weather in Paris?\n"
        'Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|end_of_sentence|>'
        "User: <tool_response>\nsunny, 21C\n</tool_response>\n"
        "Assistant: "
    )


def test_chat_template_matches_transformers(tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(TINY_DIR))
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "héllo 🙂"}]},
        {"role": "assistant", "content": "hi", "reasoning_content": "think",
         "tool_calls": [{"function": {"name": "f", "arguments": {"x": "ü"}}}]},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2"},
    ]  # fmt: skip
    for kwargs in ({}, {"enable_thinking": False}, {"tools": [WEATHER_TOOL]}):
        ours = tok.apply_chat_template(messages, **kwargs)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert tok.encode(ours) == hf.encode(ours, add_special_tokens=False)


def test_unsupported_role_is_a_clear_error(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="unsupported message role: narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}])


def test_from_dir_reads_named_templates_and_generation_eos(tmp_path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"
    assert loaded.eos_token_ids == frozenset({2, 7})


def test_from_dir_errors(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json or tokenizer\.model"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(TINY_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys; import engine.tokenizer as t; t.Tokenizer.tiny().apply_chat_template([{'role': 'user', "
        "'content': 'x'}]); bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
