#!/usr/bin/env bash
# The main job: `bash scripts/run.sh [cubeqwen arguments]` (default: selftest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
[ $# -gt 0 ] || set -- selftest
exec cargo run --release --quiet -- "$@"
