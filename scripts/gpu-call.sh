# The common head of a GPU call script (benchmarks/<date>/call-N-*.sh): source it from the repo
# root on the GPU machine, with stage/ carried (scripts/stage-gpu.sh):
#
#   source scripts/gpu-call.sh
#   kb base 'matmul/7B gate/m2048/(auto|cublas|mma)$'           # kernel bench → $O/kb.md
#   bench "7b cubek" $CQ bench --model F --matmul cubek -p 2048 -n 0 -r 3   # → $O/ab.md
#   stamp "done"                                                # → $O/calls.log
#
# It sets R (the repo root), O ($OUT, else /tmp/out), W (work folder, /tmp/w), B (stage/run:
# the staged binaries, unpacked), KB (the kernel bench), CQ (cubeqwen); exports
# XDG_RUNTIME_DIR and CUBEQWEN_KERNEL_CACHE ($W/cache: one binary, one cache; give a second
# build a cache of its own); and logs the GPU, its clocks and its power limit first, since
# speeds differ from lease to lease (BENCHMARKS.md, "2026-11-29d": cubek's 1.5B prefill 61 170
# tok/s in one call, 79 131 in another). Read ratios within a call, not across calls.
set -u
R=$(pwd)
O=${OUT:-/tmp/out}
W=${W:-/tmp/w}
mkdir -p "$O" "$W" /tmp/x
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} CUBEQWEN_KERNEL_CACHE=${CUBEQWEN_KERNEL_CACHE:-$W/cache}
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
    --format=csv,noheader | tee -a "$O/calls.log"
else
  stamp "no nvidia-smi on this machine"
fi
B=$R/stage/run
mkdir -p "$B"
for f in "$R"/stage/bin/*.gz; do
  [ -e "$f" ] || continue
  gunzip -c "$f" > "$B/$(basename "$f" .gz)" && chmod +x "$B/$(basename "$f" .gz)"
done
KB=$B/bench-cubeqwen-bench-kernels
CQ=$B/bin-cubeqwen-bin-cubeqwen

# kb LABEL FILTER [VAR=VALUE ...]: the kernel bench at the full shapes, the benches matching
# FILTER (a regex over ids such as `matmul/7B gate/m2048/auto`), within KB_TIMEOUT seconds
# (default 100); its table rows go to $O/kb.md, its records to /tmp/x/kb-LABEL.jsonl.
kb() {
  local label=$1 filt=$2
  shift 2
  env "$@" CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON="/tmp/x/kb-$label.jsonl" \
    timeout "${KB_TIMEOUT:-100}" "$KB" --bench "$filt" > "/tmp/x/kb-$label.log" 2>&1
  echo "=== $label rc $?" >> "$O/kb.md"
  grep -E "^\| |skipped" "/tmp/x/kb-$label.log" >> "$O/kb.md"
  stamp "kb $label"
}

# bench NAME [VAR=VALUE ...] COMMAND...: an end-to-end `cubeqwen bench` (or any command printing its table);
# the table rows go to $O/ab.md under "=== NAME", its stderr to /tmp/x/ab.err.
bench() {
  local name=$1
  shift
  echo "=== $name" >> "$O/ab.md"
  env "$@" 2>> /tmp/x/ab.err | grep -E "^\| " | grep -vE "^\| (model|---)" >> "$O/ab.md"
}
