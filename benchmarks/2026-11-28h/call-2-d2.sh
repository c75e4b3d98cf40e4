#!/usr/bin/env bash
# Session 2026-11-28 (fourteenth), call 2 (build of the named early trigger): the early PDL
# trigger kernel by kernel, tg128 at 0.5B and 1.5B alternated twice, nothing else running;
# then the best at depth 4096 and 7B, and timelines.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=/tmp/kc
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
CQ=/tmp/cq; gunzip -c stage/bin/bin-cubeqwen-bin-cubeqwen.gz > $CQ; chmod +x $CQ
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for e in off all gemv_residual attention_kernel,gemv_residual attn_in,attention_kernel,gemv_residual; do
    [ $((SECONDS - t0)) -lt 330 ] || break
    bench "0.5b early=$e r$i" CUBEQWEN_EARLY_TRIGGER=$e $CQ bench --random 0.5b -p 0 -n 128 -d 0 -r 3
    bench "1.5b early=$e r$i" CUBEQWEN_EARLY_TRIGGER=$e $CQ bench --random 1.5b -p 0 -n 128 -d 0 -r 3
  done
  stamp "round $i"
done
for e in off all attention_kernel,gemv_residual; do
  [ $((SECONDS - t0)) -lt 420 ] || break
  bench "0.5b @d4096 early=$e" CUBEQWEN_EARLY_TRIGGER=$e $CQ bench --random 0.5b -p 0 -n 128 -d 4096 -r 3
done
stamp depth
for e in all attention_kernel,gemv_residual; do
  [ $((SECONDS - t0)) -lt 470 ] || break
  CUBEQWEN_TIMELINE=1 CUBEQWEN_EARLY_TRIGGER=$e timeout 40 $CQ bench --random 0.5b -p 0 -n 16 -d 0 -r 1 > /tmp/x/timeline-0.5b-$e.txt 2>&1
  CUBEQWEN_TIMELINE=1 CUBEQWEN_EARLY_TRIGGER=$e timeout 40 $CQ bench --random 1.5b -p 0 -n 16 -d 0 -r 1 > /tmp/x/timeline-1.5b-$e.txt 2>&1
done
[ $((SECONDS - t0)) -lt 490 ] && CUBEQWEN_TIMELINE=1 timeout 40 $CQ bench --random 1.5b -p 0 -n 16 -d 0 -r 1 > /tmp/x/timeline-1.5b-off.txt 2>&1
stamp end
cat "$O/ab.md"
tar czf "$O/extra.tgz" -C /tmp x; ls -la "$O"
