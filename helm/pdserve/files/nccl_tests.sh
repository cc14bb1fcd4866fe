#!/bin/sh
# Run nccl-tests' sendrecv_perf and all_reduce_perf on this pod's GPUs and gate on bus bandwidth
# at the largest size (the same rule as `pdserve preflight --min-busbw`).
#
#   nccl_tests.sh GPUS MIN_SENDRECV_GBPS MIN_ALLREDUCE_GBPS [nccl-tests arguments...]
#
# nccl-tests prints one row per size: size count type redop root time algbw busbw #wrong ...
# (out-of-place first); column 8 is busbw in GB/s and column 9 the wrong-element count.
set -u
gpus=$1
min_sendrecv=$2
min_allreduce=$3
shift 3
log_dir=${TMPDIR:-/tmp}
status=0
for op in sendrecv all_reduce; do
  if [ "$op" = sendrecv ]; then minimum=$min_sendrecv; else minimum=$min_allreduce; fi
  log="$log_dir/$op.log"
  if ! "${op}_perf" -g "$gpus" "$@" >"$log" 2>&1; then
    cat "$log"
    echo "FAIL: ${op}_perf exited with an error"
    status=1
    continue
  fi
  cat "$log"
  last=$(awk '$1 ~ /^[0-9]+$/ && NF >= 9 { size = $1; busbw = $8; wrong = $9 } END { print size, busbw, wrong }' "$log")
  size=${last%% *}
  rest=${last#* }
  busbw=${rest%% *}
  wrong=${rest#* }
  if [ -z "$size" ]; then
    echo "FAIL: no result rows in ${op}_perf's output"
    status=1
  elif [ "$wrong" != "N/A" ] && [ "$wrong" != "0" ]; then
    echo "FAIL: $op at $size B: $wrong wrong elements"
    status=1
  elif awk -v b="$busbw" -v m="$minimum" 'BEGIN { exit !(b + 0 < m + 0) }'; then
    echo "FAIL: $op busbw $busbw GB/s at $size B is under $minimum GB/s"
    status=1
  else
    echo "PASS: $op busbw $busbw GB/s at $size B (threshold $minimum GB/s)"
  fi
done
exit $status
