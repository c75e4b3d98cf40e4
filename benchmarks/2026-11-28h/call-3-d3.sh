#!/usr/bin/env bash
# Session 2026-11-28 (fourteenth), call 3 (build 580d1df): the streamed attn_in and GEMV +
# residual on CUDA: tests (graph bits, wave criterion, full shapes), kernel bench, 7B decode
# against llama.cpp in the same run, A/B of CUBEQWEN_GEMV_STAGES (0: both one-shot), greedy tokens.
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
( $CQ random-gguf --shape 7b --tokenizer-from stage/tokenizer.gguf "$W/random-7b.gguf.part" > /tmp/x/gguf7b.log 2>&1 && mv "$W/random-7b.gguf.part" "$W/random-7b.gguf" ) &
gp=$!
# 1. Kernel tests: streamed attn_in in a graph + wave criterion; every fused kernel at full shapes.
( export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1; cd kernels && timeout 150 $B/test-kernels-test-decode --test-threads=1 --include-ignored --nocapture attn_in_streamed fused_decode_kernels gemv_residual_streamed_in ) > /tmp/x/t-attn.log 2>&1
echo "rc $?" >> /tmp/x/t-attn.log
grep -E "same bits|waves|attn_in [qkv] .*stages|test result|panicked|Error|^rc|^test " /tmp/x/t-attn.log | cut -c1-200 > /tmp/x/t-attn.txt
stamp "tests: $(grep -E '^rc|test result' /tmp/x/t-attn.txt | tr '\n' ' ')"
# 2. Kernel bench: decode kernels at 0.5B, 1.5B, 7B, one-shot (0) and streamed (default 2).
for st in 2 0; do
  CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_GEMV_STAGES=$st CUBEQWEN_BENCH_JSON=/tmp/x/kernels-g$st.jsonl timeout 60 $B/bench-cubeqwen-bench-kernels --bench 'small/decode' > /tmp/x/kb-$st.log 2>&1
  echo "=== gemv stages $st" >> /tmp/x/kb.txt; grep -E "^\| decode " /tmp/x/kb-$st.log >> /tmp/x/kb.txt
  stamp "kernel bench gemv stages $st"
done
stamp "waiting for the 7B file"; wait $gp; stamp "7B file: $(tail -1 /tmp/x/gguf7b.log)"
wait $bp; stamp "llama build done"
# 3. cubeqwen and llama.cpp, 7B, same run (default).
SHAPES=7b PROMPT=16 DEPTHS=0 SWEEP= REPS=3 bash scripts/bench-vs-llama.sh gpu > /tmp/x/bvl-out.log 2>&1
stamp "bench-vs-llama 7b"
# 4. A/B at 7B: both one-shot (0) against both streamed (2), alternated.
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for st in 0 2; do
    [ $((SECONDS - t0)) -lt 470 ] || break
    bench "7b gemv stages $st r$i" CUBEQWEN_GEMV_STAGES=$st $CQ bench --model $W/random-7b.gguf -p 0 -n 128 -d 0 -r 3
  done
  stamp "ab round $i"
done
# 5. Greedy tokens at 7B, one-shot against streamed (f32 sums in another order).
if [ $((SECONDS - t0)) -lt 500 ]; then
  for st in 0 2; do CUBEQWEN_GEMV_STAGES=$st timeout 45 $CQ generate --model $W/random-7b.gguf --prompt "def fib(n):" --max-tokens 24 --format json > /tmp/x/gen-$st.json 2>/tmp/x/gen-$st.err; done
  python3 -c "
import json; a=json.load(open('/tmp/x/gen-0.json'))['tokens']; b=json.load(open('/tmp/x/gen-2.json'))['tokens']
print('greedy 7b tokens, one-shot vs streamed:', 'equal' if a==b else 'differ from %d' % next(i for i,(x,y) in enumerate(zip(a,b)) if x!=y), len(a), len(b))" >> "$O/calls.log" 2>&1
fi
stamp end
cat "$O/ab.md"; cut -c1-150 /tmp/x/kb.txt | grep -E "===|graph"; grep -E "rc|result|waves|same bits" /tmp/x/t-attn.txt | head -30; cat "$O/bench-vs-llama.md"
cp -r $W/results /tmp/x/bvl-results 2>/dev/null
rm -f "$O"/*.png
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
