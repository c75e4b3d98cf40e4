#!/usr/bin/env bash
# Session 2026-11-29d, call 4 (build 574574e, as call 3). Nothing beside the A/B.
# 1. Prefill end to end, --matmul cubek (the build before: Auto's choice at these shapes until
#    574574e) against auto (the mma kernel where m·n·k ≥ 1.6e10), alternated twice, 7B and
#    1.5B random F16 files. 2. mma parity tests. 3. The cuBLAS table with the time left.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/kernel-cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/bin-*.gz stage/bin/test-*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
CQ=$B/bin-cubeqwen-bin-cubeqwen
for s in 7b 1.5b; do $CQ random-gguf --shape $s --tokenizer-from stage/tokenizer.gguf "$W/random-$s.gguf" > /tmp/x/gguf-$s.log 2>&1; done
stamp "ggufs"
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for s in 7b 1.5b; do
  for r in 1 2; do
    for v in cubek auto; do
      [ $((SECONDS - t0)) -lt 330 ] || break
      bench "$s $v r$r" $CQ bench --model $W/random-$s.gguf --matmul $v -p 2048 -n 0 -d 0 -r 3
    done
  done
  stamp "ab $s"
done
cat "$O/ab.md"
( cd kernels && CUBEQWEN_TEST_DEVICE=cuda timeout 60 $B/test-kernels-test-matmul mma --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-mma.log 2>&1; echo "rc $?" >> /tmp/x/tests-mma.log )
cp /tmp/x/tests-mma.log "$O/tests-4-mma.txt"
stamp "mma tests: $(grep -E '^test result' /tmp/x/tests-mma.log) $(tail -1 /tmp/x/tests-mma.log) worst $(grep -oE 'rel_err=[0-9.e-]+' /tmp/x/tests-mma.log | sort -t= -k2 -g | tail -1)"
left=$((545 - (SECONDS - t0)))
( cd kernels && CUBEQWEN_TEST_DEVICE=cuda timeout $left $B/test-kernels-test-cublas --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-cublas.log 2>&1; echo "rc $?" >> /tmp/x/tests-cublas.log )
cp /tmp/x/tests-cublas.log "$O/tests-4-cublas.txt"
stamp "cublas table: $(grep -E '^test result' /tmp/x/tests-cublas.log) $(tail -1 /tmp/x/tests-cublas.log)"
grep -E "^ 2048" /tmp/x/tests-cublas.log
stamp end
