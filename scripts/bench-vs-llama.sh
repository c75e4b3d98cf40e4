#!/usr/bin/env bash
# cubeqwen against llama.cpp's llama-bench: the same random-weight F16 GGUF files (Qwen2.5
# shapes, the real tokenizer), the same tests, the same GPU, one run.
#
# Here (needs the real model for its tokenizer and the package registry for llama.cpp's source):
#   bash scripts/bench-vs-llama.sh
#     stages stage/ with `scripts/stage-gpu.sh --bin-only` (the CUDA build of cubeqwen), writes the real
#     model's tokenizer alone to stage/tokenizer.gguf (6 MB), fetches llama.cpp's source into
#     stage/anchors with ../shared/anchors/fetch-llama-cpp.sh (plus its llama-bench.sh), and prints
#     the device command.
# On the GPU machine, from the repo root with stage/ carried:
#   bash scripts/bench-vs-llama.sh gpu [--7b]
#     builds llama-bench (in the background while the GGUF files are written: 0.5b and 1.5b;
#     7b, 15 GB, with --7b), then on each file runs `cubeqwen bench` and `llama-bench`
#     (-p 2048 -n 128 -d 0,4096 -fa 1 -ub 2048 -r 3, JSON) back to back, plus a decode-only
#     depth sweep of both, and prints the table test | cubeqwen t/s | llama.cpp t/s | ratio.
#     Into $OUT: bench-vs-llama.md (the table), bench-vs-llama.json (every sample of both),
#     bench-vs-llama.log, decode-vs-depth.png.
# Settings (environment): PROMPT=2048 GEN=128 DEPTHS=0,4096 REPS=3 SWEEP=1024,16384 (decode-only
# depths; empty: none) SHAPES="0.5b 1.5b" (overrides --7b) BENCH_WORK=/tmp/bench-vs-llama
# BENCH_DEVICE=cuda (cubeqwen's --device).
set -euo pipefail
cd "$(dirname "$0")/.."

here() {
  local anchors=${ANCHORS:-$(cd .. && pwd)/shared/anchors}
  local model=${CUBEQWEN_MODEL:-$(bash scripts/fetch-model.sh)}
  [ -f "$anchors/fetch-llama-cpp.sh" ] || { echo "bench-vs-llama: no $anchors/fetch-llama-cpp.sh (set ANCHORS)" >&2; exit 1; }
  # STAGE_ONLY=REGEX stages test binaries too (run them first with stage/run-gpu.sh); its regex
  # must match bin-cubeqwen-bin-cubeqwen as well.
  if [ -n "${STAGE_ONLY:-}" ]; then bash scripts/stage-gpu.sh; else bash scripts/stage-gpu.sh --bin-only; fi
  target/release/cubeqwen random-gguf --tokenizer-only --tokenizer-from "$model" stage/tokenizer.gguf
  local cache=${CUBEQWEN_CACHE:-$HOME/.cache/cubeqwen}/anchors  # llama.cpp's source, fetched once
  [ -s "$cache/llama-cpp.tgz" ] || bash "$anchors/fetch-llama-cpp.sh" "$cache"
  mkdir -p stage/anchors && cp "$cache/llama-cpp.tgz" stage/anchors/
  cp "$anchors/llama-bench.sh" stage/anchors/
  du -sh stage
  local size; size=$(du -sb stage | cut -f1)
  [ "$size" -lt $((62 * 1024 * 1024)) ] || { echo "stage/ is $size bytes: over the carry limit" >&2; exit 1; }
  echo
  echo "device command (carry [\"stage\"], timeout 600):  bash scripts/bench-vs-llama.sh gpu"
}

gpu() {
  local shapes="0.5b 1.5b"
  [ "${1:-}" = --7b ] && shapes="0.5b 1.5b 7b"
  shapes=${SHAPES:-$shapes}
  local prompt=${PROMPT:-2048} gen=${GEN:-128} depths=${DEPTHS:-0,4096} reps=${REPS:-3} sweep=${SWEEP-1024,16384}
  local device=${BENCH_DEVICE:-cuda}
  local work=${BENCH_WORK:-/tmp/bench-vs-llama}
  mkdir -p "$work/results"
  rm -f "$work"/results/*.json
  local t0=$SECONDS
  stamp() { echo "[$((SECONDS - t0)) s] $*"; }
  local gpu_name
  gpu_name=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
  stamp "GPU: $gpu_name; shapes: $shapes; -p $prompt -n $gen -d $depths -r $reps; decode sweep: ${sweep:-none}"
  local cq=$work/cubeqwen
  gunzip -c stage/bin/bin-cubeqwen-bin-cubeqwen.gz > "$cq" && chmod +x "$cq"
  export CUBEQWEN_KERNEL_CACHE=$work/kernel-cache XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
  export LLAMA_BENCH_BUILD=$work/llama-cpp
  local llama=$LLAMA_BENCH_BUILD/build/bin/llama-bench
  bash stage/anchors/llama-bench.sh stage/anchors/llama-cpp.tgz > "$work/llama-build.out" 2>&1 &
  local build_pid=$!
  local s
  for s in $shapes; do
    [ -s "$work/random-$s.gguf" ] && continue
    stamp "writing $work/random-$s.gguf"
    "$cq" random-gguf --shape "$s" --tokenizer-from stage/tokenizer.gguf "$work/random-$s.gguf.part"
    mv "$work/random-$s.gguf.part" "$work/random-$s.gguf"
  done
  stamp "waiting for the llama-bench build"
  local status=0
  wait "$build_pid" || { tail -30 "$work/llama-build.out"; echo "bench-vs-llama: llama-bench build failed"; status=1; }
  run() { # $1 = what, $2 = output file, rest = command
    local what=$1 file=$2; shift 2
    stamp "$what: $*"
    if ! "$@" > "$file.part" 2> "$file.err"; then
      tail -20 "$file.err"; echo "bench-vs-llama: $what failed"; status=1; rm -f "$file.part"; return 0
    fi
    grep -E "^bench: " "$file.err" || true
    mv "$file.part" "$file"
  }
  for s in $shapes; do
    local f=$work/random-$s.gguf r=$work/results
    run "cubeqwen $s" "$r/cubeqwen-$s.json" "$cq" bench --model "$f" -p "$prompt" -n "$gen" -d "$depths" -r "$reps" --device "$device" -o json
    run "llama.cpp $s" "$r/llama-$s.json" "$llama" -m "$f" -p "$prompt" -n "$gen" -d "$depths" -fa 1 -ub 2048 -r "$reps" -o json
    if [ -n "$sweep" ]; then
      run "cubeqwen $s sweep" "$r/cubeqwen-$s-sweep.json" "$cq" bench --model "$f" -p 0 -n "$gen" -d "$sweep" -r "$reps" --device "$device" -o json
      run "llama.cpp $s sweep" "$r/llama-$s-sweep.json" "$llama" -m "$f" -p 0 -n "$gen" -d "$sweep" -fa 1 -ub 2048 -r "$reps" -o json
    fi
    # After each shape, so a run cut short still leaves its table.
    python3 scripts/plot_bench.py compare "$r" --gpu "$gpu_name" --out "$out/bench-vs-llama.json" --md "$out/bench-vs-llama.md" > /dev/null || status=1
  done
  stamp "done"
  echo
  cat "$out/bench-vs-llama.md" || true
  python3 scripts/plot_bench.py depth "$out/bench-vs-llama.json" --out "$out" || echo "bench-vs-llama: no plot (matplotlib?)"
  echo "bench-vs-llama: exit $status"
  return $status
}

case "${1:-}" in
  gpu)
    shift
    out=${OUT:-$(pwd)/stage/out}
    mkdir -p "$out"
    gpu "$@" 2>&1 | tee "$out/bench-vs-llama.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *) here "$@" ;;
esac
