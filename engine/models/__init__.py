"""Model definitions. `Ernie4_5_MoeForCausalLM` is the ERNIE-4.5 MoE text model."""

from __future__ import annotations

from engine.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM, ModelBackends, SparseMoE

__all__ = ["Ernie4_5_MoeForCausalLM", "ModelBackends", "SparseMoE"]
