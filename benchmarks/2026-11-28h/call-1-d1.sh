#!/usr/bin/env bash
# Session 2026-11-28 (fourteenth), call 1 (build 8ca1cf2): the streamed GEMV + residual on CUDA
# (graph bits, wave criterion, 7B shape; kernel bench by CUBEQWEN_GEMV_STAGES); the early PDL
# trigger (CUBEQWEN_EARLY_TRIGGER: decode_graphs bit for bit, A/B at 0.5B and 1.5B, timeline);
# the 7B decode end to end against llama.cpp in the same run, A/B of the GEMV stages.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/bench-vs-llama; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/kernel-cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
CQ=$B/bin-cubeqwen-bin-cubeqwen
# Background: llama-bench's build and the 7B file (15 GB).
LLAMA_BENCH_BUILD=$W/llama-cpp bash stage/anchors/llama-bench.sh stage/anchors/llama-cpp.tgz > "$W/prebuild.log" 2>&1 &
bp=$!
( $CQ random-gguf --shape 7b --tokenizer-from stage/tokenizer.gguf "$W/random-7b.gguf.part" > /tmp/x/gguf7b.log 2>&1 && mv "$W/random-7b.gguf.part" "$W/random-7b.gguf" ) &
gp=$!
# 1. Kernel tests: the streamed GEMV in a graph, the wave criterion, the 7B shape.
( export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1; cd kernels && timeout 150 $B/test-kernels-test-decode --test-threads=1 --include-ignored --nocapture gemv_residual ) > /tmp/x/t-gemv.log 2>&1
echo "rc $?" >> /tmp/x/t-gemv.log
grep -E "same bits|differ|rel_err|waves|test result|panicked|Error|^rc" /tmp/x/t-gemv.log | cut -c1-260 | tail -60 > /tmp/x/t-gemv.txt
stamp "gemv tests: $(grep -E '^rc|test result' /tmp/x/t-gemv.txt | tr '\n' ' ')"
# 2. decode_graphs (graph decode against cubecl launches, bit for bit) with the early trigger.
CUBEQWEN_EARLY_TRIGGER=1 timeout 100 $B/test-cubeqwen-test-decode_graphs --test-threads=1 --include-ignored --nocapture > /tmp/x/decode_graphs-early.log 2>&1
stamp "decode_graphs early rc=$? $(grep -E 'test result' /tmp/x/decode_graphs-early.log | tr '\n' ' ')"
# 3. A/B of the early trigger, tg128, alternated twice.
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  [ $((SECONDS - t0)) -lt 260 ] || break
  for e in 0 1; do
    bench "0.5b early $e r$i" CUBEQWEN_EARLY_TRIGGER=$e $CQ bench --random 0.5b -p 0 -n 128 -d 0 -r 3
    bench "1.5b early $e r$i" CUBEQWEN_EARLY_TRIGGER=$e $CQ bench --random 1.5b -p 0 -n 128 -d 0 -r 3
  done
  stamp "early ab round $i"
done
[ $((SECONDS - t0)) -lt 300 ] && CUBEQWEN_TIMELINE=1 CUBEQWEN_EARLY_TRIGGER=1 timeout 40 $CQ bench --random 0.5b -p 0 -n 16 -d 0 -r 1 > /tmp/x/timeline-0.5b-early.txt 2>&1
[ $((SECONDS - t0)) -lt 320 ] && CUBEQWEN_TIMELINE=1 timeout 40 $CQ bench --random 0.5b -p 0 -n 16 -d 0 -r 1 > /tmp/x/timeline-0.5b.txt 2>&1
stamp timelines
# 4. Kernel bench: decode kernels at 0.5B, 1.5B, 7B, one-shot GEMV against 2 stages.
for st in 0 2; do
  [ $((SECONDS - t0)) -lt 340 ] || break
  CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_GEMV_STAGES=$st CUBEQWEN_BENCH_JSON=/tmp/x/kernels-g$st.jsonl timeout 60 $B/bench-cubeqwen-bench-kernels --bench 'small/decode' > /tmp/x/kb-$st.log 2>&1
  echo "=== gemv stages $st" >> /tmp/x/kb.txt; grep -E "^\| decode " /tmp/x/kb-$st.log >> /tmp/x/kb.txt
  stamp "kernel bench gemv stages $st"
done
stamp "waiting for the 7B file"; wait $gp; stamp "7B file: $(tail -1 /tmp/x/gguf7b.log)"
wait $bp; stamp "llama build: $(tail -1 $W/prebuild.log)"
# 5. cubeqwen and llama.cpp, 7B, same run (the default: 2 stages).
SHAPES=7b PROMPT=16 DEPTHS=0 SWEEP= REPS=3 bash scripts/bench-vs-llama.sh gpu > /tmp/x/bvl-out.log 2>&1
stamp "bench-vs-llama 7b"
# 6. A/B at 7B: one-shot GEMV (0) against streamed (2), and the early trigger.
for cfg in "CUBEQWEN_GEMV_STAGES=0" "CUBEQWEN_GEMV_STAGES=2" "CUBEQWEN_EARLY_TRIGGER=1"; do
  [ $((SECONDS - t0)) -lt 530 ] || break
  bench "7b $cfg" $cfg $CQ bench --model $W/random-7b.gguf -p 0 -n 128 -d 0 -r 3
  stamp "7b $cfg"
done
stamp end
cat "$O/ab.md"; cut -c1-150 /tmp/x/kb.txt; grep -E "rc|result|waves|panicked" /tmp/x/t-gemv.txt | head; cat "$O/bench-vs-llama.md"
cp -r $W/results /tmp/x/bvl-results 2>/dev/null
rm -f "$O"/*.png
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
