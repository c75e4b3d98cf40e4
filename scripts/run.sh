#!/usr/bin/env bash
# The main job: `bash scripts/run.sh [cubeqwen arguments]` (default: a greedy chat reply from
# the real model, fetched into the cache when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
[ $# -gt 0 ] || set -- generate --chat "Write a haiku about GPU computing." --max-tokens 64
exec cargo run --release --quiet -- "$@"
