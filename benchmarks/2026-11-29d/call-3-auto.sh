#!/usr/bin/env bash
# Session 2026-11-29d, call 3 (build 574574e: Auto takes the mma kernel, planes of 64 × 64, for
# products m·n·k ≥ 1.6e10 with k ≥ 1536). 1. mma parity tests at the new default tiles.
# 2. The cuBLAS table (every variant and auto against f64 and cuBLAS, 7B shapes included).
# 3. transformers parity, 1.5B, a 1400-token prompt in one 2048-row chunk (its gate/up/down
# take the mma kernel). 4. 1.5B and 7B against llama.cpp in the same run (pp2048, tg128).
# 5. The same prefill with cubek (--matmul cubek: the build before), same files.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/bench-vs-llama; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/kernel-cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
CQ=$B/bin-cubeqwen-bin-cubeqwen
LLAMA_BENCH_BUILD=$W/llama-cpp bash stage/anchors/llama-bench.sh stage/anchors/llama-cpp.tgz > "$W/prebuild.log" 2>&1 &
bp=$!
( for s in 1.5b 7b; do $CQ random-gguf --shape $s --tokenizer-from stage/tokenizer.gguf "$W/random-$s.gguf.part" > /tmp/x/gguf-$s.log 2>&1 && mv "$W/random-$s.gguf.part" "$W/random-$s.gguf"; done ) &
gp=$!
( cd kernels && CUBEQWEN_TEST_DEVICE=cuda timeout 60 $B/test-kernels-test-matmul mma --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-mma.log 2>&1; echo "rc $?" >> /tmp/x/tests-mma.log )
cp /tmp/x/tests-mma.log "$O/tests-3-mma.txt"
stamp "mma tests: $(grep -E '^test result' /tmp/x/tests-mma.log) $(tail -1 /tmp/x/tests-mma.log) worst $(grep -oE 'rel_err=[0-9.e-]+' /tmp/x/tests-mma.log | sort -t= -k2 -g | tail -1)"
( cd kernels && CUBEQWEN_TEST_DEVICE=cuda timeout 240 $B/test-kernels-test-cublas --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-cublas.log 2>&1; echo "rc $?" >> /tmp/x/tests-cublas.log )
cp /tmp/x/tests-cublas.log "$O/tests-3-cublas.txt"
stamp "cublas table: $(grep -E '^test result' /tmp/x/tests-cublas.log) $(tail -1 /tmp/x/tests-cublas.log)"
d=/tmp/hf-1.5b-1400
python3 scripts/hf_reference.py "$d" --config 1.5b --seed 0 --prompt-len 1400 --steps 64 2>&1 | grep -v Warning >> "$O/hf.log"
echo "=== 1.5b, 1400 prompt tokens, chunk 2048" >> "$O/hf.log"
timeout 120 $CQ hf-parity "$d" --device cuda --prefill-chunk 2048 >> "$O/hf.log" 2>&1; echo "exit $?" >> "$O/hf.log"
stamp "hf 1.5b"
wait $gp; stamp "ggufs: $(cat /tmp/x/gguf-*.log | tr '\n' ' ')"
wait $bp; stamp "llama build: $(tail -1 $W/prebuild.log)"
SHAPES="1.5b 7b" PROMPT=2048 GEN=128 DEPTHS=0 SWEEP= REPS=3 bash scripts/bench-vs-llama.sh gpu > /tmp/x/bvl-out.log 2>&1
stamp "bench-vs-llama rc=$?"
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for s in 7b 1.5b; do
  for v in cubek auto; do
    [ $((SECONDS - t0)) -lt 540 ] || break
    bench "$s $v" $CQ bench --model $W/random-$s.gguf --matmul $v -p 2048 -n 0 -d 0 -r 3
    stamp "ab $s $v"
  done
done
stamp end
grep -E "===|worst per|limits|greedy|PASS|FAIL|^exit|top-1" "$O/hf.log" | head -20
grep -E "^ 2048|^  128" /tmp/x/tests-cublas.log | head -30
cat "$O/bench-vs-llama.md" "$O/ab.md"
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
