#!/usr/bin/env bash
# Builds the CUDA-enabled test binaries, benches and the cubeqwen binary here (release,
# stripped), stages them in the git-ignored folder stage/ (< 64 MiB), and prints the one
# device command that runs them all on the GPU machine.
#
#   bash scripts/stage-gpu.sh [--no-bench | --bin-only]
#   STAGE_ONLY=REGEX bash scripts/stage-gpu.sh   stages only the binaries whose staged name
#     matches (names: test-kernels-t-flash, test-cubeqwen-t-decode_graphs, bench-cubeqwen-b-decode,
#     bin-cubeqwen-bin-cubeqwen, ...): all of them are over the carry limit together.
#
#   STAGE_TESTS="--test decode --test matmul" STAGE_BENCHES="--bench decode" bash scripts/stage-gpu.sh
#     builds only those test and bench targets (cargo's target selection, across the workspace):
#     a full build takes 25-30 min on 2 cores, mostly the root crate's integration tests.
#
# --bin-only stages the cubeqwen binary alone (scripts/bench-vs-llama.sh: the test binaries and
# llama.cpp's source together are over the carry limit).
#
# On the GPU machine: `bash stage/run-gpu.sh` (with `stage` carried). Logs go to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"  # the GPU machine: CUDA 13.0
rm -rf stage && mkdir -p stage/bin
manifest=stage/bin/MANIFEST   # lines: <binary> <package dir relative to repo> <kind>

collect() { # $1 = kind; stdin = cargo json
  python3 -c '
import json, sys, os, re, shutil, subprocess
kind, root = sys.argv[1], os.getcwd()
only = re.compile(os.environ.get("STAGE_ONLY") or ".")
SKIP = {"golden_device", "haiku", "tokenizer_golden", "reference_golden", "cli", "bench_cli", "serve"}
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"): continue
    t = m["target"]
    if kind == "test" and not m["profile"]["test"]: continue
    if kind == "bin" and "bin" not in t["kind"]: continue
    if kind == "bench" and "bench" not in t["kind"]: continue
    pkg = os.path.relpath(os.path.dirname(m["manifest_path"]), root)
    # Only what needs the GPU travels (carry limit 64 MiB): the loaders run no kernels, and
    # the real-model tests need a model too big to carry, `cli` runs no kernel and calls the
    # binary by its path here, and `serve` does both; CI runs them all.
    if kind == "test" and (pkg == "loaders" or t["name"] in SKIP): continue
    exe = m["executable"]
    name = "%s-%s-%s-%s" % (kind, os.path.basename(pkg) if pkg != "." else "cubeqwen", t["kind"][0], t["name"])
    if not only.search(name): continue
    dst = os.path.join("stage/bin", name)
    shutil.copy(exe, dst)
    subprocess.run(["strip", dst], check=True)
    subprocess.run(["gzip", "-9", dst], check=True)
    print(name, pkg, kind)
' "$1" >> "$manifest"
}

build() { # $1 = kind, rest = cargo command; cargo's messages go to stage/build.log
  local kind=$1; shift
  if ! "$@" --message-format=json 2>>stage/build.log | collect "$kind"; then
    tail -40 stage/build.log >&2; echo "stage-gpu: '$*' failed (stage/build.log)" >&2; exit 1
  fi
}
mode=${1:-}
read -r -a tests <<< "${STAGE_TESTS:-}"
read -r -a benches <<< "${STAGE_BENCHES:-}"
[ "$mode" = --bin-only ] || build test cargo test --release --workspace --no-run ${tests[@]+"${tests[@]}"}
build bin cargo build --release --bin cubeqwen
if [ -z "$mode" ] && ls benches/*.rs >/dev/null 2>&1; then
  build bench cargo bench --workspace --no-run ${benches[@]+"${benches[@]}"}
fi
cp scripts/run-gpu.sh stage/run-gpu.sh
du -sh stage; cat "$manifest"
size=$(du -sb stage | cut -f1)
[ "$size" -lt $((60 * 1024 * 1024)) ] || { echo "stage/ is $size bytes: over the carry limit" >&2; exit 1; }
echo
echo "device command (carry [\"stage\"]):  bash stage/run-gpu.sh"
