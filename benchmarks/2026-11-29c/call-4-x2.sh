#!/usr/bin/env bash
# Session 2026-11-29c, call 4 (build da2f694: the mma matmul's B fragments by ldmatrix.x2).
# One kernel cache; nothing beside. 1. mma parity tests. 2. Kernel bench: auto (cubek) and
# cuBLAS, mma at the default tile and at 128x128x64 with 2 and 3 stages. 3. Prefill end to
# end, --matmul auto against mma. 4. ncu registers and duration; the CUDA flash tests
# (mma_frags changed its signature).
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
KB=$B/bench-cubeqwen-bench-kernels; CQ=$B/bin-cubeqwen-bin-cubeqwen
( cd kernels && CUBEQWEN_TEST_DEVICE=cuda timeout 60 $B/test-kernels-test-matmul mma --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-mma.log 2>&1; echo "rc $?" >> /tmp/x/tests-mma.log )
cp /tmp/x/tests-mma.log "$O/tests-4-mma.txt"
stamp "mma tests: $(grep -E '^test result' /tmp/x/tests-mma.log) $(tail -1 /tmp/x/tests-mma.log) worst $(grep -oE 'rel_err=[0-9.e-]+' /tmp/x/tests-mma.log | sort -t= -k2 -g | tail -1)"
F='matmul/(0.5B|1.5B|7B) (q|gate|down)/m(512|2048)'
kb() { # $1 label, $2 filter, rest env
  local label=$1 filt=$2; shift 2
  env "$@" CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-$label.jsonl timeout 100 $KB --bench "$filt" > /tmp/x/kb-$label.log 2>&1
  echo "=== $label rc $?" >> "$O/kb.md"; grep -E "^\| matmul" /tmp/x/kb-$label.log >> "$O/kb.md"
  stamp "kb $label"
}
kb base "$F/(auto|cublas)\$"
kb mma-default "$F/mma\$"
kb mma-128x128x64x3 "$F/mma\$" CUBEQWEN_MMA_TILE=128x128x64x3
kb mma-128x128x64x2 "$F/mma\$" CUBEQWEN_MMA_TILE=128x128x64x2
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for s in 0.5b 1.5b; do
  for v in auto mma; do
    [ $((SECONDS - t0)) -lt 380 ] || break
    bench "$s $v" $CQ bench --random $s --matmul $v -p 2048 -n 0 -d 0 -r 3
  done
  stamp "e2e $s"
done
if [ $((SECONDS - t0)) -lt 400 ]; then
  CUBEQWEN_MMA_TILE=128x128x64x2 CUBEQWEN_FULL_SHAPES=1 timeout 30 ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active -k regex:matmul_mma --launch-skip 3 --launch-count 1 --csv $KB --bench 'matmul/7B gate/m2048/mma$' > /tmp/x/ncu.csv 2>&1
  echo "$(grep -E 'gpu__time|registers|warps_active|inst_executed|hmma' /tmp/x/ncu.csv | awk -F'","' '{print $(NF-2) "=" $NF}' | tr -d '"' | tr '\n' ' ')" | tee -a "$O/ncu-4-durations.txt"
  stamp ncu
fi
if [ $((SECONDS - t0)) -lt 420 ]; then
  ( cd kernels && CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1 timeout 100 $B/test-kernels-test-flash --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-flash.log 2>&1; echo "rc $?" >> /tmp/x/tests-flash.log )
  cp /tmp/x/tests-flash.log "$O/tests-4-flash.txt"
  stamp "flash tests: $(grep -E '^test result' /tmp/x/tests-flash.log) $(tail -1 /tmp/x/tests-flash.log)"
fi
stamp end
cat "$O/kb.md" "$O/ab.md"
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
