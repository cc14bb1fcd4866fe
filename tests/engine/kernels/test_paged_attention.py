"""The split-KV paged decode kernel and the attention backend against their torch references.

CPU: float32 and float16 through the Triton interpreter, in a subprocess (see
`interpreter_worker.py`), on awkward lengths and block sizes, GQA groups 1, 2 and 5, several split
counts, shuffled block tables, with everything the kernel must not read poisoned (see
`attention_cases.py`). GPU (`-m gpu`): bf16 at the ERNIE-4.5-21B head shape (20 query heads, 4 KV
heads, head_dim 128, blocks of 16) up to 8192 keys and 256 sequences, and a decode step captured
in a CUDA graph and replayed with other lengths and tables.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine.attention import AttentionMetadata, paged_attention_ref
from engine.backends import model_backends
from engine.kernels.paged_attention import (
    MAX_SPLITS,
    default_num_splits,
    paged_attention,
    paged_decode_attention,
)
from engine.model_runner import ModelRunner
from engine.request import Request
from engine.scheduler import ScheduledRequest, SchedulerOutput
from tests.engine.kernels.attention_cases import run_backend_case
from tests.engine.kernels.interpreter_worker import InterpreterWorker

CASES = "tests.engine.kernels.attention_cases"
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}
TINY = dict(num_q_heads=4, num_kv_heads=2, head_dim=16)  # the `tiny` preset's attention


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterWorker]:
    worker = InterpreterWorker()
    yield worker
    worker.close()


def _check(result: dict, tol: float) -> None:
    assert result["finite"], result
    assert result["ref_norm"] > 0, result
    assert result["rel_err"] <= tol, result


# ----------------------------------------------------------------------------------------------
# CPU interpreter: the decode kernel
# ----------------------------------------------------------------------------------------------

DECODE_CASES = [
    pytest.param(dict(seq_lens=[1], block_size=16, **TINY), id="S1-len1-tiny"),
    pytest.param(dict(seq_lens=[15, 16, 17], block_size=16, num_splits=1, **TINY), id="S3-around-a-block-1split"),
    pytest.param(
        dict(seq_lens=[1, 15, 16, 17, 255, 1023, 3], block_size=8, num_q_heads=10, num_kv_heads=2, head_dim=32),
        id="S7-B8-group5-default-splits",
    ),
    pytest.param(
        dict(seq_lens=[1, 15, 16, 17, 255, 1023, 3], block_size=8, num_splits=4, **TINY),
        id="S7-B8-group2-4splits",
    ),
    pytest.param(
        dict(seq_lens=[1023, 255, 17], block_size=16, num_q_heads=20, num_kv_heads=4, head_dim=16, num_splits=7),
        id="S3-21B-heads-7splits",
    ),
    pytest.param(
        dict(seq_lens=[17, 1, 16], block_size=16, num_q_heads=4, num_kv_heads=4, head_dim=16, num_splits=40),
        id="S3-group1-more-splits-than-blocks",
    ),
    pytest.param(
        dict(seq_lens=[255, 1023, 1], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=64, num_splits=3),
        id="S3-D64-3splits",
    ),
    pytest.param(
        dict(seq_lens=[300, 7, 64], block_size=16, num_splits=5, scale=1.0, **TINY),
        id="S3-peaked-softmax",
    ),
    pytest.param(
        dict(seq_lens=[33, 1, 1023], block_size=16, num_splits=2, table_dtype="int32", with_out=True, **TINY),
        id="S3-int32-table-into-out",
    ),
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_kernel_matches_reference(interpreter, case, dtype):
    result = interpreter.call(f"{CASES}:run_decode_case", dtype=dtype, **case)
    assert result["shape"] == [len(case["seq_lens"]), case["num_q_heads"], case["head_dim"]]
    assert result["dtype"] == f"torch.{dtype}"
    _check(result, TOLERANCE[dtype])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sequences_without_keys_get_zeros(interpreter, num_splits):
    # seq_len 0 rows (padding a batch): no key is read and the merge of all-empty splits stays finite
    result = interpreter.call(
        f"{CASES}:run_decode_case", seq_lens=[0, 20, 0], block_size=8, num_splits=num_splits, **TINY
    )
    _check(result, TOLERANCE["float32"])


# ----------------------------------------------------------------------------------------------
# CPU interpreter: the attention backend on whole steps
# ----------------------------------------------------------------------------------------------

STEP_CASES = [
    # (query_lens, context_lens, block_size, heads)
    pytest.param([1, 5, 1, 7, 3, 1], [16, 0, 300, 9, 0, 1022], 16, TINY, id="mixed-decode-prefill-chunked"),
    pytest.param([1] * 5, [0, 14, 15, 16, 1022], 8, dict(num_q_heads=10, num_kv_heads=2, head_dim=16), id="decode"),
    pytest.param([4, 1], [29, 0], 8, dict(num_q_heads=20, num_kv_heads=4, head_dim=32), id="chunk-and-first-token"),
]


@pytest.mark.parametrize(("query_lens", "context_lens", "block_size", "heads"), STEP_CASES)
def test_backend_matches_reference_on_steps(interpreter, query_lens, context_lens, block_size, heads):
    result = interpreter.call(
        f"{CASES}:run_backend_case",
        query_lens=query_lens,
        context_lens=context_lens,
        block_size=block_size,
        **heads,
    )
    assert result["shape"] == [sum(query_lens), heads["num_q_heads"], heads["head_dim"]]
    _check(result, TOLERANCE["float32"])


def test_backend_decode_path_reads_only_tensors(interpreter):
    # the lists say every sequence has one key (what a CUDA graph's placeholder metadata holds);
    # the tensors hold the truth, and the result follows them
    result = interpreter.call(
        f"{CASES}:run_backend_case",
        query_lens=[1, 1, 1],
        context_lens=[40, 0, 200],
        block_size=16,
        lists_lie=True,
        **TINY,
    )
    _check(result, TOLERANCE["float32"])


@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [([7], [0]), ([3, 16, 2], [0, 17, 1000])],
    ids=["one-prompt", "prompts-and-chunks"],
)
def test_backend_prefill_runs_sdpa_without_triton(query_lens, context_lens):
    """No sequence decodes: no kernel launch, so this runs in-process on plain CPU torch."""
    result = run_backend_case(query_lens=query_lens, context_lens=context_lens, block_size=16, **TINY)
    _check(result, TOLERANCE["float32"])


# ----------------------------------------------------------------------------------------------
# CPU, no kernel launch: split heuristic, validation, wiring
# ----------------------------------------------------------------------------------------------


def test_default_splits_fill_the_gpu_from_static_shapes():
    # ERNIE-4.5-21B on an H100 (132 SMs): 4 KV heads, blocks of 16, tables of 512 blocks (8192 keys)
    assert default_num_splits(1, 4, 512, 16, 132) == MAX_SPLITS
    assert default_num_splits(8, 4, 512, 16, 132) == 9  # 8 * 4 * 9 = 288 >= 2 * 132 programs
    assert default_num_splits(64, 4, 512, 16, 132) == 2
    assert default_num_splits(256, 4, 512, 16, 132) == 1
    assert default_num_splits(1, 4, 4, 16, 132) == 1  # 64 keys at most: one split
    assert default_num_splits(1, 4, 64, 16, 132) == 16  # 1024 keys: splits of 64 keys
    assert default_num_splits(0, 4, 0, 16, 132) == 1


def _decode_inputs() -> dict:
    # S=3 sequences, Hq=4, Hkv=2, D=16; a pool of N=6 blocks of B=4; tables of M=5 blocks
    return dict(
        query=torch.randn(3, 4, 16),
        kv_layer=torch.randn(2, 6, 4, 2, 16),
        block_tables=torch.zeros(3, 5, dtype=torch.int64),
        seq_lens=torch.ones(3, dtype=torch.int32),
        scale=0.25,
    )


@pytest.mark.parametrize(
    ("change", "error", "needles"),
    [
        (lambda d: d.update(query=d["query"][0]), ValueError, ["(4, 16)"]),
        (lambda d: d.update(query=d["query"].to(torch.int32)), TypeError, ["torch.int32"]),
        (lambda d: d.update(kv_layer=d["kv_layer"][0]), ValueError, ["(6, 4, 2, 16)"]),
        (lambda d: d.update(kv_layer=d["kv_layer"].half()), TypeError, ["torch.float16", "torch.float32"]),
        (lambda d: d.update(kv_layer=d["kv_layer"][..., :8]), ValueError, ["8", "16"]),
        (lambda d: d.update(query=torch.randn(3, 4, 24), kv_layer=torch.randn(2, 6, 4, 2, 24)), ValueError, ["24"]),
        (lambda d: d.update(query=torch.randn(3, 5, 16)), ValueError, ["5", "2"]),
        (lambda d: d.update(block_tables=d["block_tables"][:2]), ValueError, ["S=3", "(2, 5)"]),
        (lambda d: d.update(block_tables=d["block_tables"].float()), TypeError, ["torch.float32"]),
        (lambda d: d.update(block_tables=d["block_tables"].T.contiguous().T), ValueError, ["block_tables", "(1, 3)"]),
        (lambda d: d.update(seq_lens=d["seq_lens"][:, None]), ValueError, ["S=3", "(3, 1)"]),
        (lambda d: d.update(seq_lens=d["seq_lens"].float()), TypeError, ["torch.float32"]),
        (lambda d: d.update(num_splits=0), ValueError, ["num_splits", "0"]),
        (lambda d: d.update(out=torch.empty(3, 4, 8)), ValueError, ["(3, 4, 8)", "(3, 4, 16)"]),
        (lambda d: d.update(query=d["query"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, ["strides"]),
        (lambda d: d.update(seq_lens=d["seq_lens"].to("meta")), ValueError, ["cpu", "meta"]),
        (lambda d: None, ValueError, ["CUDA", "cpu"]),
    ],
    ids=[
        "query-2d",
        "query-dtype",
        "kv-4d",
        "kv-dtype",
        "kv-head-dim",
        "head-dim-not-power-of-two",
        "heads-not-a-multiple",
        "table-rows",
        "table-dtype",
        "table-strides",
        "seq-lens-shape",
        "seq-lens-dtype",
        "splits",
        "out-shape",
        "query-strides",
        "devices",
        "cpu-without-interpreter",
    ],
)
def test_decode_rejects_bad_inputs_naming_the_values(change, error, needles):
    inputs = _decode_inputs()
    change(inputs)
    with pytest.raises(error) as excinfo:
        paged_decode_attention(**inputs)
    for needle in needles:
        assert needle in str(excinfo.value), (needle, str(excinfo.value))


def test_triton_backends_attend_with_the_kernel_and_cpu_keeps_the_reference():
    assert model_backends("triton", "cpu").attention is paged_attention
    assert model_backends("auto", "cpu").attention is paged_attention_ref
    assert model_backends("torch", "cuda").attention is paged_attention_ref


def test_metadata_knows_a_decode_only_step():
    empty = torch.empty(0, dtype=torch.long)
    meta = AttentionMetadata(empty, empty, [0, 1, 2], [5, 9], torch.zeros(2, 3, dtype=torch.long), 4)
    assert meta.is_decode_only and meta.seq_lens_tensor is None  # derived from query_start_loc
    meta = AttentionMetadata(empty, empty, [0, 1, 3], [5, 9], torch.zeros(2, 3, dtype=torch.long), 4)
    assert not meta.is_decode_only
    meta.max_query_len = 1  # given: it wins (a CUDA graph's placeholder lists may say anything)
    assert meta.is_decode_only


def test_runner_fills_the_tensor_fields_of_the_metadata():
    runner = ModelRunner(torch.nn.Identity(), torch.zeros(1, 2, 8, 4, 1, 16), block_size=4)
    prompt = Request("p", list(range(10)), block_ids=[5, 2, 7])
    decoding = Request("d", list(range(6)), output_token_ids=[1], num_computed_tokens=6, block_ids=[3, 1])
    meta = runner.prepare(SchedulerOutput((ScheduledRequest.of(prompt, 10), ScheduledRequest.of(decoding, 1)))).meta
    assert meta.seq_lens_tensor.dtype == torch.int32 and meta.seq_lens_tensor.tolist() == [10, 7]
    assert meta.max_query_len == 10 and not meta.is_decode_only
    meta = runner.prepare(SchedulerOutput((ScheduledRequest.of(decoding, 1),))).meta
    assert meta.max_query_len == 1 and meta.is_decode_only and meta.seq_lens_tensor.tolist() == [7]


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ERNIE_21B = dict(num_q_heads=20, num_kv_heads=4, head_dim=128, block_size=16)
BF16_TOL = 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("seq_lens", "num_splits"),
    [
        ([1], None),
        ([8192], None),
        ([8192], 1),
        ([1, 17, 255, 1023, 4096, 8191, 8192], None),
        ([1023] * 64, None),
        ([8192] * 64, None),
        ([(i * 977) % 8192 + 1 for i in range(256)], None),
        ([8192] * 256, None),
        ([1024] * 256, 3),
    ],
    ids=["S1-1", "S1-8k", "S1-8k-1split", "S7-mixed", "S64-1k", "S64-8k", "S256-mixed", "S256-8k", "S256-1k-3splits"],
)
def test_gpu_ernie_21b_shape_bf16(seq_lens, num_splits):
    from tests.engine.kernels.attention_cases import run_decode_case

    result = run_decode_case(seq_lens=seq_lens, num_splits=num_splits, dtype="bfloat16", device="cuda", **ERNIE_21B)
    _check(result, BF16_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_other_dtypes(dtype):
    from tests.engine.kernels.attention_cases import run_decode_case

    result = run_decode_case(seq_lens=[1, 300, 2049], dtype=dtype, device="cuda", **ERNIE_21B)
    _check(result, BF16_TOL if dtype == "float16" else 1e-5)


@pytest.mark.gpu
@needs_cuda
def test_gpu_mixed_step_backend():
    result = run_backend_case(
        query_lens=[1, 300, 1, 64, 1],
        context_lens=[4000, 0, 17, 2000, 8191],
        dtype="bfloat16",
        device="cuda",
        **ERNIE_21B,
    )
    _check(result, BF16_TOL)


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_step_replays_from_a_cuda_graph():
    """Capture the backend's decode-only call once, then replay it over new lengths, tables and
    queries written into the same tensors: the output follows the new contents."""
    from engine.kernels.paged_attention_ref import decode_metadata, paged_decode_attention_ref
    from tests.engine.kernels.attention_cases import make_paged_inputs

    generator = torch.Generator(device="cuda").manual_seed(0)
    step_lens = ([5, 16, 17, 100, 1023, 4000, 8191, 2], [8191, 1, 300, 77, 16, 15, 6000, 2048])
    num_seqs, scale = 8, 128**-0.5
    # one pool holds both steps' sequences; each step's queries and table rows are its own
    query, kv, tables = make_paged_inputs(
        step_lens[0] + step_lens[1],
        2 * num_seqs,
        block_size=16,
        num_q_heads=20,
        num_kv_heads=4,
        head_dim=128,
        dtype=torch.bfloat16,
        device="cuda",
        generator=generator,
    )
    queries = query.split(num_seqs)
    static_query = queries[0].clone()
    seq_lens = torch.tensor(step_lens[0], dtype=torch.int32, device="cuda")
    block_tables = tables[:num_seqs].clone()
    graph_meta = decode_metadata(block_tables, seq_lens, 16)
    graph_meta.seq_lens = [1] * num_seqs  # placeholders, as a graph's metadata holds: not to be read

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_attention(static_query, kv, graph_meta, scale)  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = paged_attention(static_query, kv, graph_meta, scale)

    for step, (step_query, lens) in enumerate(zip(queries, step_lens, strict=True)):
        table = tables[step * num_seqs : (step + 1) * num_seqs]
        static_query.copy_(step_query)
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        block_tables.copy_(table)
        graph.replay()
        reference = paged_decode_attention_ref(step_query.float(), kv.float(), table, seq_lens, scale)
        err = ((static_out.float() - reference).norm() / reference.norm()).item()
        assert torch.isfinite(static_out).all() and err <= BF16_TOL, (step, err)
