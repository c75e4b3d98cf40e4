#!/usr/bin/env bash
# Session 2026-11-29d, call 2 (build f366583, as call 1). One kernel cache; nothing beside.
# 1. Kernel bench at the prefill shapes (q, k, gate, down of 0.5B, 1.5B, 7B; m = 512, 2048):
#    auto (cubek), cuBLAS, mma with planes of 64 × 64 (128 × 128 × 64, 2 stages), and the
#    64 × 128 tile where 128 × 128 tiles are few. 2. ncu full set and SASS of that mma tile at
#    the 7B gate, m = 2048.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
KB=$B/bench-cubeqwen-bench-kernels
kb() { # $1 label, $2 filter, rest env
  local label=$1 filt=$2; shift 2
  env "$@" CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-$label.jsonl timeout 140 $KB --bench "$filt" > /tmp/x/kb-$label.log 2>&1
  echo "=== $label rc $?" >> "$O/kb.md"; grep -E "^\| matmul|skipped" /tmp/x/kb-$label.log >> "$O/kb.md"
  stamp "kb $label"
}
T="CUBEQWEN_BENCH_MMA_TILES=128x128x64x2x64;64x128x64x2x64"
kb 05b 'matmul/0.5B (q|k|o|gate|down)/m(512|2048)/(auto|cublas|mma\[)' "$T"
kb 15b 'matmul/1.5B (q|k|o|gate|down)/m(512|2048)/(auto|cublas|mma\[)' "$T"
kb 7b 'matmul/7B (q|k|o|gate|down)/m(512|2048)/(auto|cublas|mma\[128)' "$T"
if [ $((SECONDS - t0)) -lt 440 ]; then
  CUBEQWEN_MMA_TILE=128x128x64x2x64 timeout 100 ncu --clock-control none -k regex:matmul_mma --launch-skip 3 --launch-count 1 --set full --import-source no -o /tmp/x/mma64 env CUBEQWEN_FULL_SHAPES=1 $KB --bench 'matmul/7B gate/m2048/mma$' > /tmp/x/ncu-mma-run.log 2>&1
  stamp "ncu rc $?"
  ncu -i /tmp/x/mma64.ncu-rep --page details > "$O/ncu-2-mma64-7b-gate-2048.txt" 2>&1
  ncu -i /tmp/x/mma64.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip > "$O/ncu-2-mma64-sass.csv.gz"
fi
stamp end
cat "$O/kb.md"
grep -E "Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|Compute \(SM\) Throughput|Memory Throughput|Bank" "$O"/ncu-2-*.txt | head -30
tar czf "$O/extra.tgz" -C /tmp x --exclude='*.ncu-rep'; ls -la "$O"
