"""Regenerate the tiny tokenizer: `python engine/assets/tiny/make_tokenizer.py`.

A byte-level BPE (every byte is a token, so any text round-trips) with 117 merges learned from the
small corpus below, plus ERNIE-style special tokens, 384 ids in all (the `tiny` preset's vocab):

    0 <unk>   1 <s>   2 </s>   3 <|begin_of_sentence|>   4 <|end_of_sentence|>      (special)
    5 <think>   6 </think>   7 <tool_call>   8 </tool_call>   9 <tool_response>   10 </tool_response>
                                       (added, not special: they survive decoding for the parsers)
    11 .. 266  the 256 bytes (GPT-2 byte-to-unicode alphabet)     267 .. 383  merges

Writes tokenizer.json, tokenizer_config.json (with chat_template.jinja embedded) and
generation_config.json (eos = </s> and <|end_of_sentence|>) beside this script.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 384
SPECIAL = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

CORPUS = [
    "User: Hello, who are you?\nAssistant: I am a helpful assistant. How can I help you today?",
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.",
    "Mixture-of-experts models route each token to a few experts; the rest of the network is shared.",
    "Prefill computes the prompt's keys and values; decode generates one token at a time from the cache.",
    "def forward(self, input_ids, positions):\n    return self.model(input_ids, positions)\n",
    "In the beginning there was the word, and the word was with the model, and the model was large.",
    "It is a truth universally acknowledged, that a single token in possession of good context must be in "
    "want of attention.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "The weather in Paris is sunny with a high of 21 degrees. Tomorrow it will rain in the evening.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
]


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL + ADDED,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    if tokenizer.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(f"vocab is {tokenizer.get_vocab_size(with_added_tokens=True)}, wanted {VOCAB_SIZE}")
    return tokenizer


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """The serialised tokenizer, with the think/tool tokens marked not special."""
    data = json.loads(tokenizer.to_str())
    for token in data["added_tokens"]:
        token["special"] = token["content"] in SPECIAL
    return data


def tokenizer_config(chat_template: str) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }


def main() -> None:
    data = tokenizer_json(build())
    (HERE / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    template = (HERE / "chat_template.jinja").read_text()
    config = tokenizer_config(template)
    (HERE / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": [2, 4], "pad_token_id": 0}
    (HERE / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


if __name__ == "__main__":
    main()
