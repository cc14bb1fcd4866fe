"""Regenerate the tiny-vl tokenizer: `python engine/assets/tiny-vl/make_tokenizer.py`.

The `tiny` byte-level tokenizer (engine/assets/tiny) with its last six merges given up for
ERNIE-4.5-VL's image and video tokens, so the vocabulary stays at the tiny presets' 384 ids:

    0 .. 377   as in tiny (specials, think/tool tokens, the 256 bytes, the first 111 merges)
    378 <|IMAGE_START|>   379 <|IMAGE_END|>   380 <|IMAGE_PLACEHOLDER|>
    381 <|VIDEO_START|>   382 <|VIDEO_END|>   383 <|VIDEO_PLACEHOLDER|>       (special)

Text encodes as in tiny except where one of the six dropped merges (" fox", " position",
"Paris", "eather", "ssistant", "。") would apply. Writes tokenizer.json, tokenizer_config.json
(chat_template.jinja embedded; the media tokens named under `extra_special_tokens`, as
transformers' multimodal tokenizers name them) and generation_config.json beside this script.
The image geometry (patch and merge sizes, min / max pixels) is preprocessor_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "tiny"
VOCAB_SIZE = 384
MEDIA_TOKENS = {
    "image_start_token": "<|IMAGE_START|>",
    "image_end_token": "<|IMAGE_END|>",
    "image_token": "<|IMAGE_PLACEHOLDER|>",
    "video_start_token": "<|VIDEO_START|>",
    "video_end_token": "<|VIDEO_END|>",
    "video_token": "<|VIDEO_PLACEHOLDER|>",
}


def tokenizer_json() -> dict:
    data = json.loads((TINY / "tokenizer.json").read_text())
    model = data["model"]
    num_media = len(MEDIA_TOKENS)
    first_id = VOCAB_SIZE - num_media
    by_id = {token_id: token for token, token_id in model["vocab"].items()}
    model["merges"] = model["merges"][:-num_media]
    for token_id in range(first_id, VOCAB_SIZE):
        del model["vocab"][by_id[token_id]]
    for offset, token in enumerate(MEDIA_TOKENS.values()):
        model["vocab"][token] = first_id + offset
        data["added_tokens"].append(
            {
                "id": first_id + offset,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    return data


def tokenizer_config(chat_template: str) -> dict:
    config = json.loads((TINY / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = dict(MEDIA_TOKENS)
    config["chat_template"] = chat_template
    return config


def main() -> None:
    data = tokenizer_json()
    (HERE / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    config = tokenizer_config((HERE / "chat_template.jinja").read_text())
    (HERE / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    (HERE / "generation_config.json").write_text((TINY / "generation_config.json").read_text())


if __name__ == "__main__":
    main()
