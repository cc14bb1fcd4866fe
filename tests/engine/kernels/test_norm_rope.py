"""The fused residual-add RMSNorm and RoPE + KV-write kernels against their torch references.

CPU: float32 and float16 through the Triton interpreter, in a subprocess (see
`interpreter_worker.py`), on awkward sizes (1, 3, 7, 255 tokens; hidden sizes 64, 320, 2560 and a
non-power-of-two 1000; head_dim 16 and 128; 4/2 and 20/4 heads; shuffled slots; the VL model's 3D
RoPE tables with their other strides), inputs inside NaN-filled buffers and the KV pool NaN
everywhere but the written slots. The rope results and the residual sums are bitwise the
reference's; the norm is bitwise on rows whose sum of squares is exact (any reduction order gives
it) and within a few units in the last place elsewhere (its reduction order is not torch's:
`NORM_MAX_ULPS`).
GPU (`-m gpu`): bf16 at the ERNIE-4.5-21B shape (H 2560; 20 query heads, 4 KV heads, head_dim
128, blocks of 16) up to 8192 tokens, and both ops captured in a CUDA graph and replayed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine.backends import model_backends
from engine.kernels.norm_rope import fused_add_rms_norm, rope_and_write_kv
from engine.kernels.norm_rope_ref import fused_add_rms_norm_ref, rope_and_write_kv_ref
from engine.loader import load_model
from engine.models.ernie4_5_moe import ModelBackends
from tests.engine.kernels.interpreter_worker import InterpreterWorker
from tests.helpers import make_kv_cache, make_meta, num_blocks_for

CASES = "tests.engine.kernels.norm_rope_cases"
TINY_HEADS = dict(num_q_heads=4, num_kv_heads=2, head_dim=16)  # the `tiny` preset's attention
ERNIE_21B_HEADS = dict(num_q_heads=20, num_kv_heads=4, head_dim=128)
# The norm on arbitrary rows: its sum of squares and torch's, rounded in other orders, differ by a
# few fp32 units in the last place (more for longer rows); rsqrt halves that, the casts and the
# weight product round it again. In a 16-bit dtype that flips the normalised value by at most one
# unit, and the product with a weight above 1 can carry it to two (seen on the H100 at
# 8192 x 2560 rows in fp16 and bf16; on the CPU interpreter's small shapes, at most one).
NORM_MAX_ULPS = {"float32": 8, "float16": 2, "bfloat16": 2}


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterWorker]:
    worker = InterpreterWorker()
    yield worker
    worker.close()


def _check_norm(result: dict, *, exact: bool, with_residual: bool = True) -> None:
    assert result["finite"], result
    assert result["residual_equal"], result
    assert result["residual_is_x"] == (not with_residual), result
    if exact:
        assert result["normed_equal"], result
    else:
        assert result["normed_max_ulps"] <= NORM_MAX_ULPS[result["dtype"].removeprefix("torch.")], result


def _check_rope(result: dict) -> None:
    assert result["q_finite"] and result["written_finite"], result
    assert result["q_equal"], result
    assert result["cache_equal"], result
    assert result["num_nan_left"] == result["num_nan_expected"], result


# ----------------------------------------------------------------------------------------------
# CPU interpreter: fused_add_rms_norm
# ----------------------------------------------------------------------------------------------

NORM_SIZES = [(1, 64), (3, 2560), (7, 320), (255, 64), (7, 1000), (3, 8192)]
NORM_IDS = [f"T{t}-H{h}" for t, h in NORM_SIZES]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("num_tokens", "hidden_size"), NORM_SIZES, ids=NORM_IDS)
def test_norm_is_bitwise_the_reference_when_the_sum_is_exact(interpreter, num_tokens, hidden_size, dtype):
    result = interpreter.call(
        f"{CASES}:run_norm_case", num_tokens=num_tokens, hidden_size=hidden_size, dtype=dtype, exact_sum=True
    )
    assert result["shape"] == [num_tokens, hidden_size] and result["dtype"] == f"torch.{dtype}"
    _check_norm(result, exact=True)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("num_tokens", "hidden_size"), NORM_SIZES, ids=NORM_IDS)
def test_norm_is_within_a_few_ulps_of_the_reference_on_any_rows(interpreter, num_tokens, hidden_size, dtype):
    result = interpreter.call(f"{CASES}:run_norm_case", num_tokens=num_tokens, hidden_size=hidden_size, dtype=dtype)
    _check_norm(result, exact=False)


@pytest.mark.parametrize("exact_sum", [True, False], ids=["exact-sum", "any-rows"])
def test_norm_without_residual_returns_x_as_the_residual(interpreter, exact_sum):
    result = interpreter.call(
        f"{CASES}:run_norm_case",
        num_tokens=7,
        hidden_size=320,
        dtype="float16",
        with_residual=False,
        exact_sum=exact_sum,
    )
    _check_norm(result, exact=exact_sum, with_residual=False)


# ----------------------------------------------------------------------------------------------
# CPU interpreter: rope_and_write_kv
# ----------------------------------------------------------------------------------------------

ROPE_CASES = [
    pytest.param(dict(num_tokens=1, block_size=16, **TINY_HEADS), id="T1-tiny"),
    pytest.param(dict(num_tokens=3, block_size=4, **TINY_HEADS), id="T3-tiny-B4"),
    pytest.param(dict(num_tokens=7, block_size=16, **ERNIE_21B_HEADS), id="T7-21B-heads"),
    pytest.param(dict(num_tokens=255, block_size=16, **TINY_HEADS), id="T255-tiny"),
    pytest.param(dict(num_tokens=7, block_size=8, num_q_heads=20, num_kv_heads=4, head_dim=16), id="T7-20-4-D16"),
    pytest.param(dict(num_tokens=3, block_size=16, num_q_heads=4, num_kv_heads=2, head_dim=128), id="T3-4-2-D128"),
    pytest.param(dict(num_tokens=7, block_size=16, layout="vl", **TINY_HEADS), id="T7-vl-3d-tables"),
    pytest.param(dict(num_tokens=7, block_size=4, slot_dtype="int32", **TINY_HEADS), id="T7-int32-slots"),
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_and_kv_write_are_bitwise_the_reference(interpreter, case, dtype):
    result = interpreter.call(f"{CASES}:run_rope_case", dtype=dtype, **case)
    assert result["shape"] == [case["num_tokens"], case["num_q_heads"], case["head_dim"]]
    assert result["dtype"] == f"torch.{dtype}"
    _check_rope(result)


# ----------------------------------------------------------------------------------------------
# CPU, no kernel launch: validation, wiring
# ----------------------------------------------------------------------------------------------


def _assert_rejects(function, inputs: dict, change, error: type[Exception], needles: list[str]) -> None:
    change(inputs)
    with pytest.raises(error) as excinfo:
        function(**inputs)
    for needle in needles:
        assert needle in str(excinfo.value), (needle, str(excinfo.value))


def _norm_inputs() -> dict:
    return dict(x=torch.randn(3, 64), residual=torch.randn(3, 64), weight=torch.randn(64), eps=1e-5)


@pytest.mark.parametrize(
    ("change", "error", "needles"),
    [
        (lambda d: d.update(x=d["x"][0]), ValueError, ["(64,)"]),
        (lambda d: d.update(x=d["x"].int(), residual=None), TypeError, ["torch.int32"]),
        (lambda d: d.update(x=torch.randn(3, 20000), residual=None, weight=torch.randn(20000)), ValueError, ["20000"]),
        (lambda d: d.update(residual=d["residual"][:2]), ValueError, ["(2, 64)", "(3, 64)"]),
        (lambda d: d.update(residual=d["residual"].half()), ValueError, ["torch.float16"]),
        (lambda d: d.update(weight=d["weight"][:32]), ValueError, ["[64]", "(32,)"]),
        (lambda d: d.update(eps=-1.0), ValueError, ["-1.0"]),
        (lambda d: d.update(x=torch.randn(64, 3).T), ValueError, ["x", "(1, 3)"]),
        (lambda d: d.update(residual=d["residual"].to("meta")), ValueError, ["cpu", "meta"]),
        (lambda d: None, ValueError, ["CUDA", "cpu"]),
    ],
    ids=[
        "x-1d",
        "x-dtype",
        "hidden-too-large",
        "residual-shape",
        "residual-dtype",
        "weight-shape",
        "eps",
        "x-strides",
        "devices",
        "cpu-without-interpreter",
    ],
)
def test_norm_rejects_bad_inputs_naming_the_values(change, error, needles):
    _assert_rejects(fused_add_rms_norm, _norm_inputs(), change, error, needles)


def _rope_inputs() -> dict:
    # T=3 tokens, Hq=4, Hkv=2, D=16; a pool of N=5 blocks of B=4
    return dict(
        qkv=torch.randn(3, 8 * 16),
        cos=torch.randn(3, 1, 8),
        sin=torch.randn(3, 1, 8),
        kv_layer=torch.randn(2, 5, 4, 2, 16),
        slot_mapping=torch.tensor([4, 0, 9]),
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )


@pytest.mark.parametrize(
    ("change", "error", "needles"),
    [
        (lambda d: d.update(head_dim=12), ValueError, ["12"]),
        (lambda d: d.update(num_kv_heads=0), ValueError, ["0 KV heads"]),
        (lambda d: d.update(qkv=d["qkv"][:, :96]), ValueError, ["128", "(3, 96)"]),
        (lambda d: d.update(qkv=d["qkv"].int()), TypeError, ["torch.int32"]),
        (lambda d: d.update(kv_layer=d["kv_layer"][..., :8]), ValueError, ["D=16", "(2, 5, 4, 2, 8)"]),
        (lambda d: d.update(kv_layer=d["kv_layer"].half()), TypeError, ["torch.float16", "torch.float32"]),
        (lambda d: d.update(slot_mapping=d["slot_mapping"][:2]), ValueError, ["T=3", "(2,)"]),
        (lambda d: d.update(slot_mapping=d["slot_mapping"].float()), TypeError, ["torch.float32"]),
        (lambda d: d.update(cos=d["cos"][:, :, :4]), ValueError, ["cos", "(3, 4)"]),
        (lambda d: d.update(sin=d["sin"].double()), TypeError, ["sin", "torch.float64"]),
        (lambda d: d.update(qkv=torch.randn(128, 3).T), ValueError, ["qkv", "(1, 3)"]),
        (lambda d: d.update(slot_mapping=d["slot_mapping"].to("meta")), ValueError, ["cpu", "meta"]),
        (lambda d: None, ValueError, ["CUDA", "cpu"]),
    ],
    ids=[
        "head-dim",
        "kv-heads",
        "qkv-width",
        "qkv-dtype",
        "kv-head-dim",
        "kv-dtype",
        "slots-shape",
        "slots-dtype",
        "cos-shape",
        "sin-dtype",
        "qkv-strides",
        "devices",
        "cpu-without-interpreter",
    ],
)
def test_rope_rejects_bad_inputs_naming_the_values(change, error, needles):
    _assert_rejects(rope_and_write_kv, _rope_inputs(), change, error, needles)


def test_triton_backends_use_the_fused_kernels_and_cpu_keeps_the_references():
    triton_backends = model_backends("triton", "cpu")
    assert triton_backends.norm is fused_add_rms_norm and triton_backends.rope_write_kv is rope_and_write_kv
    cpu_backends = model_backends("auto", "cpu")
    assert cpu_backends.norm is fused_add_rms_norm_ref and cpu_backends.rope_write_kv is rope_and_write_kv_ref


@pytest.mark.parametrize("preset", ["tiny", "tiny-vl"])
def test_every_norm_and_rope_of_a_step_goes_through_the_backends(preset):
    """set_backends reaches each layer's two norms, the final norm and each layer's rope: a step
    calls norm 2 L + 1 times (residual None only the first time) and rope_write_kv L times."""
    model = load_model(preset).model
    calls: dict[str, list] = {"norm": [], "rope": []}

    def counting_norm(x, residual, weight, eps):
        calls["norm"].append(residual is None)
        return fused_add_rms_norm_ref(x, residual, weight, eps)

    def counting_rope(*args):
        calls["rope"].append(args[0].shape)
        return rope_and_write_kv_ref(*args)

    model.set_backends(ModelBackends(norm=counting_norm, rope_write_kv=counting_rope))
    cache = make_kv_cache(model.config, num_blocks_for(1, 2), block_size=4)
    with torch.no_grad():
        model(torch.arange(5), make_meta([(0, 5)], 4, 2), cache)
    num_layers = model.config.num_hidden_layers
    assert calls["norm"] == [True] + [False] * (2 * num_layers)
    assert len(calls["rope"]) == num_layers


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ERNIE_21B_HIDDEN = 2560


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 8192])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_gpu_norm_at_the_21b_width(num_tokens, dtype):
    from tests.engine.kernels.norm_rope_cases import run_norm_case

    exact = run_norm_case(
        num_tokens=num_tokens, hidden_size=ERNIE_21B_HIDDEN, dtype=dtype, device="cuda", exact_sum=True
    )
    _check_norm(exact, exact=True)
    any_rows = run_norm_case(num_tokens=num_tokens, hidden_size=ERNIE_21B_HIDDEN, dtype=dtype, device="cuda")
    _check_norm(any_rows, exact=False)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 8192])
@pytest.mark.parametrize("layout", ["text", "vl"])
def test_gpu_rope_at_the_21b_shape_bf16(num_tokens, layout):
    from tests.engine.kernels.norm_rope_cases import run_rope_case

    result = run_rope_case(
        num_tokens=num_tokens, block_size=16, dtype="bfloat16", device="cuda", layout=layout, **ERNIE_21B_HEADS
    )
    _check_rope(result)


@pytest.mark.gpu
@needs_cuda
def test_gpu_norm_and_rope_replay_from_a_cuda_graph():
    """Capture norm + rope_and_write_kv once on static buffers, then replay over new rows,
    positions and slots written into them: outputs and cache follow the new contents bitwise
    (the norm's rows exact-sum, see norm_rope_cases)."""
    from tests.engine.kernels.norm_rope_cases import make_rope_inputs

    generator = torch.Generator(device="cuda").manual_seed(0)
    num_tokens, dtype = 8, torch.bfloat16
    steps = []
    for _ in range(2):
        rows = torch.randint(-16, 17, (2, num_tokens, ERNIE_21B_HIDDEN), generator=generator, device="cuda") / 8
        rope = make_rope_inputs(
            num_tokens, block_size=16, dtype=dtype, device="cuda", generator=generator, **ERNIE_21B_HEADS
        )
        steps.append((rows.to(dtype), rope))
    weight = (1 + 0.5 * torch.randn(ERNIE_21B_HIDDEN, generator=generator, device="cuda")).to(dtype)
    pool = steps[0][1]["pool"].clone()  # both steps write into one pool (their slots may overlap: compared per step)
    kv_layer = pool[..., :128]
    static = {
        "x": steps[0][0][0].clone(),
        "residual": steps[0][0][1].clone(),
        "qkv": steps[0][1]["qkv"].clone(),
        "cos": steps[0][1]["cos"].clone(),
        "sin": steps[0][1]["sin"].clone(),
        "slots": steps[0][1]["slot_mapping"].clone(),
    }

    def step():
        normed, new_residual = fused_add_rms_norm(static["x"], static["residual"], weight, 1e-5)
        q = rope_and_write_kv(static["qkv"], static["cos"], static["sin"], kv_layer, static["slots"], 20, 4, 128)
        return normed, new_residual, q

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    for index, (rows, rope) in enumerate(steps):
        for name, value in (
            ("x", rows[0]),
            ("residual", rows[1]),
            ("qkv", rope["qkv"]),
            ("slots", rope["slot_mapping"]),
        ):
            static[name].copy_(value)
        static["cos"].copy_(rope["cos"])
        static["sin"].copy_(rope["sin"])
        pool.fill_(float("nan"))
        graph.replay()
        want_normed, want_residual = fused_add_rms_norm_ref(rows[0], rows[1], weight, 1e-5)
        want_pool = torch.full_like(pool, float("nan"))
        want_q = rope_and_write_kv_ref(
            rope["qkv"], rope["cos"], rope["sin"], want_pool[..., :128], rope["slot_mapping"], 20, 4, 128
        )
        assert torch.equal(outputs[0], want_normed) and torch.equal(outputs[1], want_residual), index
        assert torch.equal(outputs[2], want_q), index
        assert torch.equal(pool.isnan(), want_pool.isnan()), index
        assert torch.equal(pool.nan_to_num(0), want_pool.nan_to_num(0)), index
