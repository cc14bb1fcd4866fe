"""One engine: a model, its KV pool, a scheduler, and the step loop.

    step() = schedule → execute → update

Roles (prefill, decode, mixed) wrap this loop: they add requests, poll transfers and stream
outputs; they never add branches inside `step()`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from engine.backends import model_backends
from engine.block_manager import BlockManager, BlockStats, KVAllocation
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.cuda_graph import DecodeGraphs, MoEGraphs
from engine.kv_cache import KVCacheSpec, allocate_kv_cache, plan_num_blocks
from engine.loader import LoadedModel, load_model
from engine.mm_inputs import MultiModalInputError, MultiModalInputs
from engine.model_runner import ModelRunner, warm_up_token_counts
from engine.multimodal import MultiModalItem, VisionGeometry, check_items, num_placeholder_tokens
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import RequestOutput, SampledToken, Scheduler

if TYPE_CHECKING:
    from engine.parallel import ExpertParallel

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _uses_decode_graphs(
    config: EngineConfig, loaded: LoadedModel, device: torch.device, expert_parallel: ExpertParallel | None
) -> bool:
    """CUDA-graph decode needs CUDA, the Triton backends (the torch references synchronise with
    the host), a model whose decode forward is capturable, and no expert parallelism (its
    collectives run eagerly)."""
    return (
        device.type == "cuda"
        and not config.enforce_eager
        and config.moe_backend != "torch"
        and expert_parallel is None
        and type(loaded.model).supports_decode_graphs
    )


def _warms_up(loaded: LoadedModel, device: torch.device, expert_parallel: ExpertParallel | None) -> bool:
    """Whether the engine compiles its kernels before serving (`ModelRunner.warm_up`): on CUDA, for
    text models on one device. An expert-parallel forward needs every rank in step, and the VL
    model's positions come from its vision inputs; both compile on their first steps instead."""
    return device.type == "cuda" and expert_parallel is None and not loaded.config.is_multimodal


class InvalidRequestError(ValueError):
    """A request the engine can never serve (empty prompt, too long, unknown token ids...)."""


@dataclass(frozen=True)
class RuntimeInfo:
    """Facts found at start-up, passed explicitly to whoever needs them."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int
    kv_spec: KVCacheSpec
    model_id: str
    model_hash: str
    vision_geometry: VisionGeometry | None = None  # how this worker turns images into patch grids (VL models)


class LLMEngine:
    """Not thread-safe: one thread calls add_request / abort / step (roles funnel work to it).

    With `expert_parallel` every rank of the group builds an engine (collectively; the model holds
    that rank's experts); rank 0 steps it, the others run `follower_loop(engine.runner)`
    (see engine.parallel).
    """

    def bind_device(self) -> None:
        """Make this engine's GPU the calling thread's current device (a no-op on CPU).

        Call it on every thread that runs the model: CUDA's current device is per thread, and
        Triton launches and CUDA-graph captures go to the current device, not the tensors' one
        (a worker on `cuda:1` whose loop thread was left on `cuda:0` fails its captures).
        """
        device = torch.device(self.config.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)

    def __init__(
        self, config: EngineConfig, loaded: LoadedModel, expert_parallel: ExpertParallel | None = None
    ) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        model_cfg = loaded.config
        device = torch.device(config.device)
        self.bind_device()
        loaded.model.set_backends(model_backends(config.moe_backend, device))
        dtype = next(loaded.model.parameters()).dtype
        num_blocks = plan_num_blocks(model_cfg, config.cache, dtype, device)
        if expert_parallel is not None:
            num_blocks = expert_parallel.join_engine(loaded.model, num_blocks)
        spec = KVCacheSpec(
            num_layers=model_cfg.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=config.cache.block_size,
            num_kv_heads=model_cfg.num_key_value_heads,
            head_dim=model_cfg.head_dim,
            dtype=dtype,
        )
        use_graphs = _uses_decode_graphs(config, loaded, device, expert_parallel)
        warm_up = _warms_up(loaded, device, expert_parallel)
        # Under CUDA graphs, or to warm up, the pool holds one block more than the block manager
        # hands out: the scratch block that padded graph rows and warm-up forwards write into.
        scratch = use_graphs or warm_up
        self.kv_cache = allocate_kv_cache(replace(spec, num_blocks=num_blocks + int(scratch)), device)
        self.block_manager = BlockManager(num_blocks, spec.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, config.max_model_len)
        multimodal = (
            MultiModalInputs(loaded.model, loaded.preprocessor_config, device) if model_cfg.is_multimodal else None
        )
        self.runner = ModelRunner(
            loaded.model,
            self.kv_cache,
            spec.block_size,
            seed=config.seed,
            expert_parallel=expert_parallel,
            multimodal=multimodal,
        )
        if warm_up:
            self.runner.warm_up(warm_up_token_counts(config.scheduler.largest_step_tokens), num_blocks)
            from engine.kernels.paged_attention import paged_attention, warm_up_decode_attention

            if loaded.model.backends.attention is paged_attention:
                warm_up_decode_attention(
                    self.kv_cache[0],
                    model_cfg.num_attention_heads,
                    -(-config.max_model_len // spec.block_size),
                    num_blocks,
                )
        if use_graphs:
            graphs = DecodeGraphs(
                loaded.model,
                self.kv_cache,
                spec.block_size,
                scratch_block=num_blocks,
                max_batch=min(config.scheduler.max_num_seqs, config.cuda_graph_max_batch),
                max_blocks_per_seq=-(-config.max_model_len // spec.block_size),
            )
            graphs.capture()
            self.runner.decode_graphs = graphs
            moe_tokens = min(config.moe_graph_max_tokens, config.scheduler.largest_step_tokens)
            moes = loaded.model.moe_layers()
            if moe_tokens > 0 and moes and not model_cfg.is_multimodal:  # VL pools are called per modality
                MoEGraphs(moes, model_cfg.hidden_size, dtype, device, moe_tokens).capture()
        self.runtime = RuntimeInfo(
            num_kv_blocks=num_blocks,
            block_size=spec.block_size,
            max_model_len=config.max_model_len,
            eos_token_ids=frozenset(model_cfg.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids),
            vocab_size=model_cfg.vocab_size,
            kv_spec=spec,
            model_id=loaded.model_id,
            model_hash=loaded.model_hash,
            vision_geometry=None if multimodal is None else multimodal.preprocess.geometry,
        )
        self.requests: dict[str, Request] = {}

    @classmethod
    def from_model(
        cls,
        model: str = "tiny",
        *,
        device: str = "cpu",
        dtype: str | None = None,
        seed: int = 0,
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        expert_parallel: ExpertParallel | None = None,
        moe_backend: str = "auto",
        enforce_eager: bool = False,
    ) -> LLMEngine:
        expert_range = None if expert_parallel is None else expert_parallel.expert_range
        loaded = load_model(model, device=device, dtype=dtype, seed=seed, expert_range=expert_range)
        config = EngineConfig(
            model=loaded.config,
            cache=cache or CacheConfig(),
            scheduler=scheduler or SchedulerConfig(max_model_len=min(loaded.config.max_position_embeddings, 8192)),
            device=device,
            seed=seed,
            moe_backend=moe_backend,
            enforce_eager=enforce_eager,
        )
        return cls(config, loaded, expert_parallel)

    # ----------------------------------------------------------------------------- requests
    def make_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        output_token_ids: Sequence[int] = (),
        mm_items: Sequence[MultiModalItem] = (),
    ) -> Request:
        """Validate and build a request (not yet scheduled). Raises InvalidRequestError.

        `output_token_ids` continues a request another worker started (they count towards
        `max_tokens`; the next token is drawn as the n-th, so seeded sampling carries on exactly).
        `mm_items` are the prompt's images (VL models), each covering its run of placeholder tokens
        (`engine.multimodal.expand_placeholders`); a decode worker may get them without `data`.
        """
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        ids, outputs = list(prompt_token_ids), list(output_token_ids)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.runtime.vocab_size
        bad = [t for t in ids + outputs if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids outside the vocabulary [0, {vocab}): {bad[:8]}")
        max_len = self.runtime.max_model_len
        if len(ids) + len(outputs) >= max_len:
            raise InvalidRequestError(
                f"prompt has {len(ids) + len(outputs)} tokens but the context holds {max_len} "
                "(room for at least one output token)"
            )
        if self.block_manager.num_blocks_for(len(ids) + len(outputs) + 1) > self.runtime.num_kv_blocks:
            raise InvalidRequestError(
                f"prompt of {len(ids)} tokens needs more KV blocks than the pool has ({self.runtime.num_kv_blocks})"
            )
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if len(outputs) >= params.max_tokens:
            raise InvalidRequestError(f"{len(outputs)} output tokens given but max_tokens is {params.max_tokens}")
        self._check_images(ids, tuple(mm_items))
        request = Request(request_id, ids, params, eos_token_ids=self.runtime.eos_token_ids, mm_items=tuple(mm_items))
        request.output_token_ids.extend(outputs)
        return request

    def _check_images(self, prompt: list[int], items: tuple[MultiModalItem, ...]) -> None:
        """Images need a VL model, placeholders where the items say and nowhere else, and grids
        that make as many placeholders as they cover."""
        model = self.loaded.config
        if model.vision is None:
            if items:
                raise InvalidRequestError(f"model {self.runtime.model_id!r} does not accept images")
            return
        try:
            check_items(items, len(prompt))
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        for index, item in enumerate(items):
            expected = num_placeholder_tokens(item.grid_thw, model.vision.spatial_merge_size)
            if item.num_tokens != expected:
                raise InvalidRequestError(
                    f"image {index}: grid {tuple(item.grid_thw)} makes {expected} placeholder tokens, "
                    f"not {item.num_tokens}"
                )
        if model.video_token_id in prompt:
            raise InvalidRequestError(f"model {self.runtime.model_id!r} takes images, not videos")
        covered = {i for item in items for i in range(item.offset, item.end)}
        placeholders = {i for i, token in enumerate(prompt) if token == model.image_token_id}
        if covered != placeholders:
            stray = sorted(placeholders - covered)[:8]
            wrong = sorted(covered - placeholders)[:8]
            raise InvalidRequestError(
                f"image placeholder tokens ({model.image_token_id}) and images disagree: placeholders "
                f"without an image at {stray}, image tokens that are not placeholders at {wrong}"
            )

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> Request:
        return self.submit(self.make_request(request_id, prompt_token_ids, params))

    def submit(self, request: Request) -> Request:
        """Queue a request built by `make_request`."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Abort and free a request; idempotent (False when unknown or already finished)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.abort(request)
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ----------------------------------------------------------------------------- the loop
    def step(self) -> list[RequestOutput]:
        output = self.scheduler.schedule()
        if output.is_empty:
            return []
        try:
            sampled = self.runner.execute(output)
        except MultiModalInputError as exc:
            if not exc.request_ids:
                raise
            return self._fail_bad_images(exc)
        results = self.scheduler.update(output, sampled)
        for result in results:
            if result.request.is_finished:  # SENDING_KV requests stay known until released
                self.requests.pop(result.request_id, None)
        return results

    def _fail_bad_images(self, error: MultiModalInputError) -> list[RequestOutput]:
        """Fail the requests whose images could not be encoded (FINISHED_ERROR, blocks freed); the
        step ran nothing, so the other scheduled requests simply run on the next step."""
        log.warning("failing requests whose images cannot be encoded: %s", error)
        failed = []
        for request_id in error.request_ids:
            request = self.requests.pop(request_id, None)
            if request is not None and not request.is_finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
                failed.append(RequestOutput(request, finished=True))
        return failed

    # ----------------------------------------------------------------------------- PD hand-off
    def preallocate(self, request: Request) -> KVAllocation | None:
        """Decode role: reserve blocks for all of the request's tokens before its KV arrives.

        Leading blocks already in the prefix cache are shared; `request.num_cached_tokens` says
        how many tokens they hold (the sender may skip them). None: no room now (nothing changed).
        """
        hits = self.block_manager.get_computed_blocks(request)
        num_cached = len(hits) * self.block_manager.block_size
        allocation = self.block_manager.allocate(request, request.num_tokens - num_cached, hits)
        if allocation is None:
            return None
        request.num_cached_tokens = num_cached
        request.set_status(RequestStatus.WAITING_FOR_KV)
        self.requests[request.request_id] = request
        return allocation

    def adopt(self, request: Request, token: SampledToken) -> RequestOutput:
        """Decode role: the KV of every token arrived and `token` was sampled after them; run on."""
        request.num_computed_tokens = request.num_tokens
        self.block_manager.cache_blocks(request)
        request.append_token(token.token_id, token.logprobs)
        status = request.check_stop(self.runtime.max_model_len)
        if status is None:
            self.scheduler.add_running(request)
        else:
            request.set_status(RequestStatus.RUNNING)
            self.finish(request, status)
        logprobs = (token.logprobs,) if token.logprobs else ()
        return RequestOutput(request, (token.token_id,), logprobs, finished=status is not None)

    def release(self, request: Request) -> None:
        """Prefill role: the KV of a SENDING_KV request has been sent (or given up on); free it."""
        if request.status is RequestStatus.SENDING_KV:
            request.set_status(request.stop_status or RequestStatus.FINISHED_LENGTH)
        self.block_manager.free(request)
        self.requests.pop(request.request_id, None)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request from outside the loop (e.g. a stop string matched in its text)."""
        self.scheduler.finish(request, status)
        self.requests.pop(request.request_id, None)

    def block_stats(self) -> BlockStats:
        return self.block_manager.stats()

    def check_idle_invariants(self) -> None:
        """An idle engine holds no blocks: free + cached == total, nothing used. Requests the
        scheduler no longer holds but `self.requests` does (WAITING_FOR_KV, SENDING_KV) own blocks
        too: an engine with one of them is not idle."""
        self.block_manager.check_invariants()
        stats = self.block_manager.stats()
        if not self.scheduler.has_work and not self.requests and stats.num_used != 0:
            raise RuntimeError(f"idle engine still holds {stats.num_used} KV blocks")
