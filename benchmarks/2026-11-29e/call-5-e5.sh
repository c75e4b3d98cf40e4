#!/usr/bin/env bash
# Session 2026-11-29 (fifth), call 5 (main after the reverts; the code of the default path is
# ac6486f's but for the timeline): the CUDA tests of the flash kernel and of the mma matmul,
# which share flash::mma_frags, whose .x2 path e883f39 removed last session without a GPU run.
source scripts/gpu-call.sh
( cd kernels && timeout 120 $B/test-kernels-test-flash --test-threads=1 --include-ignored --nocapture > $O/tests-flash.txt 2>&1; echo "rc $?" >> $O/tests-flash.txt )
stamp "flash tests: $(grep -E '^test result' $O/tests-flash.txt) $(tail -1 $O/tests-flash.txt)"
( cd kernels && CUBEQWEN_TEST_DEVICE=cuda timeout 120 $B/test-kernels-test-matmul mma --test-threads=1 --include-ignored --nocapture > $O/tests-mma.txt 2>&1; echo "rc $?" >> $O/tests-mma.txt )
stamp "mma tests: $(grep -E '^test result' $O/tests-mma.txt) $(tail -1 $O/tests-mma.txt)"
