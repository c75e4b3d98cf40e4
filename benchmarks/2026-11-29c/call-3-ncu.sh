#!/usr/bin/env bash
# Session 2026-11-29c, call 3 (build 2eb6d55): ncu full set of the mma matmul (128x128x64, 2
# stages, its fastest tile at 7B) and of cubek's TMA kernel (auto) at the 7B gate, m = 2048.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/w; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/cache CUBEQWEN_FULL_SHAPES=1
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/bench*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
KB=$B/bench-cubeqwen-bench-kernels
CUBEQWEN_MMA_TILE=128x128x64x2 timeout 150 ncu --clock-control none -k regex:matmul_mma --launch-skip 3 --launch-count 1 --set full --import-source no -o /tmp/x/mma $KB --bench 'matmul/7B gate/m2048/mma$' > /tmp/x/ncu-mma-run.log 2>&1
stamp "ncu mma rc $?"
timeout 150 ncu --clock-control none --launch-skip 3 --launch-count 1 --set full --import-source no -o /tmp/x/auto $KB --bench 'matmul/7B gate/m2048/auto$' > /tmp/x/ncu-auto-run.log 2>&1
stamp "ncu auto rc $?"
for k in mma auto; do
  ncu -i /tmp/x/$k.ncu-rep --page details > "$O/ncu-3-$k-7b-gate-2048.txt" 2>&1
  ncu -i /tmp/x/$k.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip > "$O/ncu-3-$k-sass.csv.gz"
done
stamp end
grep -E "^  [a-z_]|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|Bank" "$O"/ncu-3-*.txt | head -60
ls -la "$O"
# Note (after the call): without a kernel filter the "auto" profile caught the bench's
# copy_kernel, not cubek's matmul; that report was dropped.
