#!/usr/bin/env bash
# Configure and build libmoqae, the tools and the C tests into build/ (or $MOQAE_BUILD_DIR).
# Extra CMake options can be given as arguments, e.g. scripts/build.sh -DMOQAE_SANITIZE_ADDRESS=ON
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MOQAE_BUILD_DIR:-build}
launcher=()
if command -v ccache >/dev/null 2>&1; then launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=${MOQAE_BUILD_TYPE:-Release} "${launcher[@]}" "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
