#!/usr/bin/env bash
# One device session on a machine with four GPUs: the end-to-end PD benchmarks (load_tests/bench_pd.py,
# ernie-4.5-21b-a3b random preset), in two parts of at most 540 s each.
#   bash load_tests/gpu_session_x4.sh PART [COMMIT]    PART: pd1 | pd2 | kvpd
#   pd1  at once: goodput --gpus 2 on GPUs 0,1 and ttft --gpus 2 on GPUs 2,3
#   pd2  goodput --gpus 4, then shift --gpus 4 (one cluster, static splits set by role flips)
#   kvpd at once: on GPUs 0,1 the KV-transfer benchmark, then the KV-transport and PD GPU tests;
#        on GPUs 2,3 ttft --gpus 2, then goodput --gpus 2
# $OUT gets at most 8 files a part: PART.log (the console: environment, each step's log tail),
# PART.tar.gz (every step's full log and every result: the benchmarks' JSON + Markdown and the
# harness's per-run folders) and a copy of each benchmark's top-level JSON and Markdown.
# Every step has its own time limit, clamped so that the part ends within PD_BUDGET seconds (540);
# a benchmark cut short still leaves its partial JSON (bench_pd rewrites it after every shape).
# PD_DRY_RUN=1 runs the same steps on CPU with the tiny model and seconds-long runs (checks this script).
# NVLink multicast stays off in this shell and every process it starts.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=.
PART=${1:-pd1}
COMMIT=${2:-unknown}
OUT=${OUT:-/tmp/pdserve-out}
WORK=${PD_WORK:-/tmp/pdserve-$PART}  # step logs and results, packed into $OUT/$PART.tar.gz
BUDGET=${PD_BUDGET:-540}             # seconds for the whole part
RESERVE=15                           # kept back for reaping and packing
START=$(date +%s)
case "$PART" in pd1 | pd2 | kvpd) ;; *) echo "PART must be pd1, pd2 or kvpd, got $PART" >&2; exit 2 ;; esac
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/logs" "$WORK/results"
RESULTS=$WORK/results

if [ "${PD_DRY_RUN:-0}" = 1 ]; then  # CPU, tiny model: the script's logic, not a measurement
  COMMON=(--model tiny --device cpu --warmup 2)
  GOODPUT2=(--start-rate 2 --max-runs 2 --seconds-per-run 2 --drain-timeout 5)
  GOODPUT2+=(--input-len uniform:32:128 --output-len uniform:8:16)
  TTFT2=(--prompt-len 128 --requests 3)
  GOODPUT4=(--start-rate 4 --max-runs 1 --seconds-per-run 2 --drain-timeout 5 --client-procs 2)
  GOODPUT4+=(--input-len uniform:32:128 --output-len uniform:8:16)
  SHIFT4=(--phase-seconds 2 --phase-rate 2 --long-len 256 --long-output 16 --drain-timeout 5 --reuse-cluster)
  KVBENCH=(--device cpu --tokens 16,64 --repeats 2 --layerwise-repeats 1 --variants "")
else
  # Workers keep their defaults (2048-token chunks, CUDA graphs for every batch bucket they can run); the
  # goodput runs name 128 sequences (the default since 9fa4726) so that older commits compare alike: at 64
  # a lone decode worker runs out of sequences near 12 req/s of this mix (each holds one for ~256 tokens
  # x ~36 ms), measured on two H200s at 2183028: 64 sequences 10.5-12 vs 13.5-15 req/s, 128 15 vs 15,
  # 256 13.5 vs 13.5.
  # bench_pd raises --max-model-len to fit the workload. Output lengths uniform 128..384 (mean 256, as
  # the default lognormal's) bound each run's drain: 384 tokens at <= 40 ms a token fit the 15 s.
  # Rates from the H100 numbers (README): prefill ~30k tok/s in 2048-token chunks, decode 20-30 ms a step.
  COMMON=(--model ernie-4.5-21b-a3b --device cuda --warmup 4)
  GOODPUT2=(--start-rate 12 --max-runs 5 --tolerance 0.15 --seconds-per-run 10 --drain-timeout 15)
  GOODPUT2+=(--output-len uniform:128:384 --worker-arg=--max-num-seqs=128)  # input: the default lognormal:1024:0.8
  TTFT2=(--prompt-len 4096 --requests 100)
  # pd2's rates can be set from pd1's results: PD_G4_START ~ 1.5x the 2-GPU goodput; PD_SHIFT_RATE ~ 2.25 /
  # (pd1's colocated median TTFT of a 4096-token prompt, in s): above what 2 prefill workers take, below 3's.
  GOODPUT4=(--start-rate "${PD_G4_START:-12}" --max-runs 4 --tolerance 0.15 --seconds-per-run 6 --drain-timeout 15)
  GOODPUT4+=(--output-len uniform:128:384 --client-procs 2 --worker-arg=--max-num-seqs=128)  # as goodput --gpus 2
  SHIFT4=(--phase-seconds 12 --phase-rate "${PD_SHIFT_RATE:-18}" --long-len 4096 --long-output 256)
  SHIFT4+=(--drain-timeout 10 --reuse-cluster)
  KVBENCH=(--device cuda --variants "")
fi
GPU_TESTS=(tests/cluster/test_kv_transport_gpu.py tests/integration/test_pd_gpu.py)

left() { echo $((START + BUDGET - RESERVE - $(date +%s))); }

run() {  # run NAME SECONDS CMD...: output to $WORK/logs/NAME.log, its tail to the console
  local name=$1 seconds=$2; shift 2
  local limit; limit=$(($(left) - 10))  # timeout's -k 10 comes on top
  [ "$seconds" -lt "$limit" ] || seconds=$limit
  if [ "$seconds" -lt 30 ]; then
    echo "=== $name skipped: ${seconds} s left in the part's budget" | tee "$WORK/logs/$name.log"
    return 1
  fi
  echo "=== $name (limit ${seconds} s, t=$(($(date +%s) - START)) s): $*"
  timeout -k 10 "$seconds" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc after $(($(date +%s) - START)) s" >> "$WORK/logs/$name.log"
  echo "=== $name done: rc=$rc, t=$(($(date +%s) - START)) s"
  grep -E '^\[bench_pd|Error|error:|Traceback' "$WORK/logs/$name.log" | tail -n 40
  tail -n 6 "$WORK/logs/$name.log"
}

bench() {  # bench NAME SECONDS CUDA_VISIBLE_DEVICES WHAT ARGS...: one bench_pd benchmark (ARGS win over COMMON)
  local name=$1 seconds=$2 gpus=$3 what=$4; shift 4
  run "$name" "$seconds" env CUDA_VISIBLE_DEVICES="$gpus" python3 -m load_tests.bench_pd "$what" "${COMMON[@]}" \
    --out "$RESULTS" --git-commit "$COMMIT" --pid-file "$WORK/pids-$name.txt" "$@"
}

reap() {  # processes of a cluster whose benchmark had to be killed: stopped by their pids (bench_pd --pid-file)
  local file pid name
  for file in "$WORK"/pids-*.txt; do
    [ -f "$file" ] || continue
    while read -r pid name; do
      if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q 'cluster\.cli'; then
        echo "reaping $name (pid $pid, from $(basename "$file"))"
        kill -KILL "$pid" 2>/dev/null
      fi
    done < "$file"
    rm -f "$file"
  done
}

pack() {  # everything into one tar; the benchmarks' top-level JSON and Markdown beside it (<= 8 files in $OUT)
  cp "$OUT/$PART.log" "$WORK/logs/console.log" 2>/dev/null
  tar -czf "$OUT/$PART.tar.gz" -C "$WORK" logs results env.txt 2>/dev/null || tar -czf "$OUT/$PART.tar.gz" -C "$WORK" .
  local n=2 f
  for f in "$RESULTS"/pd_*gpu_*.json "$RESULTS"/pd_*gpu_*.md "$RESULTS"/kv_transfer_*.json "$RESULTS"/kv_transfer_*.md; do
    [ -f "$f" ] && [ "$n" -lt 8 ] && cp "$f" "$OUT/" && n=$((n + 1))
  done
  ls -la "$OUT"
}

main() {
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks (grpc health/reflection)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=.:/tmp/site
  fi
  { echo "part $PART, commit $COMMIT, dry run ${PD_DRY_RUN:-0}, budget ${BUDGET} s"
    echo "goodput2: ${GOODPUT2[*]}"; echo "ttft2: ${TTFT2[*]}"; echo "goodput4: ${GOODPUT4[*]}"; echo "shift4: ${SHIFT4[*]}"
    nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv
    python3 -c "import torch, triton, grpc, grpc_health, grpc_reflection
print('torch', torch.__version__, 'triton', triton.__version__, 'grpc', grpc.__version__, 'gpus', torch.cuda.device_count())"
    echo "cpus $(nproc)"; } > "$WORK/env.txt" 2>&1
  cat "$WORK/env.txt"
  if [ "$PART" = pd1 ]; then
    bench goodput2 "$(left)" 0,1 goodput --gpus 2 "${GOODPUT2[@]}" &
    bench ttft2 300 2,3 ttft --gpus 2 "${TTFT2[@]}" &
    wait
  elif [ "$PART" = kvpd ]; then
    { run kvbench 240 env CUDA_VISIBLE_DEVICES=0,1 python3 -m load_tests.kernels.bench_kv_transfer "${KVBENCH[@]}" \
        --out "$RESULTS" --git-commit "$COMMIT"
      [ "${PD_DRY_RUN:-0}" = 1 ] || run gputests 240 env CUDA_VISIBLE_DEVICES=0,1 python3 -m pytest -q -m gpu \
        -p no:cacheprovider "${GPU_TESTS[@]}"; } &
    { bench ttft2 200 2,3 ttft --gpus 2 "${TTFT2[@]}"
      bench goodput2 "$(left)" 2,3 goodput --gpus 2 "${GOODPUT2[@]}"; } &
    wait
  else
    bench goodput4 290 0,1,2,3 goodput --gpus 4 "${GOODPUT4[@]}"
    reap
    bench shift4 "$(left)" 0,1,2,3 shift --gpus 4 "${SHIFT4[@]}"
  fi
  reap
  echo "=== part $PART finished after $(($(date +%s) - START)) s"
  pack
}

main 2>&1 | tee "$OUT/$PART.log"
exit "${PIPESTATUS[0]}"
