#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, after scripts/stage-gpu.sh staged stage/.
#   bash stage/run-gpu.sh [tests|selftest|hf|bench|all] [extra args for the test binaries]
#   ONLY=REGEX bash stage/run-gpu.sh tests|bench   runs only the staged binaries whose name matches
# Every test runs on CUDA (CUBEQWEN_TEST_DEVICE=cuda: a missing GPU fails, never falls back),
# with the big shapes (CUBEQWEN_FULL_SHAPES=1) and the CUDA-only tests (--include-ignored).
# Not staged (scripts/stage-gpu.sh): the loaders' tests (no kernels) and the tests that read
# the real model (too big to carry here): golden_device, haiku, tokenizer_golden,
# reference_golden, cli (no kernel; it calls the binary by its build path) and serve (it
# calls the binary by its build path, or $CUBEQWEN_BIN, and one test reads the real model).
# CI runs them.
# `hf` runs scripts/hf_reference.py (torch + transformers) and compares cubeqwen with it.
set -uo pipefail
root=$(pwd); what=${1:-all}; shift || true
out=${OUT:-$root/stage/out}; mkdir -p "$out"
bin=$root/stage/run; mkdir -p "$bin"
for f in stage/bin/*.gz; do gunzip -c "$f" > "$bin/$(basename "$f" .gz)"; chmod +x "$bin/$(basename "$f" .gz)"; done
export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_KERNEL_CACHE=$root/stage/kernel-cache CUBEQWEN_FULL_SHAPES=1
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
if [ "$what" = all ] || [ "$what" = selftest ]; then
  rm -rf "$CUBEQWEN_KERNEL_CACHE"
  for run in first second; do
    s=$(date +%s%N)
    "$bin/bin-cubeqwen-bin-cubeqwen" selftest --device cuda 2>&1 | tee -a "$out/selftest.log" || status=1
    e=$(date +%s%N)
    echo "selftest $run run (kernel cache $( [ $run = first ] && echo empty || echo warm )): $(( (e - s) / 1000000 )) ms" | tee -a "$out/selftest.log"
  done
  echo "kernel cache: $(find "$CUBEQWEN_KERNEL_CACHE" -type f 2>/dev/null | wc -l) files, $(du -sh "$CUBEQWEN_KERNEL_CACHE" 2>/dev/null | cut -f1)" | tee -a "$out/selftest.log"
  # Baseline in the same run: the kernel cache switched off, twice.
  for run in first second; do
    s=$(date +%s%N)
    CUBEQWEN_NO_KERNEL_CACHE=1 "$bin/bin-cubeqwen-bin-cubeqwen" selftest --device cuda >> "$out/selftest.log" 2>&1 || status=1
    e=$(date +%s%N)
    echo "selftest $run run with CUBEQWEN_NO_KERNEL_CACHE=1 (baseline): $(( (e - s) / 1000000 )) ms" | tee -a "$out/selftest.log"
  done
fi
if [ "$what" = all ] || [ "$what" = tests ]; then
  while read -r name pkg kind; do
    [ "$kind" = test ] || continue
    [[ "$name" =~ ${ONLY:-.} ]] || continue
    echo "=== $name (in $pkg)" | tee -a "$out/tests.log"
    (cd "$root/$pkg" && "$bin/$name" --test-threads=1 --include-ignored --nocapture "$@") 2>&1 | tee -a "$out/tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done < stage/bin/MANIFEST
  grep -E "^test result|^=== " "$out/tests.log" > "$out/summary.txt"
fi
if [ "$what" = all ] || [ "$what" = hf ]; then
  cq="$bin/bin-cubeqwen-bin-cubeqwen"
  # Parity at 600 prompt tokens: cubeqwen prefills them in two chunks (512 + 88: the default
  # chunk is 2048), then decodes.
  for cfg in 0.5b 1.5b; do
    dir=/tmp/hf-$cfg
    python3 scripts/hf_reference.py "$dir" --config $cfg --seed 0 --prompt-len 600 --steps 64 2>&1 | grep -v Warning | tee -a "$out/hf.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    "$cq" hf-parity "$dir" --device cuda --prefill-chunk 512 2>&1 | tee -a "$out/hf.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
  # The step-by-step trace on a shorter prompt (the activations of 600 tokens would be GBs).
  python3 scripts/hf_reference.py /tmp/hf-0.5b-trace --config 0.5b --seed 0 --prompt-len 64 --steps 8 --activations 2>&1 | grep -v Warning | tee -a "$out/hf.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  echo "=== cubeqwen trace against the transformers activations (0.5b)" | tee -a "$out/hf.log"
  "$cq" trace --model /tmp/hf-0.5b-trace/model --against /tmp/hf-0.5b-trace/activations.safetensors --device cuda 2>&1 | tee -a "$out/hf.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  while read -r name pkg kind; do
    [ "$kind" = bench ] || continue
    [[ "$name" =~ ${ONLY:-.} ]] || continue
    echo "=== $name" | tee -a "$out/bench.log"
    (cd "$root/$pkg" && "$bin/$name" --bench "$@") 2>&1 | tee -a "$out/bench.log"
  done < stage/bin/MANIFEST
fi
echo "run-gpu: exit $status"
exit $status
