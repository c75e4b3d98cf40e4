#!/usr/bin/env bash
# Session 2026-11-29 (fifth), call 2 (build of CUBEQWEN_FFN_BALANCE and up to 8 ffn_in stages):
# the tests of the streamed ffn_in (graph against cubecl, bit for bit, balanced or not) and of
# the graph decode with the balance on; the ffn_in kernel bench by variant, with and without
# PDL; tg128 of 0.5B and 1.5B by variant, alternated twice; timelines of the variants.
source scripts/gpu-call.sh
T=$B/test-kernels-test-decode
CUBEQWEN_FULL_SHAPES=1 timeout 120 $T --include-ignored ffn_in --nocapture > $O/tests-ffn_in.txt 2>&1; echo "rc $?" >> $O/tests-ffn_in.txt
stamp "tests ffn_in: $(grep -c 'same bits true' $O/tests-ffn_in.txt) same-bits lines, $(grep 'test result' $O/tests-ffn_in.txt | tr '\n' ' ')"
for bal in 0 1; do
  CUBEQWEN_FFN_BALANCE=$bal timeout 120 $B/test-cubeqwen-test-decode_graphs --include-ignored > $O/tests-decode_graphs-bal$bal.txt 2>&1
  stamp "decode_graphs balance=$bal rc $? $(grep 'test result' $O/tests-decode_graphs-bal$bal.txt | tr '\n' ' ')"
done
F='small/decode/(0.5B|1.5B|7B) ffn_in'
for pdl in 0 1; do
  kb "ffn-base-nopdl$pdl" "$F" CUBEQWEN_NO_PDL=$pdl
  kb "ffn-bal-nopdl$pdl" "$F" CUBEQWEN_NO_PDL=$pdl CUBEQWEN_FFN_BALANCE=1
  kb "ffn-bal-s2-nopdl$pdl" "$F" CUBEQWEN_NO_PDL=$pdl CUBEQWEN_FFN_BALANCE=1 CUBEQWEN_FFN_STAGES=2
  kb "ffn-bal-s5-nopdl$pdl" "$F" CUBEQWEN_NO_PDL=$pdl CUBEQWEN_FFN_BALANCE=1 CUBEQWEN_FFN_STAGES=5
done
for i in 1 2; do
  for v in "base" "bal CUBEQWEN_FFN_BALANCE=1" "bal-s5 CUBEQWEN_FFN_BALANCE=1 CUBEQWEN_FFN_STAGES=5" "bal-s3 CUBEQWEN_FFN_BALANCE=1 CUBEQWEN_FFN_STAGES=3"; do
    [ $((SECONDS - t0)) -lt 480 ] || break
    set -- $v; name=$1; shift
    bench "0.5b tg128 $name r$i" "$@" $CQ bench --random 0.5b -p 0 -n 128 -d 0 -r 3
    bench "1.5b tg128 $name r$i" "$@" $CQ bench --random 1.5b -p 0 -n 128 -d 0 -r 3
  done
  stamp "round $i"
done
for v in "bal CUBEQWEN_FFN_BALANCE=1" "bal-s5 CUBEQWEN_FFN_BALANCE=1 CUBEQWEN_FFN_STAGES=5"; do
  [ $((SECONDS - t0)) -lt 540 ] || break
  set -- $v; name=$1; shift
  env "$@" CUBEQWEN_TIMELINE=1 timeout 30 $CQ bench --random 0.5b -p 0 -n 16 -d 0 -r 1 > "$O/timeline-0.5b-$name.txt" 2>&1
  env "$@" CUBEQWEN_TIMELINE=1 timeout 30 $CQ bench --random 1.5b -p 0 -n 16 -d 0 -r 1 > "$O/timeline-1.5b-$name.txt" 2>&1
done
stamp end
cat "$O/ab.md" "$O/kb.md"
