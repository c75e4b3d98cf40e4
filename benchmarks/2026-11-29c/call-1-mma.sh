#!/usr/bin/env bash
# Session 2026-11-29c, call 1 (build 82ac6a2+: the project's own tensor-core matmul,
# `MatmulVariant::Mma`, not yet in Auto). Nothing runs beside; one kernel cache.
# 1. The mma matmul's parity tests at full shapes, and the cuBLAS table (every variant).
# 2. Kernel bench at m = 512 and 2048, 0.5B/1.5B/7B shapes: cuBLAS, auto (cubek's TMA kernel),
#    and mma at several tiles (CUBEQWEN_MMA_TILE).
# 3. Prefill end to end, --matmul auto against --matmul mma, 0.5B and 1.5B, alternated.
# 4. ncu of the mma kernel at the 7B gate, m = 2048 (registers, duration, full set).
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
KB=$B/bench-cubeqwen-bench-kernels; CQ=$B/bin-cubeqwen-bin-cubeqwen
export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1
( cd kernels && timeout 120 $B/test-kernels-test-matmul mma --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-mma.log 2>&1; echo "rc $?" >> /tmp/x/tests-mma.log )
cp /tmp/x/tests-mma.log "$O/tests-mma.txt"
stamp "mma tests: $(grep -E '^test result' /tmp/x/tests-mma.log) $(tail -1 /tmp/x/tests-mma.log)"
( cd kernels && timeout 200 $B/test-kernels-test-cublas --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-cublas.log 2>&1; echo "rc $?" >> /tmp/x/tests-cublas.log )
cp /tmp/x/tests-cublas.log "$O/tests-cublas.txt"
stamp "cublas table: $(grep -E '^test result' /tmp/x/tests-cublas.log) $(tail -1 /tmp/x/tests-cublas.log)"
unset CUBEQWEN_TEST_DEVICE
kb() { # $1 label, $2 filter, rest env
  local label=$1 filt=$2; shift 2
  env "$@" CUBEQWEN_BENCH_JSON=/tmp/x/kb-$label.jsonl timeout 90 $KB --bench "$filt" > /tmp/x/kb-$label.log 2>&1
  echo "=== $label rc $?" >> "$O/kb.md"; grep -E "^\| matmul" /tmp/x/kb-$label.log >> "$O/kb.md"
  stamp "kb $label"
}
kb base 'matmul/.*/m(512|2048)/(auto|cublas)$'
kb mma-default 'matmul/.*/m(512|2048)/mma$'
for t in 128x128x64 64x128x64 128x128x32 128x64x64 64x64x64; do
  [ $((SECONDS - t0)) -lt 380 ] || break
  kb mma-$t 'matmul/(0.5B|7B) .*/m2048/mma$' CUBEQWEN_MMA_TILE=$t
done
unset CUBEQWEN_FULL_SHAPES
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for s in 0.5b 1.5b; do
  for v in auto mma; do
    [ $((SECONDS - t0)) -lt 500 ] || break
    bench "$s $v" $CQ bench --random $s --matmul $v -p 2048 -n 0 -d 0,4096 -r 3
  done
  stamp "e2e $s"
done
if [ $((SECONDS - t0)) -lt 530 ]; then
  CUBEQWEN_FULL_SHAPES=1 timeout 40 ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active -k regex:matmul_mma --launch-skip 3 --launch-count 3 --csv $KB --bench 'matmul/7B gate/m2048/mma$' > /tmp/x/ncu-dur.csv 2>/tmp/x/ncu-dur.err
  grep -E 'gpu__time|registers|warps_active' /tmp/x/ncu-dur.csv | awk -F'","' '{print $(NF-2), $NF}' | tee -a "$O/ncu-durations.txt"
  stamp "ncu durations"
fi
stamp end
cat "$O/kb.md" "$O/ab.md"
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
