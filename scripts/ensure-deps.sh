#!/usr/bin/env bash
# Installs what cubeqwen needs at run time on a CPU-only Debian machine: Mesa's software
# Vulkan driver (lavapipe), which the wgpu runtime uses when there is no GPU.
set -euo pipefail
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "installing Mesa's software Vulkan driver (mesa-vulkan-drivers)..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi
# wgpu/Mesa complain when this is unset; any private writable folder will do.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/cubeqwen-runtime-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
# cudarc reads the CUDA version at build time; the GPU machine has CUDA 13.0. One value for
# every build (tests here, staged GPU binaries) keeps cargo from rebuilding cudarc and all
# that depends on it whenever the two alternate.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
