#!/usr/bin/env bash
# Session 2026-11-28 (twelfth), call 3: final build f (74c6292) against llama.cpp in the same
# run, the qkv-on-tensor-cores and 64-row steps (A/B against d = d06c944 and the switch),
# transformers parity (1.5B chunks of 512; 0.5B chunks of 16), CUDA tests of f.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O"
W=/tmp/bench-vs-llama; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/kernel-cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
gunzip -c stage/bin/bin-cubeqwen-bin-cubeqwen.gz > /tmp/cq-f; gunzip -c stage/extra/cq-d.gz > /tmp/cq-d; chmod +x /tmp/cq-f /tmp/cq-d
LLAMA_BENCH_BUILD=$W/llama-cpp bash stage/anchors/llama-bench.sh stage/anchors/llama-cpp.tgz > "$W/prebuild.log" 2>&1 &
bp=$!
for s in 0.5b 1.5b; do /tmp/cq-f random-gguf --shape $s --tokenizer-from stage/tokenizer.gguf "$W/random-$s.gguf" > /dev/null 2>&1; done
stamp "ggufs written"
mkdir -p /tmp/tb
for f in stage/bin/test-*.gz; do gunzip -c "$f" > /tmp/tb/$(basename "$f" .gz); chmod +x /tmp/tb/$(basename "$f" .gz); done
( export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1
  cd "$R/kernels" && echo "=== fused_gemv" && timeout 100 /tmp/tb/test-kernels-test-fused_gemv --test-threads=1 --nocapture; echo "exit $? fused_gemv"
  cd "$R" && echo "=== production_path" && timeout 150 /tmp/tb/test-cubeqwen-test-production_path --test-threads=1 --include-ignored --nocapture; echo "exit $? production_path"
) > "$O/tests.log" 2>&1
grep -E "^exit|test result" "$O/tests.log"
stamp "tests"
for run in "1.5b 512" "0.5b 16"; do
  set -- $run; d=/tmp/hf-$1
  [ -d "$d" ] || python3 scripts/hf_reference.py "$d" --config $1 --seed 0 --prompt-len 600 --steps 64 2>&1 | grep -v Warning >> "$O/hf.log"
  echo "=== $1 chunk $2" >> "$O/hf.log"
  /tmp/cq-f hf-parity "$d" --device cuda --prefill-chunk $2 >> "$O/hf.log" 2>&1; echo "exit $?" >> "$O/hf.log"
done
grep -E "===|worst per|top-1|greedy|PASS|FAIL|^exit" "$O/hf.log"
stamp "hf"
wait $bp; stamp "llama build: $(tail -1 $W/prebuild.log)"
PROMPT=16,2048 SWEEP= bash scripts/bench-vs-llama.sh gpu > /tmp/bvl-out.log 2>&1
stamp "bench-vs-llama"
cat "$O/bench-vs-llama.md"
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  [ $((SECONDS - t0)) -lt 520 ] || break
  bench "d r$i" /tmp/cq-d bench --random 0.5b -p 16,32 -n 0 -d 0,4096 -r 3
  bench "f r$i" /tmp/cq-f bench --random 0.5b -p 16,32,64 -n 0 -d 0,4096 -r 3
  bench "f NO_GEMV_MMA r$i" CUBEQWEN_NO_GEMV_MMA=1 /tmp/cq-f bench --random 0.5b -p 64 -n 0 -d 0,4096 -r 3
  bench "d 1.5b r$i" /tmp/cq-d bench --random 1.5b -p 16 -n 0 -d 0 -r 3
  bench "f 1.5b r$i" /tmp/cq-f bench --random 1.5b -p 16,64 -n 0 -d 0 -r 3
  stamp "ab round $i"
done
cat "$O/ab.md"
stamp end
