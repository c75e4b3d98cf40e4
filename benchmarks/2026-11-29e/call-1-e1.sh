#!/usr/bin/env bash
# Session 2026-11-29 (fifth), call 1 (build db19a01): where the decode step's FFN block loses
# its bandwidth. Timelines with the warps' spread (0.5B, 1.5B; ffn_in stages 1 and 3 at 1.5B),
# the decode kernels in the kernel bench with and without programmatic dependent launch (the
# second: each kernel alone, latency), and tg128 of both shapes.
source scripts/gpu-call.sh
tl() { # NAME MODEL [VAR=V ..]: the timeline of a 16-token decode
  local name=$1 model=$2; shift 2
  env "$@" CUBEQWEN_TIMELINE=1 timeout 60 $CQ bench --random $model -p 0 -n 16 -d 0 -r 1 > "$O/timeline-$name.txt" 2>&1
  stamp "timeline $name"
}
tl 0.5b 0.5b
tl 1.5b 1.5b
tl 0.5b-ffn0 0.5b CUBEQWEN_FFN_STAGES=0
tl 1.5b-ffn3 1.5b CUBEQWEN_FFN_STAGES=3
tl 0.5b-nopdl 0.5b CUBEQWEN_NO_PDL=1
KB_TIMEOUT=120 kb pdl 'small/decode/(0.5B|1.5B)'
KB_TIMEOUT=120 kb nopdl 'small/decode/(0.5B|1.5B)' CUBEQWEN_NO_PDL=1
for i in 1 2; do
  bench "0.5b tg128 r$i" $CQ bench --random 0.5b -p 0 -n 128 -d 0 -r 3
  bench "1.5b tg128 r$i" $CQ bench --random 1.5b -p 0 -n 128 -d 0 -r 3
done
stamp end
cat "$O/ab.md" "$O/kb.md"
