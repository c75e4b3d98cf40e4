#!/usr/bin/env bash
# The whole test suite, on this machine's device (wgpu on Mesa's software Vulkan when there is no GPU).
# Installs the software Vulkan driver and fetches the real model when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
export CUBEQWEN_MODEL="${CUBEQWEN_MODEL:-$(bash scripts/fetch-model.sh)}"
# Without an NVIDIA driver the tests run on wgpu only: leave the CUDA runtime out of the build,
# which cuts the build by about 30% here (each test binary instantiates the model for every
# runtime it has). CUBEQWEN_TEST_FEATURES overrides (e.g. "--features cuda"); GPU runs build with
# scripts/stage-gpu.sh.
if [ -n "${CUBEQWEN_TEST_FEATURES+x}" ]; then
  read -r -a features <<<"$CUBEQWEN_TEST_FEATURES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  features=()
else
  features=(--no-default-features)
fi
echo "test.sh: cargo test ${features[*]:-(default features)}" >&2
cargo test --release --workspace ${features[@]+"${features[@]}"} "$@"
# Every criterion bench once, in criterion's test mode (small shapes), so none rots.
shopt -s nullglob
benches=(benches/*.rs */benches/*.rs)
if [ ${#benches[@]} -gt 0 ]; then
  cargo test --release --workspace ${features[@]+"${features[@]}"} --bench '*'
fi
