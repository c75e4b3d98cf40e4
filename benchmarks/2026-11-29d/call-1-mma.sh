#!/usr/bin/env bash
# Session 2026-11-29d, call 1 (build f366583: the mma matmul loads W's fragments once a 32-deep
# step, reused by the m-tiles; planes of 64 × 64 as a tile option). One kernel cache; nothing
# beside. 1. mma parity tests at the default tile and with planes of 64 × 64. 2. Kernel bench:
# auto (cubek), cuBLAS, mma at the default tile and at several 64 × 64-plane tiles. 3. ncu
# registers, instructions, tensor pipe. 4. Prefill end to end, auto against mma.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
KB=$B/bench-cubeqwen-bench-kernels; CQ=$B/bin-cubeqwen-bin-cubeqwen
for t in default 128x128x64x3x64; do
  e=(); [ $t = default ] || e=(CUBEQWEN_MMA_TILE=$t)
  ( cd kernels && env "${e[@]}" CUBEQWEN_TEST_DEVICE=cuda timeout 60 $B/test-kernels-test-matmul mma --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-mma-$t.log 2>&1; echo "rc $?" >> /tmp/x/tests-mma-$t.log )
  cp /tmp/x/tests-mma-$t.log "$O/tests-1-mma-$t.txt"
  stamp "mma tests $t: $(grep -E '^test result' /tmp/x/tests-mma-$t.log) $(tail -1 /tmp/x/tests-mma-$t.log) worst $(grep -oE 'rel_err=[0-9.e-]+' /tmp/x/tests-mma-$t.log | sort -t= -k2 -g | tail -1)"
done
F='matmul/(7B (gate|down|q)/m2048|7B gate/m512|1.5B gate/m2048|0.5B (q|gate)/m2048)'
kb() { # $1 label, $2 filter, rest env
  local label=$1 filt=$2; shift 2
  env "$@" CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-$label.jsonl timeout 110 $KB --bench "$filt" > /tmp/x/kb-$label.log 2>&1
  echo "=== $label rc $?" >> "$O/kb.md"; grep -E "^\| matmul|skipped" /tmp/x/kb-$label.log >> "$O/kb.md"
  stamp "kb $label"
}
kb base "$F/(auto|cublas|mma)\$"
kb tiles-a "$F/mma\[" CUBEQWEN_BENCH_MMA_TILES="128x128x64x3x64;128x128x64x2x64"
kb tiles-b "$F/mma\[" CUBEQWEN_BENCH_MMA_TILES="256x128x64x2x64;128x256x64x2x64"
for t in 128x128x64x3 128x128x64x3x64; do
  [ $((SECONDS - t0)) -lt 430 ] || break
  CUBEQWEN_MMA_TILE=$t CUBEQWEN_FULL_SHAPES=1 timeout 30 ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem -k regex:matmul_mma --launch-skip 3 --launch-count 1 --csv $KB --bench 'matmul/7B gate/m2048/mma$' > /tmp/x/ncu-$t.csv 2>&1
  echo "$t: $(grep -E 'gpu__time|registers|warps_active|inst_executed|hmma|occupancy' /tmp/x/ncu-$t.csv | awk -F'","' '{print $(NF-2) "=" $NF}' | tr -d '"' | tr '\n' ' ')" | tee -a "$O/ncu-1.txt"
  stamp "ncu $t"
done
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for s in 0.5b 1.5b; do
  for v in auto mma mma64; do
    [ $((SECONDS - t0)) -lt 520 ] || break
    case $v in
      mma64) bench "$s $v" env CUBEQWEN_MMA_TILE=128x128x64x3x64 $CQ bench --random $s --matmul mma -p 2048 -n 0 -d 0 -r 3 ;;
      *) bench "$s $v" $CQ bench --random $s --matmul $v -p 2048 -n 0 -d 0 -r 3 ;;
    esac
  done
  stamp "e2e $s"
done
stamp end
cat "$O/kb.md" "$O/ab.md"
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
