#!/usr/bin/env bash
# Session 2026-11-28 (thirteenth), call 1: the streamed ffn_in (CUBEQWEN_FFN_STAGES) on CUDA:
# graph test, decode A/B over stage counts, kernel bench of the decode kernels, timeline, tests.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=/tmp/kc
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$O/gpu.txt"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
CQ=$B/bin-cubeqwen-bin-cubeqwen
export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1
# 1. The streamed kernel in a graph against its cubecl launch, and against the reference.
(cd kernels && timeout 120 $B/test-kernels-test-decode --test-threads=1 --include-ignored --nocapture ffn_in_streamed) > /tmp/t-ffn.log 2>&1
grep -E "same bits|differ|rel_err|test result|panicked|Error" /tmp/t-ffn.log | tail -40 > "$O/t-ffn.txt"
stamp "ffn tests"; tail -3 "$O/t-ffn.txt"
# 2. Decode A/B over stage counts, alternated twice.
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for st in 0 2 3 1; do
    bench "0.5b stages $st r$i" CUBEQWEN_FFN_STAGES=$st $CQ bench --random 0.5b -p 0 -n 128 -d 0,4096 -r 3
    bench "1.5b stages $st r$i" CUBEQWEN_FFN_STAGES=$st $CQ bench --random 1.5b -p 0 -n 128 -d 0 -r 3
    [ $((SECONDS - t0)) -lt 300 ] || break
  done
  stamp "ab round $i"
done
cat "$O/ab.md"
# 3. Kernel bench: the decode kernels as graph replays at 0.5B, 1.5B, 7B, stage counts 0 and 2 (and 3).
for st in 0 2 3; do
  [ $((SECONDS - t0)) -lt 380 ] || break
  CUBEQWEN_FFN_STAGES=$st CUBEQWEN_BENCH_JSON=$O/kernels-s$st.jsonl timeout 60 $B/bench-cubeqwen-bench-kernels --bench 'small/decode' > /tmp/kb-$st.log 2>&1
  grep -E "graph|decode" /tmp/kb-$st.log | grep -v "^Bench\|Warm\|Analy\|Collect" | tail -30 > "$O/kb-s$st.txt"
  stamp "kernel bench stages $st"
done
# 4. Timeline of one decode step, stages 0 and 2.
for st in 0 2; do
  [ $((SECONDS - t0)) -lt 420 ] || break
  CUBEQWEN_TIMELINE=1 CUBEQWEN_FFN_STAGES=$st timeout 40 $CQ bench --random 0.5b -p 0 -n 16 -d 0 -r 1 > "$O/timeline-s$st.txt" 2>&1
  stamp "timeline $st"
done
# 5. Other tests, as long as time lasts.
for t in test-cubeqwen-test-decode_graphs test-cubeqwen-test-production_path test-kernels-test-fused_gemv; do
  [ $((SECONDS - t0)) -lt 470 ] || break
  pkg=.; case $t in test-kernels-*) pkg=kernels;; esac
  (cd $pkg && timeout 60 $B/$t --test-threads=1 --include-ignored --nocapture) > /tmp/$t.log 2>&1
  echo "=== $t rc=$?" >> "$O/tests.txt"; grep -E "^test |test result|panicked" /tmp/$t.log | tail -20 >> "$O/tests.txt"
  stamp "$t"
done
stamp end
mkdir -p /tmp/x && cd "$O" && mv kernels-s*.jsonl kb-s*.txt timeline-s*.txt t-ffn.txt tests.txt /tmp/x/ 2>/dev/null
cp /tmp/*.log /tmp/x/ 2>/dev/null; tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
