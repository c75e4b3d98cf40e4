#!/usr/bin/env bash
# Session 2026-11-29 (fifth), call 3 (build of the in-kernel attention merge): its CUDA tests
# (graph against cubecl, bit for bit; the graph decode across a chunk boundary, both ways), the
# decode attention in the kernel bench both ways, then tg128 at depth 4096 (0.5B, 1.5B) and at
# depth 0 (0.5B) with the merge in the attention kernel (default) and with the merge kernel
# (CUBEQWEN_ATTN_MERGE_KERNEL=1), alternated twice; a timeline at depth 4096.
source scripts/gpu-call.sh
timeout 150 $B/test-kernels-test-decode --include-ignored attention_merges_in_a_graph --nocapture > $O/tests-attention-merge.txt 2>&1
stamp "attention_merges_in_a_graph rc $? $(grep -c 'same bits true' $O/tests-attention-merge.txt) same-bits lines, $(grep -c 'same bits false' $O/tests-attention-merge.txt) false; $(grep 'test result' $O/tests-attention-merge.txt)"
for mk in 0 1; do
  CUBEQWEN_ATTN_MERGE_KERNEL=$mk timeout 120 $B/test-cubeqwen-test-decode_graphs --include-ignored > $O/tests-decode_graphs-mk$mk.txt 2>&1
  stamp "decode_graphs merge_kernel=$mk rc $? $(grep 'test result' $O/tests-decode_graphs-mk$mk.txt)"
done
kb merge-in-kernel 'attention/0.5B decode'
kb merge-kernel 'attention/0.5B decode' CUBEQWEN_ATTN_MERGE_KERNEL=1
for i in 1 2; do
  for mk in 0 1; do
    [ $((SECONDS - t0)) -lt 450 ] || break
    bench "0.5b tg128 @d4096 merge_kernel=$mk r$i" CUBEQWEN_ATTN_MERGE_KERNEL=$mk $CQ bench --random 0.5b -p 0 -n 128 -d 4096 -r 3
    bench "1.5b tg128 @d4096 merge_kernel=$mk r$i" CUBEQWEN_ATTN_MERGE_KERNEL=$mk $CQ bench --random 1.5b -p 0 -n 128 -d 4096 -r 3
    bench "0.5b tg128 merge_kernel=$mk r$i" CUBEQWEN_ATTN_MERGE_KERNEL=$mk $CQ bench --random 0.5b -p 0 -n 128 -d 0 -r 3
  done
  stamp "round $i"
done
for mk in 0 1; do
  [ $((SECONDS - t0)) -lt 520 ] || break
  CUBEQWEN_ATTN_MERGE_KERNEL=$mk CUBEQWEN_TIMELINE=1 timeout 40 $CQ bench --random 0.5b -p 0 -n 16 -d 4096 -r 1 > $O/timeline-0.5b-d4096-mk$mk.txt 2>&1
done
stamp end
cat "$O/ab.md" "$O/kb.md"
