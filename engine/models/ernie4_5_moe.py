"""ERNIE-4.5 MoE text model over the paged KV cache.

The arithmetic follows transformers' `Ernie4_5_MoeForCausalLM` (the definition of correctness);
the layout follows the engine's needs:

* one flat batch of tokens `[T]` from many sequences, described by `AttentionMetadata`;
* projections are fused where the math allows it (`qkv_proj`, `gate_up_proj`) so a step launches
  fewer GEMMs; `engine.weights` maps Hugging Face keys onto these slices;
* routed experts live in the fused layout `w13 [E, 2I, H]` (gate rows, then up rows) and
  `w2 [E, H, I]`, the layout `fused_moe_ref` and the Triton kernel take;
* the router weight and `e_score_correction_bias` stay float32 whatever the model dtype
  (transformers keeps them in fp32 too);
* the norms (with the residual add fused in: `hidden, residual = norm(hidden, residual)`), RoPE
  with the KV write, attention, routing and the expert computation are called through one
  function attribute each (`ModelBackends`), so kernels can be swapped in without touching this
  file;
* under expert parallelism each MoE layer's whole output comes from one `MoECombine` function
  (`SparseMoE.combine`, set by `engine.parallel.ExpertParallel.attach`), which moves tokens to the
  ranks that hold their experts and sums the partial results; this file knows no process group.

Parameters are allocated uninitialised (`torch.empty`) with torch's current default dtype and
device; fill them with `engine.weights.load_checkpoint` or `engine.presets.init_random_weights`.
Never call `.to(dtype)` on a built model: that would cast the fp32 router too (build it under the
wanted default dtype instead, as `engine.loader` does).

Parameter names (what `state_dict()` holds), per layer `model.layers.{i}.`:

    input_layernorm.weight, post_attention_layernorm.weight       [H]
    self_attn.qkv_proj.weight  [(Hq + 2 Hkv) D, H]  rows: q | k | v  (+ .bias when use_bias)
    self_attn.o_proj.weight    [H, Hq D]                              (+ .bias)
    dense layers: mlp.gate_up_proj.weight [2 I, H] rows: gate | up, mlp.down_proj.weight [H, I]
    MoE layers:   mlp.gate_weight [E, H] fp32, mlp.e_score_correction_bias [E] fp32,
                  mlp.w13 [E_local, 2 I_moe, H], mlp.w2 [E_local, H, I_moe],
                  mlp.shared_experts.{gate_up_proj, down_proj}.weight (width I_moe * num_shared)

plus `model.embed_tokens.weight [V, H]`, `model.norm.weight [H]`, and `lm_head.weight [V, H]`
(only when embeddings are untied) / `lm_head.bias [V]` (only when use_bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import AttentionMetadata, paged_attention_ref
from engine.config import ModelConfig
from engine.kernels.fused_moe_ref import fused_moe_ref, route_ref
from engine.kernels.norm_rope_ref import fused_add_rms_norm_ref, rope_and_write_kv_ref

RouteFn = Callable[..., tuple[Tensor, Tensor]]  # route_ref's signature
ExpertsFn = Callable[..., Tensor]  # fused_moe_ref's signature; expert_offset is passed by keyword
AttentionFn = Callable[[Tensor, Tensor, AttentionMetadata, float], Tensor]  # paged_attention_ref's
# (x, residual | None, weight, eps) -> (normed, x + residual): fused_add_rms_norm_ref's
NormFn = Callable[[Tensor, Tensor | None, Tensor, float], tuple[Tensor, Tensor]]
RopeWriteKVFn = Callable[..., Tensor]  # rope_and_write_kv_ref's signature
# (moe, x [T, H]) -> the whole MoE layer's output [T, H] for x's tokens, summed over every rank's experts
MoECombine = Callable[["SparseMoE", Tensor], Tensor]


@dataclass(frozen=True)
class ModelBackends:
    """The swappable compute functions; the defaults are the plain-torch references."""

    route: RouteFn = route_ref
    experts: ExpertsFn = fused_moe_ref
    attention: AttentionFn = paged_attention_ref
    norm: NormFn = fused_add_rms_norm_ref
    rope_write_kv: RopeWriteKVFn = rope_and_write_kv_ref


def _empty(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype))


class Linear(nn.Module):
    """`y = x @ weight.T + bias` with uninitialised parameters (nn.Linear would spend time on init)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = _empty(out_features, in_features)
        self.bias = _empty(out_features) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled: `weight * (x / rms(x)).to(x.dtype)`;
    `norm_fn` (a `ModelBackends.norm`) computes it, with a residual add fused in front."""

    def __init__(self, hidden_size: int, eps: float, norm_fn: NormFn = fused_add_rms_norm_ref) -> None:
        super().__init__()
        self.weight = _empty(hidden_size)
        self.eps = eps
        self.norm_fn = norm_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_fn(x, None, self.weight, self.eps)[0]

    def add_and_norm(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual); with residual None, (norm(x), x)."""
        return self.norm_fn(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """Inverse frequencies [D/2], fp32, computed as transformers does (bit-identical)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 (cos, sin) [T, 1, D/2] of angle positions * inv_freq, shared by every layer of a step."""
    angles = positions.float()[:, None] * inv_freq  # [T, D/2]
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


class Attention(nn.Module):
    """GQA self-attention over the paged cache: project, rotate, write K/V, attend, project out."""

    def __init__(self, config: ModelConfig, backends: ModelBackends) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, config.use_bias)
        self.o_proj = Linear(q_size, config.hidden_size, config.use_bias)
        self.attention_fn = backends.attention
        self.rope_write_kv_fn = backends.rope_write_kv

    def forward(self, hidden: Tensor, meta: AttentionMetadata, kv_layer: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """rope: the step's fp32 (cos, sin) [T, 1, D/2] (`rope_cos_sin`)."""
        cos, sin = rope
        q = self.rope_write_kv_fn(
            self.qkv_proj(hidden),
            cos,
            sin,
            kv_layer,
            meta.slot_mapping,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        out = self.attention_fn(q, kv_layer, meta, self.scale)
        return self.o_proj(out.flatten(-2))


class MLP(nn.Module):
    """SiLU-gated MLP: `down(silu(gate(x)) * up(x))`, gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    """Routed experts (top-k of `moe_num_experts`) plus unweighted shared experts.

    Holds experts `[expert_offset, expert_offset + num_local_experts)` only; the router always
    sees all experts. With fewer than all experts local, `routed(x)` is this rank's partial sum;
    expert parallelism sums `routed` over ranks and adds `shared_experts(x)` once. That is what
    `combine` does when set (`engine.parallel`); without it `forward` is `routed + shared`, the
    whole answer only when all experts are local.
    """

    def __init__(
        self,
        config: ModelConfig,
        backends: ModelBackends,
        expert_range: tuple[int, int] | None = None,
        *,
        intermediate_size: int | None = None,
        num_shared_experts: int | None = None,
    ) -> None:
        """`intermediate_size` / `num_shared_experts` override the config's (the VL model builds its
        vision pool with the vision width and its two pools without shared experts of their own)."""
        super().__init__()
        start, end = expert_range if expert_range is not None else (0, config.moe_num_experts)
        self.num_experts = config.moe_num_experts
        self.expert_offset = start
        self.num_local_experts = end - start
        self.top_k = config.moe_k
        self.norm_min = config.moe_norm_min
        hidden = config.hidden_size
        inter = config.moe_intermediate_size if intermediate_size is None else intermediate_size
        num_shared = config.moe_num_shared_experts if num_shared_experts is None else num_shared_experts
        self.gate_weight = _empty(self.num_experts, hidden, dtype=torch.float32)
        self.e_score_correction_bias = _empty(self.num_experts, dtype=torch.float32)
        self.w13 = _empty(self.num_local_experts, 2 * inter, hidden)
        self.w2 = _empty(self.num_local_experts, hidden, inter)
        self.shared_experts = MLP(hidden, inter * num_shared, config.use_bias) if num_shared > 0 else None
        self.route_fn = backends.route
        self.experts_fn = backends.experts
        self.combine: MoECombine | None = None
        # Set by engine.cuda_graph.MoEGraphs: this layer's output from a CUDA graph, or None when
        # the step cannot replay one (then the layer runs eagerly).
        self.graphed: Callable[[Tensor], Tensor | None] | None = None
        # Tokens routed to each expert since start (for expert-load metrics). Updated on device with
        # a scatter-add (no host sync); read only when metrics are scraped.
        self.register_buffer("routed_token_counts", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.combine is not None:
            return self.combine(self, x)
        if self.graphed is not None and (out := self.graphed(x)) is not None:
            return out
        return self.forward_local(x)

    def forward_local(self, x: Tensor) -> Tensor:
        """`routed + shared`, eagerly (what `forward` computes without expert parallelism)."""
        out = self.routed(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def routed(self, x: Tensor) -> Tensor:
        """Weighted sum over each token's top-k experts that this module holds. [T, H] -> [T, H]."""
        return self.experts(x, *self.route(x))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(topk_weights [T, k] in x's dtype, topk_ids [T, k] global expert ids) over all experts."""
        topk_weights, topk_ids = self.route_fn(
            x, self.gate_weight, self.e_score_correction_bias, self.top_k, self.norm_min
        )
        ids = topk_ids.reshape(-1)
        self.routed_token_counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.long))
        return topk_weights, topk_ids

    def experts(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        """Weighted sum over the (token, slot) pairs whose expert this module holds; others add nothing."""
        return self.experts_fn(x, self.w13, self.w2, topk_weights, topk_ids, expert_offset=self.expert_offset)


class DecoderLayer(nn.Module):
    """Pre-norm block: `h += attn(norm(h)); h += mlp(norm(h))`, with each residual add fused into
    the norm after it: a layer takes (the previous layer's mlp output, the residual before it) and
    returns the same pair, so its first norm adds them (the first layer gets residual None)."""

    def __init__(
        self, config: ModelConfig, layer_idx: int, backends: ModelBackends, expert_range: tuple[int, int] | None
    ) -> None:
        super().__init__()
        self.self_attn = Attention(config, backends)
        self.mlp = self.make_mlp(config, layer_idx, backends, expert_range)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends.norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends.norm)

    def make_mlp(
        self, config: ModelConfig, layer_idx: int, backends: ModelBackends, expert_range: tuple[int, int] | None
    ) -> nn.Module:
        """The feed-forward block: routed experts on MoE layers, a dense MLP elsewhere (a hook the
        VL model overrides)."""
        if config.is_moe_layer(layer_idx):
            return SparseMoE(config, backends, expert_range)
        return MLP(config.hidden_size, config.intermediate_size, config.use_bias)

    def forward(
        self,
        hidden: Tensor,
        residual: Tensor | None,
        meta: AttentionMetadata,
        kv_layer: Tensor,
        rope: tuple[Tensor, Tensor],
        *feed_forward_args: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """(mlp output, residual) -> (this layer's mlp output, the residual it was added to).
        `feed_forward_args` go to `feed_forward` (the VL layer's vision mask)."""
        normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        attn_out = self.self_attn(normed, meta, kv_layer, rope)
        normed, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
        return self.feed_forward(normed, *feed_forward_args), residual

    def feed_forward(self, normed: Tensor) -> Tensor:
        """The feed-forward block on the post-attention-normed rows (a hook the VL model overrides)."""
        return self.mlp(normed)


class Ernie4_5_MoeModel(nn.Module):
    """Embedding, decoder layers and the final norm (transformers' `model.` prefix)."""

    decoder_layer_cls: ClassVar[type[DecoderLayer]] = DecoderLayer  # the VL model's layers extend it

    def __init__(
        self, config: ModelConfig, backends: ModelBackends, expert_range: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        embedding = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(
            self.decoder_layer_cls(config, i, backends, expert_range) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends.norm)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)

    def forward(self, input_ids: Tensor, meta: AttentionMetadata, kv_cache: Tensor) -> Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        rope = rope_cos_sin(meta.positions, self.inv_freq)
        for layer_idx, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, meta, kv_cache[layer_idx], rope)
        return self.norm.add_and_norm(hidden, residual)[0]

    def norms(self) -> list[RMSNorm]:
        """The decoder's RMSNorms (each layer's two, then the final one): what `ModelBackends.norm` runs."""
        layer_norms = [
            norm for layer in self.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)
        ]
        return [*layer_norms, self.norm]


class LMHead(nn.Module):
    """Projection to the vocabulary. Owns a weight only when embeddings are untied."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = None if config.tie_word_embeddings else _empty(config.vocab_size, config.hidden_size)
        self.bias = _empty(config.vocab_size) if config.use_bias else None

    def forward(self, hidden: Tensor, tied_weight: Tensor) -> Tensor:
        weight = tied_weight if self.weight is None else self.weight
        return F.linear(hidden, weight, self.bias)


def _check_expert_range(config: ModelConfig, expert_range: tuple[int, int] | None) -> None:
    if expert_range is None:
        return
    start, end = expert_range
    if not 0 <= start < end <= config.moe_num_experts:
        raise ValueError(f"expert_range {expert_range!r} must satisfy 0 <= start < end <= {config.moe_num_experts}")


class Ernie4_5_MoeForCausalLM(nn.Module):
    """The ERNIE-4.5 MoE causal LM over a flat token batch and a paged KV cache.

    `expert_range=(start, end)` builds MoE layers that hold only those experts (expert
    parallelism); `backends` picks the compute functions (default: the torch references).
    """

    # A decode step's forward depends only on tensors (token ids, positions, slots, block tables,
    # sequence lengths), so it can be captured and replayed as a CUDA graph (engine.cuda_graph).
    supports_decode_graphs: ClassVar[bool] = True
    model_cls: ClassVar[type[Ernie4_5_MoeModel]] = Ernie4_5_MoeModel  # the VL model's extends it

    def __init__(
        self,
        config: ModelConfig,
        *,
        expert_range: tuple[int, int] | None = None,
        backends: ModelBackends | None = None,
    ) -> None:
        super().__init__()
        _check_expert_range(config, expert_range)
        self.config = config
        self.expert_range = expert_range or (0, config.moe_num_experts)
        self.backends = backends or ModelBackends()
        self.model = self.model_cls(config, self.backends, expert_range)
        self.lm_head = LMHead(config)

    def forward(self, input_ids: Tensor, meta: AttentionMetadata, kv_cache: Tensor) -> Tensor:
        """Run one step. input_ids [T] int64 (flat over sequences); kv_cache [L, 2, N, B, Hkv, D].

        Writes each layer's new K/V into `kv_cache` at `meta.slot_mapping` (side effect), attends
        causally over each sequence's cached keys, and returns the final-RMSNorm'd hidden states
        [T, H] in the model dtype. Call `compute_logits` on the rows you need.
        """
        self.check_kv_cache(kv_cache)
        return self.model(input_ids, meta, kv_cache)

    def check_kv_cache(self, kv_cache: Tensor) -> None:
        """Raise ValueError unless kv_cache is [L, 2, N, B, Hkv, D] for this model's L layers."""
        expected = self.config.num_hidden_layers
        if kv_cache.dim() != 6 or kv_cache.shape[0] != expected or kv_cache.shape[1] != 2:
            raise ValueError(f"kv_cache must be [L={expected}, 2, N, B, Hkv, D], got {tuple(kv_cache.shape)}")

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[n, H] -> [n, V] float32 logits (the matmul runs in the model dtype, as transformers does)."""
        return self.lm_head(hidden, self.model.embed_tokens.weight).float()

    def moe_layers(self) -> list[SparseMoE]:
        """The MoE modules, in layer order (a VL layer's text pool, then its vision pool)."""
        return [module for module in self.model.layers.modules() if isinstance(module, SparseMoE)]

    def set_moe_combine(self, combine: MoECombine | None) -> None:
        """Route every MoE layer through `combine` (expert parallelism), or back to local-only with None."""
        for moe in self.moe_layers():
            moe.combine = combine

    def set_backends(self, backends: ModelBackends) -> None:
        """Point every layer at new compute functions (e.g. the Triton kernels once loaded)."""
        self.backends = backends
        for layer in self.model.layers:
            layer.self_attn.attention_fn = backends.attention
            layer.self_attn.rope_write_kv_fn = backends.rope_write_kv
        for norm in self.model.norms():
            norm.norm_fn = backends.norm
        for moe in self.moe_layers():
            moe.route_fn = backends.route
            moe.experts_fn = backends.experts
