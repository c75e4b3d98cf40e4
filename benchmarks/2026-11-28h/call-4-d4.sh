#!/usr/bin/env bash
# Session 2026-11-28 (fourteenth), call 4 (build 580d1df): the 7B decode kernels by
# CUBEQWEN_GEMV_STAGES (1, 3, 4; 0 and 2 in call 3), kernel bench graph replays.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=/tmp/kc CUBEQWEN_FULL_SHAPES=1
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$O/calls.log"
KB=/tmp/kb; gunzip -c stage/bin/bench-cubeqwen-bench-kernels.gz > $KB; chmod +x $KB
for st in 3 1 4 2; do
  [ $((SECONDS - t0)) -lt 150 ] || break
  CUBEQWEN_GEMV_STAGES=$st timeout 60 $KB --bench 'small/decode/7B' > /tmp/x/kb-$st.log 2>&1
  echo "=== gemv stages $st" >> "$O/kb4.txt"; grep -E "^record: decode.*graph" /tmp/x/kb-$st.log >> "$O/kb4.txt"
  stamp "stages $st"
done
cat "$O/kb4.txt"
