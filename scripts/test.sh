#!/usr/bin/env bash
# The whole test suite, on this machine's device (wgpu on Mesa's software Vulkan when there is no GPU).
# Installs the software Vulkan driver and fetches the real model when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
export CUBEQWEN_MODEL="${CUBEQWEN_MODEL:-$(bash scripts/fetch-model.sh)}"
cargo test --release --workspace "$@"
# Every criterion bench once, in criterion's test mode (small shapes), so none rots.
shopt -s nullglob
benches=(benches/*.rs */benches/*.rs)
if [ ${#benches[@]} -gt 0 ]; then
  cargo test --release --workspace --bench '*'
fi
