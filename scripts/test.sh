#!/usr/bin/env bash
# The whole test suite, on this machine's device (wgpu on Mesa's software Vulkan when there is no GPU).
# Installs the software Vulkan driver and fetches the real model when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
export CUBEQWEN_MODEL="${CUBEQWEN_MODEL:-$(bash scripts/fetch-model.sh)}"
exec cargo test --release --workspace "$@"
