#!/usr/bin/env bash
# One device session on a one-GPU machine (H100): the single-GPU tests, then the engine benchmarks.
#   bash load_tests/gpu_session_h100.sh [COMMIT]
# Results (logs, JSON, Markdown) go to $OUT (the device tool brings them back). Each step has its
# own time limit so one hang cannot eat the session.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=.
COMMIT=${1:-unknown}
OUT=${OUT:-/tmp/pdserve-out}
mkdir -p "$OUT"

run() {  # run NAME SECONDS CMD...: output to $OUT/NAME.log, its tail to the console
  local name=$1 seconds=$2; shift 2
  echo "=== $name ($*)"
  timeout -k 10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc" >> "$OUT/$name.log"
  tail -n 12 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
  echo "commit $COMMIT"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# The paged-attention and norm / RoPE kernels, the Triton backends end to end, CUDA-graph decode (text and VL).
run gpu_engine 150 python3 -m pytest -m gpu tests/engine/kernels/test_paged_attention.py tests/engine/kernels/test_norm_rope.py tests/engine/test_cuda_graph.py tests/engine/test_backends.py tests/engine/test_vl_engine.py -q -rfEs -p no:cacheprovider
# Decode step vs its floor and prefill throughput, ernie-4.5-21b-a3b (random weights), one engine.
run bench_engine 165 python3 -m load_tests.bench_engine all --out "$OUT" --git-commit "$COMMIT" \
  --batches 1,8,64,256 --contexts 1024,8192 --prompts 1024,8192,32768 --steps 10
# The decode-attention kernel alone (eager and graph) against the same run's gather + SDPA baseline.
run bench_paged_attention 45 python3 -m load_tests.kernels.bench_paged_attention --out "$OUT" --git-commit "$COMMIT"
# At most 8 files come back from $OUT: the logs travel as one archive beside the result files.
(cd "$OUT" && tar czf logs.tgz ./*.log env.txt && rm -f ./*.log env.txt)
