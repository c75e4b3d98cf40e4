#!/usr/bin/env bash
# Session 2026-11-29, call 3 (build 43cd942: the kernel cache kept apart per build). Old =
# e455c0d (stage/old: the flash kernel before 1b8ffca), new = this build; each binary with a
# kernel cache of its own (call 2 shared one: both ran the new kernel). Nothing runs beside.
# The prefill flash kernel old against new: ncu durations (5 launches each at 2048 and 8192
# tokens), the kernel bench alternated twice, ncu's full set of the new one at 8192; prefill
# (and decode) end to end, alternated twice.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz stage/old/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
declare -A KB=([old]=$B/bench-old [new]=$B/bench-cubeqwen-bench-kernels) CQ=([old]=$B/cq-old [new]=$B/bin-cubeqwen-bin-cubeqwen)
for s in 0.5b 1.5b; do ${CQ[new]} random-gguf --shape $s --tokenizer-from stage/tokenizer.gguf "$W/random-$s.gguf" > /tmp/x/gguf-$s.log 2>&1; done
stamp "files written"
# 1. ncu: kernel durations, 5 launches each (after 3), old and new.
for v in old new; do
  for t in 2048 8192; do
    CUBEQWEN_KERNEL_CACHE=$W/cache-$v CUBEQWEN_FULL_SHAPES=1 timeout 90 ncu --clock-control none --metrics gpu__time_duration.sum -k regex:prefill_mma --launch-skip 3 --launch-count 5 --csv ${KB[$v]} --bench "attention/prefill$t/flash mma" > /tmp/x/ncu-dur-$v-$t.csv 2>/tmp/x/ncu-dur-$v-$t.err
    echo "$v $t: $(grep gpu__time_duration /tmp/x/ncu-dur-$v-$t.csv | awk -F'","' '{print $NF}' | tr -d '"' | tr '\n' ' ')" | tee -a "$O/ncu-durations.txt"
  done
done
stamp "ncu durations"
# 2. Kernel bench, old and new alternated twice.
for i in 1 2; do
  for v in old new; do
    CUBEQWEN_KERNEL_CACHE=$W/cache-$v CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-attn-$v-$i.jsonl timeout 60 ${KB[$v]} --bench 'attention/prefill[0-9]+/flash mma' > /tmp/x/kb-attn-$v-$i.log 2>&1
    echo "=== $v r$i" >> "$O/kb.md"; grep -E "^\| attention \| 0.5B prefill" /tmp/x/kb-attn-$v-$i.log >> "$O/kb.md"
  done
  stamp "kernel bench round $i"
done
# 3. ncu full set of the new kernel at 8192 (call 1 has the old one's).
( export CUBEQWEN_KERNEL_CACHE=$W/cache-new CUBEQWEN_FULL_SHAPES=1; timeout 120 ncu --clock-control none -k regex:prefill_mma --launch-skip 2 --launch-count 1 --set full --import-source no -o /tmp/x/flash8192-new ${KB[new]} --bench 'attention/prefill8192/flash mma' > /tmp/x/ncu-run.log 2>&1 )
ncu -i /tmp/x/flash8192-new.ncu-rep --page details > /tmp/x/ncu-flash8192-new.txt 2>&1
ncu -i /tmp/x/flash8192-new.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip > /tmp/x/ncu-flash8192-new-sass.csv.gz
stamp "ncu full set"
# 4. End to end, old and new alternated twice: prefill 2048 and decode at depth 0 and 4096.
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for v in old new; do
    for s in 0.5b 1.5b; do
      [ $((SECONDS - t0)) -lt 420 ] || break
      bench "$s $v r$i" CUBEQWEN_KERNEL_CACHE=$W/cache-$v ${CQ[$v]} bench --model $W/random-$s.gguf -p 2048 -n 128 -d 0,4096 -r 3
    done
  done
  stamp "e2e round $i"
done
stamp end
cat "$O/ncu-durations.txt" "$O/kb.md" "$O/ab.md"
grep -E "Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Th|Memory Throughput|L1/TEX Cache|Warp Cycles Per Issued|Issue Slots|bank|excessive" /tmp/x/ncu-flash8192-new.txt | cut -c1-150 | head -30
tar czf "$O/extra.tgz" --exclude="*.ncu-rep" -C /tmp x; ls -la "$O"
