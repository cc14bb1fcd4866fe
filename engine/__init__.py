"""The model runtime one worker hosts.

`from engine import LLM, SamplingParams` is the offline API. The package imports lazily so that
torch-free parts (scheduler, block manager, tokenizer, configs) can be imported by processes that
never load torch, such as the router.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm import LLM, CompletionOutput
    from engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "CompletionOutput"):
        from engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
