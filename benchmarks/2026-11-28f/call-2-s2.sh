#!/usr/bin/env bash
# Session 2026-11-28 (twelfth), call 2: the tensor-core GEMV (build d = d06c944): A/B with
# CUBEQWEN_NO_GEMV_MMA=1 (= the previous step's kernels), ncu of pp16, CUDA tests.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=/tmp/kc
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
gunzip -c stage/bin/bin-cubeqwen-bin-cubeqwen.gz > /tmp/cq-d; chmod +x /tmp/cq-d
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>"$O/ab.err" | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  bench "before (NO_GEMV_MMA) r$i" CUBEQWEN_NO_GEMV_MMA=1 /tmp/cq-d bench --random 0.5b -p 16,32,64 -n 0 -d 0,4096 -r 3
  bench "after r$i" /tmp/cq-d bench --random 0.5b -p 16,32,64 -n 0 -d 0,4096 -r 3
  stamp "ab 0.5b round $i"
done
for i in 1 2; do
  bench "before 1.5b r$i" CUBEQWEN_NO_GEMV_MMA=1 /tmp/cq-d bench --random 1.5b -p 16,32 -n 0 -d 0 -r 3
  bench "after 1.5b r$i" /tmp/cq-d bench --random 1.5b -p 16,32 -n 0 -d 0 -r 3
done
stamp "ab done"
cat "$O/ab.md"
CUBEQWEN_NO_GRAPHS=1 timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  /tmp/cq-d bench --random 0.5b -p 16 -n 0 -d 0 -r 1 > "$O/ncu-pp16-d.csv" 2>/dev/null
python3 scripts/ncu_summary.py "$O/ncu-pp16-d.csv" | tee "$O/ncu-pp16-d.md"
stamp "ncu"
# CUDA tests into one log (only 8 files come back).
export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1
mkdir -p /tmp/tb
for f in stage/bin/test-*.gz; do gunzip -c "$f" > /tmp/tb/$(basename "$f" .gz); chmod +x /tmp/tb/$(basename "$f" .gz); done
run_t() { local name=$1; shift; echo "=== $name $*" >> "$O/tests.log"; (cd "$2" && timeout "$1" /tmp/tb/$name --test-threads=1 --include-ignored --nocapture "${@:3}") >> "$O/tests.log" 2>&1; echo "exit $? ($name)" | tee -a "$O/tests.log"; }
cd "$R/kernels"
echo "=== fused_gemv" >> "$O/tests.log"; timeout 100 /tmp/tb/test-kernels-test-fused_gemv --test-threads=1 --nocapture >> "$O/tests.log" 2>&1; echo "exit $? fused_gemv" | tee -a "$O/tests.log"
echo "=== matmul gemv" >> "$O/tests.log"; timeout 100 /tmp/tb/test-kernels-test-matmul --test-threads=1 --nocapture gemv >> "$O/tests.log" 2>&1; echo "exit $? matmul gemv" | tee -a "$O/tests.log"
echo "=== flash" >> "$O/tests.log"; timeout 100 /tmp/tb/test-kernels-test-flash --test-threads=1 --include-ignored --nocapture >> "$O/tests.log" 2>&1; echo "exit $? flash" | tee -a "$O/tests.log"
stamp "kernel tests"
cd "$R"
echo "=== production_path" >> "$O/tests.log"; timeout 150 /tmp/tb/test-cubeqwen-test-production_path --test-threads=1 --include-ignored --nocapture >> "$O/tests.log" 2>&1; echo "exit $? production_path" | tee -a "$O/tests.log"
stamp "production_path"
cd "$R/kernels"
left=$((560 - (SECONDS - t0)))
echo "=== cublas (timeout $left)" >> "$O/tests.log"; timeout $left /tmp/tb/test-kernels-test-cublas --test-threads=1 --include-ignored --nocapture >> "$O/tests.log" 2>&1; echo "exit $? cublas" | tee -a "$O/tests.log"
stamp end
grep -E "^test |test result|^exit|panicked" "$O/tests.log" | tail -40
