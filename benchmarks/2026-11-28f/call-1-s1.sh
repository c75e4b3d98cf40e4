#!/usr/bin/env bash
# Session 2026-11-28 (twelfth), call 1: CUDA tests of the fused GEMVs, RoPE+append and the
# flash key splits; A/B of the short-prompt steps; ncu of pp16; transformers parity.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=/tmp/kc
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$O/gpu.txt"
for b in stage/extra/*.gz; do gunzip -c "$b" > /tmp/$(basename "$b" .gz); chmod +x /tmp/$(basename "$b" .gz); done
gunzip -c stage/bin/bin-cubeqwen-bin-cubeqwen.gz > /tmp/cq-c; chmod +x /tmp/cq-c
ls -la /tmp/cq-*
# 1. Tests on CUDA (run-gpu.sh writes $OUT/tests.log).
stamp "tests"
ONLY="${S_ONLY:-fused_gemv|flash|rope|forward_small|production_path}" timeout 200 bash stage/run-gpu.sh tests > "$O/tests-out.log" 2>&1
grep -E "^test |test result|^=== |rel_err=|worst|panicked" "$O/tests.log" | tail -80 > "$O/tests-summary.txt"
stamp "tests done"
# 2. A/B: base = a with CUBEQWEN_NO_FUSED_GEMV=1 (≈ 221dade), a = 273daaf (fused GEMVs),
#    b = c with CUBEQWEN_FLASH_SPLITS=1 (a + rope/append, no key splits), c = final.
bench() { # name env... -- args
  local name=$1; shift
  echo "=== $name" >> "$O/ab.md"
  env "$@" 2>>"$O/ab.err" | grep -E "^\| random" >> "$O/ab.md"
}
for i in 1 2; do
  bench "base r$i" CUBEQWEN_NO_FUSED_GEMV=1 /tmp/cq-a bench --random 0.5b -p 16,32 -n 0 -d 0,4096 -r 3
  bench "a r$i" /tmp/cq-a bench --random 0.5b -p 16,32 -n 0 -d 0,4096 -r 3
  bench "b r$i" CUBEQWEN_FLASH_SPLITS=1 /tmp/cq-c bench --random 0.5b -p 16,32,64 -n 0 -d 4096 -r 3
  bench "c r$i" /tmp/cq-c bench --random 0.5b -p 16,32,64 -n 0 -d 0,4096 -r 3
  stamp "ab round $i 0.5b"
done
for i in 1 2; do
  bench "base 1.5b r$i" CUBEQWEN_NO_FUSED_GEMV=1 /tmp/cq-a bench --random 1.5b -p 16 -n 0 -d 0,4096 -r 3
  bench "c 1.5b r$i" /tmp/cq-c bench --random 1.5b -p 16 -n 0 -d 0,4096 -r 3
done
stamp "ab done"
cat "$O/ab.md"
# 3. transformers parity of c: the recorded 512-token chunks, and 16-token chunks (fused GEMVs, splits).
for chunk in 512 16; do
  for cfg in 0.5b; do
    d=/tmp/hf-$cfg
    [ -d "$d" ] || python3 scripts/hf_reference.py "$d" --config $cfg --seed 0 --prompt-len 600 --steps 64 2>&1 | grep -v Warning >> "$O/hf.log"
    echo "=== $cfg chunk $chunk" >> "$O/hf.log"
    /tmp/cq-c hf-parity "$d" --device cuda --prefill-chunk $chunk >> "$O/hf.log" 2>&1
  done
  stamp "hf chunk $chunk"
done
grep -E "===|worst|greedy|top-1|PASS|FAIL|mean" "$O/hf.log" | head -40
# 4. ncu of pp16 (GPU time a kernel), base and c.
if [ $((SECONDS - t0)) -lt 470 ]; then
  for v in base c; do
    if [ $v = base ]; then e="CUBEQWEN_NO_FUSED_GEMV=1"; b=/tmp/cq-a; else e="X=1"; b=/tmp/cq-c; fi
    env $e CUBEQWEN_NO_GRAPHS=1 timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      $b bench --random 0.5b -p 16 -n 0 -d 0 -r 1 > "$O/ncu-pp16-$v.csv" 2>>"$O/ncu.err"
    python3 scripts/ncu_summary.py "$O/ncu-pp16-$v.csv" > "$O/ncu-pp16-$v.md" 2>&1
    stamp "ncu $v"
  done
fi
stamp end
