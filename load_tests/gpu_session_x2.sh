#!/usr/bin/env bash
# One device session on a machine with two GPUs: the multi-GPU tests and benchmarks.
#   bash load_tests/gpu_session_x2.sh PART [COMMIT]    PART: tests | bench
# Results (logs, JSON, Markdown) go to $OUT (the device tool brings them back).
# NVLink multicast stays off in this shell and every process it starts.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=.
PART=${1:-tests}
COMMIT=${2:-unknown}
OUT=${OUT:-/tmp/pdserve-out}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks (grpc health/reflection)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=.:/tmp/site
fi

run() {  # run NAME SECONDS CMD...: output tail to $OUT/NAME.log and the console
  local name=$1 seconds=$2; shift 2
  echo "=== $name ($*)"
  timeout -k 10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc" >> "$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
}

if [ "$PART" = tests ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, grpc; print('torch', torch.__version__, 'triton', triton.__version__, 'grpc', grpc.__version__, 'gpus', torch.cuda.device_count())"
    echo "commit $COMMIT"; } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  run gpu_kv_transport 150 python3 -m pytest -m gpu tests/cluster -q -rA -p no:cacheprovider
  run gpu_expert_parallel 170 python3 -m pytest -m gpu tests/engine/test_expert_parallel.py -q -rA -s -p no:cacheprovider
  run gpu_pd_serving 230 python3 -m pytest -m gpu tests/integration/test_pd_gpu.py -q -rA -p no:cacheprovider
else
  run bench_kv_transfer 540 python3 -m load_tests.kernels.bench_kv_transfer --device cuda --out "$OUT" --git-commit "$COMMIT"
fi
