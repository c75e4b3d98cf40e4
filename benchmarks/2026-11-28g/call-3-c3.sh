#!/usr/bin/env bash
# Session 2026-11-28 (thirteenth), call 3: the streamed ffn_in with one stage (the new default,
# set here by CUBEQWEN_FFN_STAGES=1 on the call-2 build) against llama.cpp in the same run;
# transformers parity of 0.5B and 1.5B; production_path; A/B at depth 4096.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O"
W=/tmp/bench-vs-llama; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/kernel-cache CUBEQWEN_FFN_STAGES=1
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
CQ=/tmp/cq; gunzip -c stage/bin/bin-cubeqwen-bin-cubeqwen.gz > $CQ; chmod +x $CQ
LLAMA_BENCH_BUILD=$W/llama-cpp bash stage/anchors/llama-bench.sh stage/anchors/llama-cpp.tgz > "$W/prebuild.log" 2>&1 &
bp=$!
for s in 0.5b 1.5b; do $CQ random-gguf --shape $s --tokenizer-from stage/tokenizer.gguf "$W/random-$s.gguf" > /dev/null 2>&1; done
stamp "ggufs written"
for cfg in 0.5b 1.5b; do
  d=/tmp/hf-$cfg
  python3 scripts/hf_reference.py "$d" --config $cfg --seed 0 --prompt-len 600 --steps 64 2>&1 | grep -v Warning >> "$O/hf.log"
  echo "=== $cfg chunk 512 (CUBEQWEN_FFN_STAGES=1)" >> "$O/hf.log"
  $CQ hf-parity "$d" --device cuda --prefill-chunk 512 >> "$O/hf.log" 2>&1; echo "exit $?" >> "$O/hf.log"
  stamp "hf $cfg"
done
grep -E "===|worst per|top-1|greedy|PASS|FAIL|^exit|mean" "$O/hf.log" | head -30
gunzip -c stage/bin/test-cubeqwen-test-production_path.gz > /tmp/pp; chmod +x /tmp/pp
( export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1; timeout 120 /tmp/pp --test-threads=1 --include-ignored --nocapture; echo "exit $? production_path" ) > "$O/tests.log" 2>&1
grep -E "^exit|test result" "$O/tests.log"
stamp "tests"
wait $bp; stamp "llama build: $(tail -1 $W/prebuild.log)"
PROMPT=16 SWEEP= bash scripts/bench-vs-llama.sh gpu > /tmp/bvl-out.log 2>&1
stamp "bench-vs-llama"
cat "$O/bench-vs-llama.md"
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  [ $((SECONDS - t0)) -lt 440 ] || break
  bench "0.5b stages 0 r$i" CUBEQWEN_FFN_STAGES=0 $CQ bench --random 0.5b -p 0 -n 128 -d 4096 -r 3
  bench "0.5b stages 1 r$i" CUBEQWEN_FFN_STAGES=1 $CQ bench --random 0.5b -p 0 -n 128 -d 4096 -r 3
  stamp "ab round $i"
done
cat "$O/ab.md"

stamp end
