#!/usr/bin/env bash
# On the GPU machine: `cubeqwen bench` of two builds, alternated twice (before, after, before,
# after) on one machine in one run, for a speed step's before/after figures (BENCHMARKS.md).
#   bash scripts/ab-gpu.sh BEFORE AFTER [bench args]
# BEFORE and AFTER are cubeqwen binaries (gzipped or not), e.g. an older stage/bin/
# bin-cubeqwen-bin-cubeqwen.gz kept aside and this tree's; default bench args:
# --random 0.5b -p 0 -n 128 -d 0,4096 -r 3. The tables go to stdout and to $OUT/ab.md if set.
# Each binary gets a kernel cache of its own: builds before 43cd942 share one folder, where a
# kernel whose code changed but not its name would run as the first build compiled it.
set -euo pipefail
before=${1:?usage: ab-gpu.sh BEFORE AFTER [bench args]}; after=${2:?usage: ab-gpu.sh BEFORE AFTER [bench args]}
shift 2
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(--random 0.5b -p 0 -n 128 -d 0,4096 -r 3)
work=$(mktemp -d)
for v in before after; do
  src=${!v}
  if [[ $src == *.gz ]]; then gunzip -c "$src" > "$work/$v"; else cp "$src" "$work/$v"; fi
  chmod +x "$work/$v"
done
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
log=${OUT:-$work}/ab.md
for i in 1 2; do
  for v in before after; do
    echo "=== $v (round $i): cubeqwen bench ${args[*]}" | tee -a "$log"
    CUBEQWEN_KERNEL_CACHE="$work/cache-$v" "$work/$v" bench "${args[@]}" 2>/dev/null | tee -a "$log"
  done
done
