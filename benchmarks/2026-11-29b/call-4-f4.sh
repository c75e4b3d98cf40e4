#!/usr/bin/env bash
# Session 2026-11-29b, call 4 (build v3 = 8543165, reverted: Q·Kᵀ with the key blocks inside the k-steps) against
# v2 = d2f26a8 (stage/v2). Each binary with its own kernel cache; nothing runs beside.
# 1. CUDA flash tests of v3. 2. Kernel bench v2/v3 alternated twice.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz stage/v2/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
declare -A KB=([v2]=$B/kb-v2 [v3]=$B/bench-cubeqwen-bench-kernels)
( cd kernels && CUBEQWEN_KERNEL_CACHE=$W/cache-v3 CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1 timeout 100 $B/test-kernels-test-flash --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-flash.log 2>&1; echo "rc $?" >> /tmp/x/tests-flash.log )
cp /tmp/x/tests-flash.log "$O/tests-flash.txt"
stamp "flash tests: $(grep -E '^test result' /tmp/x/tests-flash.log) $(tail -1 /tmp/x/tests-flash.log)"
for i in 1 2; do
  for v in v2 v3; do
    CUBEQWEN_KERNEL_CACHE=$W/cache-$v CUBEQWEN_FULL_SHAPES=1 timeout 50 ${KB[$v]} --bench 'attention/prefill[0-9]+/flash mma' > /tmp/x/kb-attn-$v-$i.log 2>&1
    echo "=== $v r$i rc $?" >> "$O/kb.md"; grep -E "^\| attention \| 0.5B prefill" /tmp/x/kb-attn-$v-$i.log >> "$O/kb.md"
  done
  stamp "kernel bench round $i"
done
stamp end
cat "$O/kb.md"
