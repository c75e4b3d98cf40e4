#!/usr/bin/env bash
# Session 2026-11-29b, call 1 (build 759dabb: the flash mma kernel double-buffered with
# cp.async, mask on diagonal tiles only, __expf). Base = 43cd942 (stage/base: the flash kernel
# of the last session). Each binary and mode with its own kernel cache; nothing runs beside.
# 1. CUDA flash tests of the new build. 2. Kernel bench alternated twice: base, new,
# new with CUBEQWEN_FLASH_EXACT_EXP=1. 3. ncu durations and the full set of the new kernel at
# 8192. 4. Prefill end to end, base against new, alternated twice.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz stage/base/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
declare -A KB=([base]=$B/kb-base [new]=$B/bench-cubeqwen-bench-kernels [exact]=$B/bench-cubeqwen-bench-kernels)
declare -A CQ=([base]=$B/cq-base [new]=$B/bin-cubeqwen-bin-cubeqwen [exact]=$B/bin-cubeqwen-bin-cubeqwen)
declare -A EX=([base]=0 [new]=0 [exact]=1)
# 1. Correctness first.
( cd kernels && CUBEQWEN_KERNEL_CACHE=$W/cache-new CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1 timeout 150 $B/test-kernels-test-flash --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-flash.log 2>&1; echo "rc $?" >> /tmp/x/tests-flash.log )
cp /tmp/x/tests-flash.log "$O/tests-flash.txt"
stamp "flash tests: $(grep -E '^test result' /tmp/x/tests-flash.log) $(tail -1 /tmp/x/tests-flash.log)"
( CUBEQWEN_KERNEL_CACHE=$W/cache-new CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1 timeout 120 $B/test-cubeqwen-test-production_path --test-threads=1 --include-ignored --nocapture > /tmp/x/tests-pp.log 2>&1; echo "rc $?" >> /tmp/x/tests-pp.log )
stamp "production_path: $(grep -E '^test result' /tmp/x/tests-pp.log) $(tail -1 /tmp/x/tests-pp.log)"
for s in 0.5b 1.5b; do ${CQ[new]} random-gguf --shape $s --tokenizer-from stage/tokenizer.gguf "$W/random-$s.gguf" > /tmp/x/gguf-$s.log 2>&1; done
stamp "files written"
# 2. Kernel bench alternated twice.
for i in 1 2; do
  for v in base new exact; do
    CUBEQWEN_FLASH_EXACT_EXP=${EX[$v]} CUBEQWEN_KERNEL_CACHE=$W/cache-$v CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-attn-$v-$i.jsonl timeout 60 ${KB[$v]} --bench 'attention/prefill[0-9]+/flash mma' > /tmp/x/kb-attn-$v-$i.log 2>&1
    echo "=== $v r$i rc $?" >> "$O/kb.md"; grep -E "^\| attention \| 0.5B prefill" /tmp/x/kb-attn-$v-$i.log >> "$O/kb.md"
  done
  stamp "kernel bench round $i"
done
# 3. ncu: durations (5 launches after 3) of all three at 2048 and 8192; the full set of new at 8192.
for v in base new exact; do
  for t in 2048 8192; do
    CUBEQWEN_FLASH_EXACT_EXP=${EX[$v]} CUBEQWEN_KERNEL_CACHE=$W/cache-$v CUBEQWEN_FULL_SHAPES=1 timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread -k regex:prefill_mma --launch-skip 3 --launch-count 5 --csv ${KB[$v]} --bench "attention/prefill$t/flash mma" > /tmp/x/ncu-dur-$v-$t.csv 2>/tmp/x/ncu-dur-$v-$t.err
    echo "$v $t: $(grep -E 'gpu__time_duration|registers' /tmp/x/ncu-dur-$v-$t.csv | awk -F'","' '{print $NF}' | tr -d '"' | tr '\n' ' ')" | tee -a "$O/ncu-durations.txt"
  done
done
stamp "ncu durations"
( export CUBEQWEN_KERNEL_CACHE=$W/cache-new CUBEQWEN_FULL_SHAPES=1; timeout 100 ncu --clock-control none -k regex:prefill_mma --launch-skip 2 --launch-count 1 --set full --import-source no -o /tmp/x/flash8192-new ${KB[new]} --bench 'attention/prefill8192/flash mma' > /tmp/x/ncu-run.log 2>&1 )
ncu -i /tmp/x/flash8192-new.ncu-rep --page details > /tmp/x/ncu-flash8192-new.txt 2>&1
ncu -i /tmp/x/flash8192-new.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip > /tmp/x/ncu-flash8192-new-sass.csv.gz
stamp "ncu full set"
# 4. End to end, prefill 2048 at depth 0 and 4096, alternated twice.
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for v in base new exact; do
    for s in 0.5b 1.5b; do
      [ $((SECONDS - t0)) -lt 500 ] || break
      bench "$s $v r$i" CUBEQWEN_FLASH_EXACT_EXP=${EX[$v]} CUBEQWEN_KERNEL_CACHE=$W/cache-$v ${CQ[$v]} bench --model $W/random-$s.gguf -p 2048 -n 0 -d 0,4096 -r 3
    done
  done
  stamp "e2e round $i"
done
stamp end
cat "$O/ncu-durations.txt" "$O/kb.md" "$O/ab.md"
grep -E "Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Th|Memory Throughput|L1/TEX Cache|Warp Cycles Per Issued|Issue Slots|Block Limit" /tmp/x/ncu-flash8192-new.txt | cut -c1-150 | head -30
tar czf "$O/extra.tgz" --exclude="*.ncu-rep" -C /tmp x; ls -la "$O"
