#!/usr/bin/env bash
# Session 2026-11-29b, call 2 (build v2 = d2f26a8: the flash kernel's
# probabilities by one FMA with a guard for rows without a key, the output rescaled only where
# a row's max moved) against v1 = 759dabb (call 1's new build; stage/v1). Each binary with its
# own kernel cache; nothing runs beside.
# 1. CUDA flash tests and production_path of v2. 2. Transformers parity of v2 (0.5B, 1.5B,
# 600 tokens in chunks of 512). 3. Kernel bench v1/v2 alternated twice. 4. Prefill end to end
# v1/v2 alternated twice. 5. ncu durations of v2 and its full set at 8192.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz stage/v1/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
declare -A KB=([v1]=$B/kb-v1 [v2]=$B/bench-cubeqwen-bench-kernels)
declare -A CQ=([v1]=$B/cq-v1 [v2]=$B/bin-cubeqwen-bin-cubeqwen)
export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1
( cd kernels && CUBEQWEN_KERNEL_CACHE=$W/cache-v2 timeout 150 $B/test-kernels-test-flash --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-flash.log 2>&1; echo "rc $?" >> /tmp/x/tests-flash.log )
cp /tmp/x/tests-flash.log "$O/tests-flash.txt"
stamp "flash tests: $(grep -E '^test result' /tmp/x/tests-flash.log) $(tail -1 /tmp/x/tests-flash.log)"
( CUBEQWEN_KERNEL_CACHE=$W/cache-v2 timeout 150 $B/test-cubeqwen-test-production_path --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-pp.log 2>&1; echo "rc $?" >> /tmp/x/tests-pp.log )
stamp "production_path: $(grep -E '^test result' /tmp/x/tests-pp.log) $(tail -1 /tmp/x/tests-pp.log)"
unset CUBEQWEN_TEST_DEVICE CUBEQWEN_FULL_SHAPES
for cfg in 0.5b 1.5b; do
  d=/tmp/hf-$cfg
  python3 scripts/hf_reference.py "$d" --config $cfg --seed 0 --prompt-len 600 --steps 64 2>&1 | grep -v Warning >> "$O/hf.log"
  echo "=== $cfg chunk 512 (v2)" >> "$O/hf.log"
  CUBEQWEN_KERNEL_CACHE=$W/cache-v2 ${CQ[v2]} hf-parity "$d" --device cuda --prefill-chunk 512 >> "$O/hf.log" 2>&1; echo "exit $?" >> "$O/hf.log"
  stamp "hf $cfg"
done
grep -E "===|worst per|top-1|greedy|PASS|FAIL|^exit|mean" "$O/hf.log" | head -30
for i in 1 2; do
  for v in v1 v2; do
    CUBEQWEN_KERNEL_CACHE=$W/cache-$v CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-attn-$v-$i.jsonl timeout 60 ${KB[$v]} --bench 'attention/prefill[0-9]+/flash mma' > /tmp/x/kb-attn-$v-$i.log 2>&1
    echo "=== $v r$i rc $?" >> "$O/kb.md"; grep -E "^\| attention \| 0.5B prefill" /tmp/x/kb-attn-$v-$i.log >> "$O/kb.md"
  done
  stamp "kernel bench round $i"
done
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for v in v1 v2; do
    for s in 0.5b 1.5b; do
      [ $((SECONDS - t0)) -lt 470 ] || break
      bench "$s $v r$i" CUBEQWEN_KERNEL_CACHE=$W/cache-$v ${CQ[$v]} bench --random $s -p 2048 -n 0 -d 0,4096 -r 3
    done
  done
  stamp "e2e round $i"
done
for t in 2048 8192; do
  [ $((SECONDS - t0)) -lt 520 ] || break
  CUBEQWEN_KERNEL_CACHE=$W/cache-v2 CUBEQWEN_FULL_SHAPES=1 timeout 40 ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread -k regex:prefill_mma --launch-skip 3 --launch-count 5 --csv ${KB[v2]} --bench "attention/prefill$t/flash mma" > /tmp/x/ncu-dur-v2-$t.csv 2>/tmp/x/ncu-dur-v2-$t.err
  echo "v2 $t: $(grep -E 'gpu__time_duration|registers' /tmp/x/ncu-dur-v2-$t.csv | awk -F'","' '{print $NF}' | tr -d '"' | tr '\n' ' ')" | tee -a "$O/ncu-durations.txt"
done
if [ $((SECONDS - t0)) -lt 500 ]; then
  ( export CUBEQWEN_KERNEL_CACHE=$W/cache-v2 CUBEQWEN_FULL_SHAPES=1; timeout 70 ncu --clock-control none -k regex:prefill_mma --launch-skip 2 --launch-count 1 --set full --import-source no -o /tmp/x/flash8192-v2 ${KB[v2]} --bench 'attention/prefill8192/flash mma' > /tmp/x/ncu-run.log 2>&1 )
  ncu -i /tmp/x/flash8192-v2.ncu-rep --page details > /tmp/x/ncu-flash8192-v2.txt 2>&1
  ncu -i /tmp/x/flash8192-v2.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip > /tmp/x/ncu-flash8192-v2-sass.csv.gz
  stamp "ncu full set"
fi
stamp end
cat "$O/kb.md" "$O/ab.md"
tar czf "$O/extra.tgz" --exclude="*.ncu-rep" -C /tmp x; ls -la "$O"
