#!/usr/bin/env bash
# Session 2026-11-29c, call 2 (build 2eb6d55: the mma matmul with 2 or 3 stages, W's fragments
# a k-step at a time). One kernel cache; nothing beside.
# 1. Kernel bench of auto (cubek's TMA kernel) and cuBLAS at the q/gate/down shapes, m = 512
#    and 2048. 2. For each tile (CUBEQWEN_MMA_TILE): the mma parity tests (1 to 100 rows, every
#    0.5B shape), then the kernel bench of mma at those shapes. 3. ncu registers/occupancy.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
KB=$B/bench-cubeqwen-bench-kernels
F='matmul/(0.5B|1.5B|7B) (q|gate|down)/m(512|2048)'
kb() { # $1 label, $2 filter, rest env
  local label=$1 filt=$2; shift 2
  env "$@" CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-$label.jsonl timeout 100 $KB --bench "$filt" > /tmp/x/kb-$label.log 2>&1
  echo "=== $label rc $?" >> "$O/kb.md"; grep -E "^\| matmul" /tmp/x/kb-$label.log >> "$O/kb.md"
  stamp "kb $label"
}
kb base "$F/(auto|cublas)\$"
for t in 128x128x64x3 64x128x64x3 128x128x32x3 128x128x64x2 64x128x32x3 128x64x64x3; do
  [ $((SECONDS - t0)) -lt 470 ] || break
  ( cd kernels && CUBEQWEN_MMA_TILE=$t CUBEQWEN_TEST_DEVICE=cuda timeout 60 $B/test-kernels-test-matmul mma --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-$t.log 2>&1; echo "rc $?" >> /tmp/x/tests-$t.log )
  stamp "tests $t: $(grep -E '^test result' /tmp/x/tests-$t.log) $(tail -1 /tmp/x/tests-$t.log) worst $(grep -oE 'rel_err=[0-9.e-]+' /tmp/x/tests-$t.log | sort -t= -k2 -g | tail -1)"
  kb mma-$t "$F/mma\$" CUBEQWEN_MMA_TILE=$t
done
for t in 128x128x64x3 64x128x64x3; do
  [ $((SECONDS - t0)) -lt 560 ] || break
  CUBEQWEN_MMA_TILE=$t CUBEQWEN_FULL_SHAPES=1 timeout 20 ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem -k regex:matmul_mma --launch-skip 3 --launch-count 1 --csv $KB --bench 'matmul/7B gate/m2048/mma$' > /tmp/x/ncu-$t.csv 2>&1
  echo "$t: $(grep -E 'gpu__time|registers|warps_active|occupancy' /tmp/x/ncu-$t.csv | awk -F'","' '{print $(NF-2) "=" $NF}' | tr -d '"' | tr '\n' ' ')" | tee -a "$O/ncu-durations.txt"
done
stamp end
cat "$O/kb.md"
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
