"""What a load test sends: prompt and output lengths drawn from seeded distributions.

Four sources of prompts, all seeded (the same seed gives the same requests, byte for byte):

    random          token-id prompts whose lengths follow an input distribution; output lengths
                    follow an output distribution (sent with ignore_eos, so they are exact)
    sharegpt        a ShareGPT-format JSON file the user gives: the first human turn is the
                    prompt, the first model turn's token count the output length
    shared-prefix   N random prefixes reused by a share of the requests, then a random suffix
                    (exercises the prefix cache and prefix-aware routing)
    multimodal      random prompts plus synthetic PNG images as image_url parts of a chat
                    message, for vision models (ERNIE-4.5-VL, the tiny-vl preset): the
                    openai-chat and grpc backends send them

Length distributions (`LengthDist.parse`): `fixed:N`, `uniform:LO:HI`, `normal:MEAN:STD`,
`lognormal:MEAN:SIGMA` (SIGMA of the underlying normal; MEAN is the mean of the lengths, so
mu = ln(MEAN) - SIGMA²/2). Every draw is rounded and clipped to [1, max].
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

DIST_KINDS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts."""

    kind: str
    a: float
    b: float = 0.0
    max_len: int = 1 << 20

    def __post_init__(self) -> None:
        if self.kind not in DIST_KINDS:
            raise ValueError(f"length distribution must be one of {', '.join(DIST_KINDS)}, got {self.kind!r}")
        if self.a <= 0 or self.b < 0:
            raise ValueError(f"length distribution {self.describe()} needs positive parameters")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"uniform lengths need LO <= HI, got {self.a:g}:{self.b:g}")

    @classmethod
    def parse(cls, text: str | int | dict, max_len: int = 1 << 20) -> LengthDist:
        """`128` or `fixed:128`, `uniform:64:256`, `normal:512:64`, `lognormal:512:0.6`, or a dict
        `{"dist": "lognormal", "mean": 512, "sigma": 0.6}` (keys: value | min, max | mean, std | mean, sigma)."""
        if isinstance(text, dict):
            return cls._from_dict(text, max_len)
        parts = str(text).split(":")
        if len(parts) == 1:
            parts = ["fixed", parts[0]]
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"cannot read length distribution {text!r} (e.g. uniform:64:256)") from None
        expected = 1 if parts[0] == "fixed" else 2
        if len(numbers) != expected:
            raise ValueError(f"length distribution {text!r}: {parts[0]} takes {expected} number(s)")
        return cls(parts[0], numbers[0], numbers[1] if expected == 2 else 0.0, max_len)

    @classmethod
    def _from_dict(cls, spec: dict, max_len: int) -> LengthDist:
        kind = spec.get("dist", "fixed")
        keys = {
            "fixed": ("value",),
            "uniform": ("min", "max"),
            "normal": ("mean", "std"),
            "lognormal": ("mean", "sigma"),
        }
        if kind not in keys:
            raise ValueError(f"length distribution must be one of {', '.join(DIST_KINDS)}, got {kind!r}")
        missing = [k for k in keys[kind] if k not in spec]
        if missing:
            raise ValueError(f"length distribution {spec!r} lacks {', '.join(missing)}")
        values = [float(spec[k]) for k in keys[kind]]
        return cls(kind, values[0], values[1] if len(values) > 1 else 0.0, int(spec.get("max", max_len)))

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            values = np.full(n, self.a)
        elif self.kind == "uniform":
            values = rng.uniform(self.a, self.b + 1, n)  # integers LO..HI inclusive after floor
            values = np.floor(values)
        elif self.kind == "normal":
            values = rng.normal(self.a, self.b, n)
        else:
            values = rng.lognormal(math.log(self.a) - self.b**2 / 2, self.b, n)
        return np.clip(np.rint(values), 1, self.max_len).astype(np.int64)

    @property
    def mean(self) -> float:
        """The mean before clipping (what planning uses)."""
        return {"fixed": self.a, "uniform": (self.a + self.b) / 2, "normal": self.a, "lognormal": self.a}[self.kind]

    def quantile(self, q: float) -> float:
        """The q-quantile before clipping."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return self.a + q * (self.b - self.a)
        z = _normal_quantile(q)
        if self.kind == "normal":
            return max(1.0, self.a + z * self.b)
        return math.exp(math.log(self.a) - self.b**2 / 2 + z * self.b)


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9)."""
    if not 0 < q < 1:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02)
    a += (-3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01)
    b += (-1.328068155288572e01,)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00)
    c += (4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    low = 0.02425
    if q < low or q > 1 - low:
        r = math.sqrt(-2 * math.log(q if q < low else 1 - q))
        x = (((((c[0] * r + c[1]) * r + c[2]) * r + c[3]) * r + c[4]) * r + c[5]) / (
            (((d[0] * r + d[1]) * r + d[2]) * r + d[3]) * r + 1
        )
        return x if q < low else -x
    r = (q - 0.5) ** 2
    num = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * (q - 0.5)
    return num / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload. `prompt` is token ids, text, or chat messages."""

    index: int
    prompt: list[int] | str | list[dict]
    prompt_len: int  # known exactly for token ids; an estimate for text and chat
    max_tokens: int
    images: tuple[str, ...] = ()  # data: URLs (multimodal)
    prefix_group: int = -1  # shared-prefix workloads: which prefix (-1: none)


@dataclass(frozen=True)
class TokenPool:
    """Token ids a random prompt may use: the tokenizer's vocabulary minus its special tokens."""

    ids: tuple[int, ...]

    @classmethod
    def for_model(cls, model: str) -> TokenPool:
        from engine.tokenizer import Tokenizer  # torch-free

        tokenizer = Tokenizer.for_model(model)
        ids = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i], skip_special_tokens=True)]
        return cls(tuple(ids))

    @cached_property
    def array(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=np.int64)

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        return self.array[rng.integers(0, len(self.ids), n)].tolist()


@dataclass(frozen=True)
class WorkloadConfig:
    """How to build a workload; `build_workload` turns it into `RequestSpec`s."""

    kind: str = "random"  # random | sharegpt | shared-prefix | multimodal
    num_requests: int = 100
    input_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 128))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 64))
    seed: int = 0
    dataset_path: str | None = None  # sharegpt
    prompt_format: str = "tokens"  # tokens | text | chat (how prompts are sent)
    num_prefixes: int = 4  # shared-prefix
    prefix_len: int = 256
    prefix_reuse: float = 1.0  # share of requests that start with one of the shared prefixes
    images_per_request: int = 1  # multimodal
    image_size: int = 224
    max_model_len: int | None = None  # drop ShareGPT pairs longer than this

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOAD_KINDS)}, got {self.kind!r}")
        if self.num_requests < 1:
            raise ValueError(f"a workload needs at least one request, got {self.num_requests}")
        if self.prompt_format not in ("tokens", "text", "chat"):
            raise ValueError(f"prompt format must be tokens, text or chat, got {self.prompt_format!r}")
        if not 0 <= self.prefix_reuse <= 1:
            raise ValueError(f"prefix reuse is a share in [0, 1], got {self.prefix_reuse}")
        if self.kind == "sharegpt" and not self.dataset_path:
            raise ValueError("the sharegpt workload needs a dataset path (--dataset-path FILE.json)")


WORKLOAD_KINDS = ("random", "sharegpt", "shared-prefix", "multimodal")


def build_workload(config: WorkloadConfig, model: str = "tiny") -> list[RequestSpec]:
    """The requests of a workload, deterministic in `config.seed`."""
    rng = np.random.default_rng(config.seed)
    if config.kind == "sharegpt":
        return _sharegpt(config, rng, model)
    pool = TokenPool.for_model(model)
    n = config.num_requests
    inputs, outputs = config.input_len.sample(rng, n), config.output_len.sample(rng, n)
    specs = []
    if config.kind == "shared-prefix":
        prefixes = [pool.draw(rng, config.prefix_len) for _ in range(config.num_prefixes)]
        for i in range(n):
            reuse = rng.random() < config.prefix_reuse
            group = int(rng.integers(0, config.num_prefixes)) if reuse else -1
            prefix = prefixes[group] if reuse else pool.draw(rng, config.prefix_len)
            ids = prefix + pool.draw(rng, int(inputs[i]))
            specs.append(_spec(i, ids, int(outputs[i]), config, model, prefix_group=group))
        return specs
    for i in range(n):
        ids = pool.draw(rng, int(inputs[i]))
        images: tuple[str, ...] = ()
        if config.kind == "multimodal":
            images = tuple(_random_png(rng, config.image_size) for _ in range(config.images_per_request))
        specs.append(_spec(i, ids, int(outputs[i]), config, model, images=images))
    return specs


def _spec(index: int, ids: list[int], max_tokens: int, config: WorkloadConfig, model: str, **extra) -> RequestSpec:
    if config.prompt_format == "tokens":
        return RequestSpec(index, ids, len(ids), max_tokens, **extra)
    text = _tokenizer(model).decode(ids)
    prompt: str | list[dict] = text if config.prompt_format == "text" else [{"role": "user", "content": text}]
    return RequestSpec(index, prompt, len(ids), max_tokens, **extra)


def _tokenizer(model: str):
    from engine.tokenizer import Tokenizer

    return Tokenizer.for_model(model)


def _sharegpt(config: WorkloadConfig, rng: np.random.Generator, model: str) -> list[RequestSpec]:
    """ShareGPT JSON: a list of {"conversations": [{"from": "human"|"gpt", "value": text}, ...]}.

    Pairs whose prompt or output is shorter than 4 tokens are dropped, as are pairs longer than
    max_model_len; the rest are shuffled with the seed and cycled if more requests are wanted.
    """
    path = Path(config.dataset_path or "")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read ShareGPT file {str(path)!r}: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"ShareGPT file {str(path)!r} must hold a JSON list of conversations")
    tokenizer = _tokenizer(model)
    pairs: list[tuple[str, int, int]] = []
    for entry in data:
        if not isinstance(entry, dict):
            continue
        turns = entry.get("conversations") or entry.get("conversation") or []
        human = next((t.get("value", "") for t in turns if t.get("from") in ("human", "user")), None)
        answer = next((t.get("value", "") for t in turns if t.get("from") in ("gpt", "assistant", "model")), None)
        if not human or answer is None:
            continue
        prompt_len, output_len = len(tokenizer.encode(human)), len(tokenizer.encode(answer))
        if prompt_len < 4 or output_len < 4:
            continue
        if config.max_model_len and prompt_len + output_len > config.max_model_len:
            continue
        pairs.append((human, prompt_len, output_len))
    if not pairs:
        raise ValueError(f"ShareGPT file {str(path)!r} has no usable human/gpt pair")
    order = rng.permutation(len(pairs))
    specs = []
    for i in range(config.num_requests):
        text, prompt_len, output_len = pairs[int(order[i % len(pairs)])]
        if config.prompt_format == "chat":
            prompt: list[int] | str | list[dict] = [{"role": "user", "content": text}]
        elif config.prompt_format == "tokens":
            prompt = tokenizer.encode(text)
        else:
            prompt = text
        specs.append(RequestSpec(i, prompt, prompt_len, output_len))
    return specs


def _random_png(rng: np.random.Generator, size: int) -> str:
    """A size x size RGB noise image as a PNG data URL (stdlib zlib; no imaging library)."""
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(size))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    out = io.BytesIO()
    out.write(b"\x89PNG\r\n\x1a\n")
    out.write(chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)))
    out.write(chunk(b"IDAT", zlib.compress(raw, 1)))
    out.write(chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def summarize_lengths(specs: Sequence[RequestSpec]) -> dict:
    """Mean / min / max of the prompt and output lengths (for reports)."""
    prompts = np.array([s.prompt_len for s in specs])
    outputs = np.array([s.max_tokens for s in specs])
    return {
        "mean_input_len": float(prompts.mean()),
        "min_input_len": int(prompts.min()),
        "max_input_len": int(prompts.max()),
        "mean_output_len": float(outputs.mean()),
        "min_output_len": int(outputs.min()),
        "max_output_len": int(outputs.max()),
    }
