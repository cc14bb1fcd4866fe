"""Tokenizer, chat template and streaming detokenizer. Torch-free: the router imports this.

`Tokenizer` wraps a `tokenizers.Tokenizer` read from a Hugging Face folder's `tokenizer.json`,
with the special tokens and chat template of `tokenizer_config.json` (a `chat_template.jinja`
file wins over the config's `chat_template`, as in transformers). End-of-sequence ids are the
config's `eos_token` plus `generation_config.json`'s `eos_token_id` (an int or a list).

Folders that ship only a sentencepiece `tokenizer.model` are converted through transformers,
imported lazily, only then (that path may import torch).

Chat templates render as transformers renders them (sandboxed Jinja, `trim_blocks`,
`lstrip_blocks`, `loopcontrols`, a `tojson` that keeps non-ASCII text, `raise_exception`,
`strftime_now`), so a model's own template gives the same prompt here and there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _BackendTokenizer

from engine.config import PRESET_NAMES

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
# The tiny tokenizer plus ERNIE-4.5-VL's image / video tokens (engine/assets/tiny-vl/make_tokenizer.py).
TINY_VL_DIR = TINY_DIR.parent / "tiny-vl"
# Presets that see images use the tiny-vl tokenizer; every other preset uses the tiny one.
VL_PRESET_NAMES = ("tiny-vl", "ernie-4.5-vl-28b-a3b")
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")


class TokenizerError(ValueError):
    """A tokenizer folder or chat template cannot be used; the message names the path or value."""


class Tokenizer:
    """Text <-> token ids, and chat messages -> prompt text. Immutable after construction; thread-safe."""

    def __init__(
        self,
        backend: _BackendTokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        self._backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = self._token_id(self.special_tokens.get("bos_token"))
        eos = self._token_id(self.special_tokens.get("eos_token"))
        self.eos_token_ids: frozenset[int] = frozenset(([] if eos is None else [eos]) + list(extra_eos_token_ids))

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face model or tokenizer folder (see the module doc)."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {str(path)!r} does not exist")
        config = _read_json(folder / "tokenizer_config.json")
        backend = _load_backend(folder)
        special = {name: token for name in _SPECIAL_TOKEN_NAMES if (token := _token_text(config.get(name)))}
        extra = config.get("extra_special_tokens")  # {"image_token": "<|IMAGE_PLACEHOLDER|>", ...}
        if isinstance(extra, dict):
            special.update({name: token for name, value in extra.items() if (token := _token_text(value))})
        return cls(backend, special, _chat_template(folder, config), _generation_eos_ids(folder))

    @classmethod
    def tiny(cls) -> Tokenizer:
        """The committed byte-level tokenizer of the `tiny` preset (engine/assets/tiny)."""
        return cls.from_dir(TINY_DIR)

    @classmethod
    def for_model(cls, model: str) -> Tokenizer:
        """The tokenizer of a model folder, or of a random-weight preset (tiny, or tiny-vl for
        the presets that see images: `model_dir`).

        Torch-free, so the router can call it without loading the model.
        """
        return cls.from_dir(model_dir(model))

    def special_token_id(self, name: str) -> int | None:
        """Id of a named special token (`"image_token"`, `"eos_token"`, ...), None if it has none."""
        return self._token_id(self.special_tokens.get(name))

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text in `text` maps to its id. `add_special_tokens`
        applies tokenizer.json's post-processor (e.g. a BOS), if it has one."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render chat `messages` (OpenAI-style dicts) to prompt text with the model's template.

        Extra keyword arguments reach the template as variables (`tools=[...]`,
        `enable_thinking=False`, ...). Raises TokenizerError when there is no template or the
        template rejects the messages.
        """
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (none in tokenizer_config.json)")
        context = {**self.special_tokens, **kwargs}
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        return _template_environment().from_string(self.chat_template or "")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, correct across multi-byte UTF-8 splits.

    Keeps a short window of ids: text is emitted only once it no longer ends in an incomplete
    character (U+FFFD at the end of the window's decode). A replacement character that persists
    for `MAX_PENDING` tokens is genuine (invalid bytes) and is emitted. The concatenation of all
    deltas equals `tokenizer.decode(generated ids)` once the stream ends on a complete character.
    """

    MAX_PENDING = 4  # a UTF-8 character spans at most 4 bytes, hence at most 4 tokens
    CONTEXT = 5  # prompt tokens kept as left context (decoders that strip a leading space need it)

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)[-self.CONTEXT :]
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = len(self.ids)  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ('' while a character is incomplete)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        incomplete = full_text.endswith("\ufffd") and len(self.ids) - self.read_offset < self.MAX_PENDING
        if incomplete:
            return ""
        if len(full_text) <= len(prefix_text):  # e.g. a skipped special token: consumed, no text
            self.read_offset = len(self.ids)
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


# ---------------------------------------------------------------------------------------------
# Folder reading
# ---------------------------------------------------------------------------------------------


def model_dir(model: str) -> Path:
    """The folder holding a model's tokenizer and processor files: the model folder itself, or a
    preset's committed assets (engine/assets/tiny-vl for the presets that see images, else tiny)."""
    if Path(model).is_dir():
        return Path(model)
    if model in VL_PRESET_NAMES:
        return TINY_VL_DIR
    if model in PRESET_NAMES:
        return TINY_DIR
    names = ", ".join(dict.fromkeys((*PRESET_NAMES, *VL_PRESET_NAMES)))
    raise TokenizerError(f"model {model!r} is neither a preset ({names}) nor an existing model folder")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"malformed {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    return None


def _load_backend(folder: Path) -> _BackendTokenizer:
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            return _BackendTokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"cannot read {tokenizer_json}: {exc}") from exc
    if (folder / "tokenizer.model").is_file():
        return _convert_sentencepiece(folder)
    raise TokenizerError(f"no tokenizer.json or tokenizer.model in {str(folder)!r}")


def _convert_sentencepiece(folder: Path) -> _BackendTokenizer:
    """Fallback for sentencepiece-only folders: let transformers build the fast tokenizer."""
    try:
        from transformers import AutoTokenizer  # lazy: heavy, and may import torch
    except ImportError as exc:
        raise TokenizerError(f"{folder} has only tokenizer.model; converting it needs transformers") from exc
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return hf_tokenizer.backend_tokenizer
    except Exception as exc:  # transformers raises many types here
        raise TokenizerError(f"cannot convert {folder / 'tokenizer.model'}: {exc}") from exc


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"chat_template in {folder / 'tokenizer_config.json'} is not a string")
    return template


def _generation_eos_ids(folder: Path) -> list[int]:
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    values = eos if isinstance(eos, list) else [eos]
    return [value for value in values if isinstance(value, int) and not isinstance(value, bool)]


# ---------------------------------------------------------------------------------------------
# Jinja environment (what transformers gives chat templates)
# ---------------------------------------------------------------------------------------------


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
