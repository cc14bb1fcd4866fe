#!/usr/bin/env bash
# The README's capacity-planning walk-through: goodput search on a local 1 prefill + 1 decode
# CPU cluster (tiny model), capacity profile, plan for load_tests/examples/traffic_tiny.yaml with
# validation of both shapes. Usage: load_tests/walkthrough.sh OUT [extra bench flags, e.g. --no-plots]
set -euo pipefail
out=${1:?usage: walkthrough.sh OUT [flags]}
shift
only=${ONLY:-all}  # all | search
py=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one core per process
$py -m cluster.cli bench search --local 1:1 --input-len lognormal:192:0.5 --output-len uniform:16:48 \
  --slo "ttft:250 tpot:25" --attainment 0.9 --start-rate 8 --max-runs 8 --num-prompts 4000 --seconds-per-run 12 \
  --max-duration 20 --drain-timeout 10 --warmup 4 --quiet --out "$out/loadtest_search_tiny_1p1d" "$@"
[[ $only == search ]] && exit 0
plots=()
for flag in "$@"; do [[ $flag == --no-plots ]] && plots=(--no-plots); done
$py -m cluster.cli bench profile --local 1:1 --batches 1,2,4,8,16,24 --contexts 128,384 \
  --out "$out/capacity_tiny_cpu/capacity.json" "${plots[@]}"
$py -m cluster.cli bench plan --capacity "$out/capacity_tiny_cpu/capacity.json" \
  --traffic load_tests/examples/traffic_tiny.yaml --validate --validate-colocated \
  --validate-requests 240 --validate-max-duration 30 --out "$out/capacity_tiny_cpu" || true  # a FAIL is a result
