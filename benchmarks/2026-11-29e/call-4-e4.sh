#!/usr/bin/env bash
# Session 2026-11-29 (fifth), call 4 (build of the batched attention merge): the fused decode
# kernels' tests on CUDA (the merge batches 1 and 3 against 8, bit for bit), the graph decode
# across a chunk boundary; the decode attention in the kernel bench with batch 1 and 8; tg128 at
# depth 4096 (0.5B, 1.5B) with batch 8 (default) and 1 (the loop before), alternated twice, and
# at depth 16384 (0.5B) once each; a timeline at depth 4096.
source scripts/gpu-call.sh
timeout 100 $B/test-kernels-test-decode fused --nocapture > $O/tests-fused.txt 2>&1
stamp "fused decode tests rc $? $(grep 'test result' $O/tests-fused.txt)"
timeout 120 $B/test-cubeqwen-test-decode_graphs --include-ignored > $O/tests-decode_graphs.txt 2>&1
stamp "decode_graphs rc $? $(grep 'test result' $O/tests-decode_graphs.txt)"
kb batch8 'attention/0.5B decode'
kb batch1 'attention/0.5B decode' CUBEQWEN_MERGE_BATCH=1
for i in 1 2; do
  for b in 8 1; do
    [ $((SECONDS - t0)) -lt 400 ] || break
    bench "0.5b tg128 @d4096 batch=$b r$i" CUBEQWEN_MERGE_BATCH=$b $CQ bench --random 0.5b -p 0 -n 128 -d 4096 -r 3
    bench "1.5b tg128 @d4096 batch=$b r$i" CUBEQWEN_MERGE_BATCH=$b $CQ bench --random 1.5b -p 0 -n 128 -d 4096 -r 3
  done
  stamp "round $i"
done
for b in 8 1; do
  [ $((SECONDS - t0)) -lt 450 ] || break
  bench "0.5b tg128 @d16384 batch=$b" CUBEQWEN_MERGE_BATCH=$b $CQ bench --random 0.5b -p 0 -n 128 -d 16384 -r 3
done
stamp "d16384"
[ $((SECONDS - t0)) -lt 480 ] && CUBEQWEN_TIMELINE=1 timeout 30 $CQ bench --random 0.5b -p 0 -n 16 -d 4096 -r 1 > $O/timeline-0.5b-d4096-batch8.txt 2>&1
stamp end
cat "$O/ab.md" "$O/kb.md"
