#!/usr/bin/env bash
# Session 2026-11-28 (thirteenth), call 2: the streamed ffn_in (CUBEQWEN_FFN_STAGES) on CUDA,
# now compiling in graphs: graph test, decode A/B over stage counts, kernel bench, timeline, tests.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=/tmp/kc
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$O/gpu.txt"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
CQ=$B/bin-cubeqwen-bin-cubeqwen
export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1
# 1. The streamed kernel in a graph against its cubecl launch, and against the reference.
(cd kernels && timeout 120 $B/test-kernels-test-decode --test-threads=1 --include-ignored --nocapture ffn_in_streamed) > /tmp/x/t-ffn.log 2>&1
grep -E "same bits|differ|rel_err|test result|panicked|Error" /tmp/x/t-ffn.log | cut -c1-300 | tail -40 > "$O/t-ffn.txt"
stamp "ffn tests"; tail -3 "$O/t-ffn.txt"
# 2. Decode A/B over stage counts, alternated twice.
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for st in 0 2 3 1; do
    bench "0.5b stages $st r$i" CUBEQWEN_FFN_STAGES=$st $CQ bench --random 0.5b -p 0 -n 128 -d 0 -r 3
    bench "1.5b stages $st r$i" CUBEQWEN_FFN_STAGES=$st $CQ bench --random 1.5b -p 0 -n 128 -d 0 -r 3
  done
  stamp "ab round $i"
  [ $((SECONDS - t0)) -lt 250 ] || break
done
cat "$O/ab.md"
# 3. Kernel bench: the decode kernels as graph replays at 0.5B, 1.5B, 7B, by stage count.
for st in 0 1 2 3 4; do
  [ $((SECONDS - t0)) -lt 400 ] || break
  CUBEQWEN_FFN_STAGES=$st CUBEQWEN_BENCH_JSON=/tmp/x/kernels-s$st.jsonl timeout 60 $B/bench-cubeqwen-bench-kernels --bench 'small/decode' > /tmp/x/kb-$st.log 2>&1
  echo "=== stages $st" >> "$O/kb.txt"; grep -E "^\| decode .*ffn_in" /tmp/x/kb-$st.log >> "$O/kb.txt"
  stamp "kernel bench stages $st"
done
# 4. Timeline of one decode step, stages 2, and 3 at 1.5B.
[ $((SECONDS - t0)) -lt 430 ] && CUBEQWEN_TIMELINE=1 CUBEQWEN_FFN_STAGES=2 timeout 40 $CQ bench --random 0.5b -p 0 -n 16 -d 0 -r 1 > /tmp/x/timeline-s2.txt 2>&1
[ $((SECONDS - t0)) -lt 450 ] && CUBEQWEN_TIMELINE=1 CUBEQWEN_FFN_STAGES=0 timeout 40 $CQ bench --random 1.5b -p 0 -n 16 -d 0 -r 1 > /tmp/x/timeline-1.5b-s0.txt 2>&1
[ $((SECONDS - t0)) -lt 470 ] && CUBEQWEN_TIMELINE=1 CUBEQWEN_FFN_STAGES=2 timeout 40 $CQ bench --random 1.5b -p 0 -n 16 -d 0 -r 1 > /tmp/x/timeline-1.5b-s2.txt 2>&1
stamp timelines
# 5. decode_graphs (graph against cubecl launches, bit for bit) with the default stages.
if [ $((SECONDS - t0)) -lt 490 ]; then
  timeout 60 $B/test-cubeqwen-test-decode_graphs --test-threads=1 --include-ignored --nocapture > /tmp/x/decode_graphs.log 2>&1
  echo "decode_graphs rc=$?" >> "$O/t-ffn.txt"; grep -E "^test |test result|panicked" /tmp/x/decode_graphs.log >> "$O/t-ffn.txt"
fi
stamp end
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
