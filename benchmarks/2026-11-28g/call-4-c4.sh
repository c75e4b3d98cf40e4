#!/usr/bin/env bash
# Session 2026-11-28 (thirteenth), call 4: the last commit (f120173: silu_mul shared, the ffn
# kernel's helpers) on CUDA: the fused/tensor-core GEMV tests and the streamed ffn_in tests.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=/tmp/kc CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$O/tests.log"
for t in decode fused_gemv; do
  gunzip -c stage/kt/$t.gz > /tmp/$t; chmod +x /tmp/$t
  (cd kernels && timeout 150 /tmp/$t --test-threads=1 --include-ignored --nocapture) >> "$O/tests.log" 2>&1
  echo "exit $? $t" >> "$O/tests.log"
done
grep -E "^exit|test result|^test |same bits|differ" "$O/tests.log" | tail -40
