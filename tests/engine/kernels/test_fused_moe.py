"""The Triton MoE kernels (fused_moe, moe_align, route) against their torch references.

CPU: float32 through the Triton interpreter, in a subprocess (see `interpreter_worker.py`), on
awkward sizes with every scratch buffer poisoned. GPU (`-m gpu`): bf16/fp16 at the real
ERNIE-4.5 shapes and odd ones, relative error <= 1e-2 against the reference run in fp32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from engine.kernels.fused_moe import FusedMoeConfig, _tma_view, default_config, fused_moe, get_config
from tests.engine.kernels.interpreter_worker import InterpreterWorker

CASES = "tests.engine.kernels.moe_cases"
FP32_TOL = 1e-5

# small tiles: many programs, partial tiles, several N-tiles and M-groups per expert
SMALL_TILES = dict(up_block_n=16, up_block_k=32, down_block_n=32, down_block_k=16, up_group_m=2, down_group_m=3)
PAIRS = dict(path="pairs", up_block_n=16, up_block_k=32, down_block_n=32, down_block_k=16)  # combine="sum"
PAIRS_FUSED = PAIRS | dict(combine="fused")


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterWorker]:
    worker = InterpreterWorker()
    yield worker
    worker.close()


def _check(result: dict, tol: float = FP32_TOL) -> None:
    assert result["finite"], result
    assert result["ref_norm"] > 0, result
    assert result["rel_err"] <= tol, result


# ----------------------------------------------------------------------------------------------
# CPU interpreter: fused_moe
# ----------------------------------------------------------------------------------------------

# (T, E, K, H, I, config): odd H/I give partial K- and N-tiles
GROUPED_CASES = [
    pytest.param(1, 8, 1, 64, 32, dict(path="grouped", block_m=16, **SMALL_TILES), id="T1-E8-k1"),
    pytest.param(7, 64, 6, 72, 40, dict(path="grouped", block_m=16, **SMALL_TILES), id="T7-E64-k6-oddHI"),
    pytest.param(255, 8, 2, 72, 40, dict(path="grouped", block_m=32, **SMALL_TILES), id="T255-E8-k2-oddHI"),
    pytest.param(255, 64, 6, 64, 32, dict(path="grouped", block_m=16, **SMALL_TILES), id="T255-E64-k6"),
    pytest.param(7, 64, 6, 72, 40, dict(path="grouped", block_m=16, tma=True, **SMALL_TILES), id="T7-E64-k6-oddHI-tma"),
    pytest.param(255, 64, 6, 64, 32, dict(path="grouped", block_m=32, tma=True, **SMALL_TILES), id="T255-E64-k6-tma"),
    pytest.param(
        1023,
        8,
        2,
        64,
        32,
        dict(path="grouped", block_m=64, up_block_n=32, up_block_k=32, down_block_n=64, down_block_k=32),
        id="T1023-E8-k2",
    ),
    pytest.param(
        1023,
        64,
        6,
        32,
        16,
        dict(path="grouped", block_m=32, up_block_n=16, up_block_k=32, down_block_n=32, down_block_k=16),
        id="T1023-E64-k6",
    ),
]
PAIRS_CASES = [
    pytest.param(1, 8, 1, 64, 32, id="T1-E8-k1"),
    pytest.param(7, 64, 6, 72, 40, id="T7-E64-k6-oddHI"),
    pytest.param(33, 8, 2, 64, 32, id="T33-E8-k2"),
]


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "hidden_size", "inter_size", "config"), GROUPED_CASES)
def test_grouped_path_matches_reference(interpreter, num_tokens, num_experts, top_k, hidden_size, inter_size, config):
    result = interpreter.call(
        f"{CASES}:run_fused_moe_case",
        num_tokens=num_tokens,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden_size,
        inter_size=inter_size,
        config=config,
    )
    assert result["shape"] == [num_tokens, hidden_size]
    _check(result)


@pytest.mark.parametrize("config", [PAIRS, PAIRS_FUSED], ids=["sum", "fused"])
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "hidden_size", "inter_size"), PAIRS_CASES)
def test_pairs_path_matches_reference(interpreter, num_tokens, num_experts, top_k, hidden_size, inter_size, config):
    result = interpreter.call(
        f"{CASES}:run_fused_moe_case",
        num_tokens=num_tokens,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden_size,
        inter_size=inter_size,
        config=config,
    )
    _check(result)


@pytest.mark.parametrize(
    "config",
    [PAIRS, PAIRS_FUSED, dict(path="grouped", block_m=16, **SMALL_TILES)],
    ids=["pairs", "pairs-fused", "grouped"],
)
def test_experts_without_tokens_and_int32_ids(interpreter, config):
    # tokens only pick experts 1, 4 and 6 of 8: five experts get nothing
    result = interpreter.call(
        f"{CASES}:run_fused_moe_case",
        num_tokens=7 if config["path"] == "pairs" else 255,
        num_experts=8,
        top_k=2,
        hidden_size=64,
        inter_size=32,
        config=config,
        used_experts=[1, 4, 6],
        ids_dtype="int32",
    )
    _check(result)


@pytest.mark.parametrize(
    ("config", "num_tokens"),
    [
        (PAIRS, 7),
        (PAIRS_FUSED, 7),
        (dict(path="grouped", block_m=16, **SMALL_TILES), 255),
        (dict(path="grouped", block_m=16, tma=True, **SMALL_TILES), 255),
    ],
    ids=["pairs", "pairs-fused", "grouped", "grouped-tma"],
)
@pytest.mark.parametrize("expert_offset", [0, 16, 48])
def test_expert_offset_keeps_only_the_local_slice(interpreter, config, num_tokens, expert_offset):
    # this rank holds 16 of 64 experts; the other ranks' slots have NaN weights and must be skipped
    result = interpreter.call(
        f"{CASES}:run_fused_moe_case",
        num_tokens=num_tokens,
        num_experts=16,
        top_k=6,
        hidden_size=64,
        inter_size=32,
        config=config,
        expert_offset=expert_offset,
        num_global_experts=64,
    )
    _check(result)


def test_slice_that_no_token_picks_gives_zeros(interpreter):
    # every token routes to experts 0..7; the rank holding 8..15 contributes exactly nothing
    result = interpreter.call(
        f"{CASES}:run_fused_moe_case",
        num_tokens=7,
        num_experts=8,
        top_k=2,
        hidden_size=64,
        inter_size=32,
        config=dict(path="grouped", block_m=16, **SMALL_TILES),
        expert_offset=8,
        num_global_experts=16,
        used_experts=list(range(8)),
    )
    assert result["finite"] and result["ref_norm"] == 0.0 and result["rel_err"] == 0.0, result


@pytest.mark.parametrize("tma", [False, True])
def test_atomic_combine_matches_reference(interpreter, tma):
    config = dict(path="grouped", block_m=16, combine="atomic", tma=tma, **SMALL_TILES)
    result = interpreter.call(
        f"{CASES}:run_fused_moe_case",
        num_tokens=33,
        num_experts=64,
        top_k=6,
        hidden_size=72,
        inter_size=40,
        config=config,
    )
    _check(result)


@pytest.mark.parametrize("num_tokens", [1, 7, 255])
def test_default_config_matches_reference(interpreter, num_tokens):
    result = interpreter.call(
        f"{CASES}:run_fused_moe_case",
        num_tokens=num_tokens,
        num_experts=64,
        top_k=6,
        hidden_size=64,
        inter_size=32,
    )
    _check(result)


# ----------------------------------------------------------------------------------------------
# CPU interpreter: alignment and routing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "block_m", "extra"),
    [
        (1, 8, 1, 16, {}),
        (7, 64, 6, 16, {}),
        (255, 8, 2, 32, {"used_experts": [0, 3, 5]}),
        (1023, 64, 6, 64, {}),
        (1023, 16, 6, 128, {"expert_offset": 16, "num_global_experts": 64}),
        (3001, 64, 6, 128, {}),  # > 128 sub-chunks: programs take several each
    ],
)
def test_align_sorts_every_local_pair_once(interpreter, num_tokens, num_experts, top_k, block_m, extra):
    result = interpreter.call(
        f"{CASES}:run_align_case",
        num_tokens=num_tokens,
        num_experts=num_experts,
        top_k=top_k,
        block_m=block_m,
        **extra,
    )
    assert 0 < result["used_blocks"] <= result["num_blocks"]


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "hidden_size", "with_bias", "splits"),
    [
        (1, 8, 1, 64, True, None),
        (7, 64, 6, 72, True, None),
        (255, 64, 6, 64, False, None),
        (1023, 8, 2, 32, True, None),
        # the gate GEMM split over H: 16 chunks (the last ragged) in the interpreter's default 4
        # splits; 6 chunks asked for 4 splits (3 of 2 chunks); the real shape in 40 one-chunk splits
        (1, 64, 6, 1000, True, None),
        (5, 16, 4, 330, False, 4),
        (33, 64, 6, 2560, True, 40),
    ],
)
def test_route_matches_reference(interpreter, num_tokens, num_experts, top_k, hidden_size, with_bias, splits):
    result = interpreter.call(
        f"{CASES}:run_route_case",
        num_tokens=num_tokens,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden_size,
        with_bias=with_bias,
        splits=splits,
    )
    assert result["ids_dtype"] == "torch.int64"
    assert result["num_clear"] > 0.9 * num_tokens, result
    assert result["ids_equal"], result
    assert result["max_weight_err"] < 1e-5, result


# ----------------------------------------------------------------------------------------------
# CPU, no kernel launch: input validation and config lookup


@pytest.mark.parametrize("hidden_size", [1, 64, 65, 1000, 2560])
@pytest.mark.parametrize("num_token_blocks", [1, 3, 64, 1000])
@pytest.mark.parametrize("max_programs", [1, 7, 264])
def test_route_splits_cover_every_chunk_once(hidden_size, num_token_blocks, max_programs):
    from engine.kernels.moe_route import BLOCK_K, num_splits

    splits, chunks_per_split = num_splits(num_token_blocks, hidden_size, max_programs)
    num_chunks = -(-hidden_size // BLOCK_K)
    assert splits >= 1 and chunks_per_split >= 1
    assert (splits - 1) * chunks_per_split < num_chunks <= splits * chunks_per_split  # none empty, all covered
    assert splits == 1 or splits * num_token_blocks <= max_programs


# ----------------------------------------------------------------------------------------------


def _inputs(T=3, E=4, K=2, H=16, I=8, dtype=torch.float32):  # noqa: E741
    return dict(
        hidden=torch.randn(T, H, dtype=dtype),
        w13=torch.randn(E, 2 * I, H, dtype=dtype),
        w2=torch.randn(E, H, I, dtype=dtype),
        topk_weights=torch.rand(T, K, dtype=dtype),
        topk_ids=torch.randint(0, E, (T, K)),
    )


@pytest.mark.parametrize(
    ("change", "error", "needles"),
    [
        (lambda d: d.update(hidden=d["hidden"].to(torch.int32)), TypeError, ["torch.int32"]),
        (lambda d: d.update(hidden=d["hidden"][None]), ValueError, ["(1, 3, 16)"]),
        (lambda d: d.update(w13=d["w13"].double()), TypeError, ["torch.float64"]),
        (lambda d: d.update(w13=d["w13"][:, :15]), ValueError, ["(4, 15, 16)"]),
        (lambda d: d.update(w13=d["w13"][..., :8]), ValueError, ["H=16", "(4, 16, 8)"]),
        (lambda d: d.update(w2=d["w2"][:3]), ValueError, ["(3, 16, 8)", "E=4"]),
        (lambda d: d.update(w2=d["w2"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, ["strides"]),
        (lambda d: d.update(topk_ids=d["topk_ids"].float()), TypeError, ["torch.float32"]),
        (lambda d: d.update(topk_ids=d["topk_ids"][:2]), ValueError, ["T=3", "(2, 2)"]),
        (lambda d: d.update(topk_weights=d["topk_weights"][:, :1]), ValueError, ["(3, 1)", "(3, 2)"]),
        (lambda d: d.update(topk_ids=d["topk_ids"].T.contiguous().T), ValueError, ["topk_ids", "strides"]),
        (lambda d: None, ValueError, ["CUDA", "cpu"]),
    ],
    ids=[
        "hidden-dtype",
        "hidden-3d",
        "w13-dtype",
        "w13-odd-rows",
        "w13-hidden-size",
        "w2-experts",
        "w2-strides",
        "ids-dtype",
        "ids-tokens",
        "weights-shape",
        "ids-noncontiguous",
        "cpu-without-interpreter",
    ],
)
def test_fused_moe_rejects_bad_inputs_naming_the_values(change, error, needles):
    inputs = _inputs()
    change(inputs)
    with pytest.raises(error) as excinfo:
        fused_moe(**inputs)
    for needle in needles:
        assert needle in str(excinfo.value), (needle, str(excinfo.value))


def test_fused_moe_rejects_bad_expert_offset_and_config():
    inputs = _inputs()
    with pytest.raises(ValueError, match="-1"):
        fused_moe(**inputs, expert_offset=-1)
    with pytest.raises(ValueError, match="blokc_m"):
        FusedMoeConfig.from_dict({"blokc_m": 64})
    with pytest.raises(ValueError, match="48"):
        FusedMoeConfig(block_m=48)
    with pytest.raises(ValueError, match="'fused'"):
        FusedMoeConfig(path="fused")
    with pytest.raises(ValueError, match="8"):
        FusedMoeConfig(path="grouped", block_m=8)
    with pytest.raises(ValueError, match=r"'atomic'.*'pairs'"):
        FusedMoeConfig(path="pairs", combine="atomic")


def test_tma_descriptors_only_where_tma_can_address_the_tensor():
    w = torch.empty(4, 48, 64, dtype=torch.bfloat16)
    desc = _tma_view(w, 16, 32)
    assert desc is not None and desc.shape == [4 * 48, 64] and desc.block_shape == [16, 32]
    assert _tma_view(torch.empty(4, 48, 68, dtype=torch.bfloat16), 16, 32) is None  # 136-byte rows
    assert _tma_view(torch.empty(5, 48, 64, dtype=torch.bfloat16)[::2], 16, 32) is None  # experts spaced apart
    assert _tma_view(torch.empty(4 * 48 * 64 + 1, dtype=torch.bfloat16)[1:].view(4, 48, 64), 16, 32) is None


def test_tuned_config_files_parse_and_validate():
    from engine.kernels.fused_moe import CONFIG_DIR, _tuned_table

    files = sorted(CONFIG_DIR.glob("fused_moe_*.json"))
    assert files, f"no tuned configs in {CONFIG_DIR}"
    for path in files:
        device = json.loads(path.read_text())["device"]
        table = _tuned_table(device)  # FusedMoeConfig validates every entry
        assert table and all(buckets for buckets in table.values()), path


def test_config_lookup_falls_back_for_unknown_gpus_and_the_interpreter():
    assert get_config(1, 2560, 1536, 64, 6, torch.bfloat16, "Imaginary GPU 9000").path == "pairs"
    assert get_config(4096, 2560, 1536, 64, 6, torch.bfloat16, "Imaginary GPU 9000").block_m == 128
    assert get_config(7, 64, 32, 8, 2, torch.float32, "interpreter") == default_config(7, 8, 2, interpreted=True)
    assert FusedMoeConfig.from_dict(default_config(300, 64, 6).to_dict()) == default_config(300, 64, 6)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
REAL = dict(num_experts=64, top_k=6, hidden_size=2560, inter_size=1536)
BF16_TOL = 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 2, 7, 64, 255, 1023, 4096])
def test_gpu_real_shape_tuned_config(num_tokens):
    from tests.engine.kernels.moe_cases import run_fused_moe_case

    _check(run_fused_moe_case(num_tokens=num_tokens, dtype="bfloat16", device="cuda", **REAL), BF16_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("num_tokens", "config"),
    [
        (1, PAIRS | dict(up_block_n=16, up_block_k=256, down_block_n=16, down_block_k=256)),
        (7, PAIRS_FUSED | dict(up_block_n=32, up_block_k=128, down_block_n=8, down_block_k=512)),
        (33, PAIRS_FUSED | dict(up_block_n=16, up_block_k=256, down_block_n=16, down_block_k=256)),
        (1, dict(path="grouped", block_m=16, up_block_n=64, up_block_k=128, down_block_n=64, down_block_k=128)),
        (255, dict(path="grouped", block_m=32, up_block_n=64, up_block_k=64, down_block_n=128, down_block_k=64)),
        (255, dict(path="grouped", block_m=32, up_block_n=64, up_block_k=64, down_block_n=128, tma=True)),
        (1023, dict(path="grouped", block_m=64, combine="atomic")),
        (1023, dict(path="grouped", block_m=64, combine="atomic", tma=True)),
        (1023, dict(path="grouped", block_m=128, up_block_n=128, down_block_n=128, up_warps=8, down_warps=8)),
        (
            4096,
            dict(
                path="grouped",
                block_m=128,
                up_block_n=128,
                down_block_n=256,
                up_warps=8,
                down_warps=8,
                up_stages=4,
                tma=True,
            ),
        ),
    ],
)
def test_gpu_real_shape_each_path(num_tokens, config):
    from tests.engine.kernels.moe_cases import run_fused_moe_case

    _check(run_fused_moe_case(num_tokens=num_tokens, dtype="bfloat16", device="cuda", config=config, **REAL), BF16_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 7, 255, 1023])
@pytest.mark.parametrize(
    ("path", "dtype"),
    [
        ("pairs", "bfloat16"),
        ("pairs-fused", "bfloat16"),
        ("grouped", "bfloat16"),
        ("grouped-tma", "bfloat16"),
        ("pairs-fused", "float16"),
        ("grouped-tma", "float16"),
    ],
)
def test_gpu_odd_sizes_and_expert_offset(num_tokens, path, dtype):
    from tests.engine.kernels.moe_cases import run_fused_moe_case

    if path.startswith("pairs"):
        config = (PAIRS_FUSED if path == "pairs-fused" else PAIRS) | dict(
            up_block_n=16, up_block_k=128, down_block_n=16, down_block_k=128
        )
    else:
        config = dict(path="grouped", block_m=16 if num_tokens < 64 else 64, tma=path.endswith("tma"), **SMALL_TILES)
    for offset in (0, 8):
        result = run_fused_moe_case(
            num_tokens=num_tokens,
            num_experts=8,
            top_k=3,
            hidden_size=200,
            inter_size=72,
            dtype=dtype,
            device="cuda",
            config=config,
            expert_offset=offset,
            num_global_experts=24,
        )
        _check(result, BF16_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 255])
def test_gpu_vl_vision_expert_shape(num_tokens):
    from tests.engine.kernels.moe_cases import run_fused_moe_case

    shape = dict(REAL, inter_size=512)
    _check(run_fused_moe_case(num_tokens=num_tokens, dtype="bfloat16", device="cuda", **shape), BF16_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 8, 512])
def test_gpu_deterministic_and_graph_capturable(num_tokens):
    from tests.engine.kernels.moe_cases import make_moe_inputs

    inputs = make_moe_inputs(num_tokens=num_tokens, dtype=torch.bfloat16, device="cuda", **REAL)
    first = fused_moe(**inputs)
    assert torch.equal(first, fused_moe(**inputs))
    fused_moe(**inputs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if anything syncs with the host
        captured = fused_moe(**inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("num_tokens", "block_m"), [(1, 16), (1023, 64), (16384, 128)])
def test_gpu_align(num_tokens, block_m):
    from tests.engine.kernels.moe_cases import run_align_case

    result = run_align_case(num_tokens=num_tokens, num_experts=64, top_k=6, block_m=block_m, device="cuda")
    assert result["used_blocks"] > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("num_tokens", "dtype", "splits"),
    [
        (1, "bfloat16", None),
        (7, "bfloat16", None),
        (64, "bfloat16", None),
        (1023, "bfloat16", None),
        (4096, "bfloat16", None),
        (7, "float16", None),
        (300, "bfloat16", 1),
        (300, "float32", 7),
    ],
)
def test_gpu_route(num_tokens, dtype, splits):
    # bf16 takes the three-piece tensor-core path, fp16 and fp32 the fp32 FMA one
    from tests.engine.kernels.moe_cases import run_route_case

    result = run_route_case(
        num_tokens=num_tokens,
        num_experts=64,
        top_k=6,
        hidden_size=2560,
        with_bias=True,
        dtype=dtype,
        device="cuda",
        splits=splits,
    )
    assert result["ids_equal"], result
    assert result["max_weight_err"] < 1e-2, result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_tokens", [16, 64, 300, 1000, 4096, 16384])
def test_default_configs_fit_shared_memory_of_every_supported_gpu(num_tokens, dtype):
    """An untuned GPU gets a config whose pipelined tiles fit (fp32 tiles are twice bf16's)."""
    from engine.kernels.fused_moe import DEFAULT_SHARED_MEMORY_BYTES, default_config, grouped_shared_memory

    for num_experts, top_k in ((8, 2), (64, 6)):
        cfg = default_config(num_tokens, num_experts, top_k, itemsize=dtype.itemsize)
        if cfg.path == "grouped":
            assert grouped_shared_memory(cfg, dtype.itemsize) <= DEFAULT_SHARED_MEMORY_BYTES
