#!/usr/bin/env bash
# Build the extension modules next to the Python sources, for work in a checkout with
# PYTHONPATH=<checkout>/src (no pip install). Extra arguments go to cmake's configure step,
# e.g. -DMOE_ENGINE_CUDA=OFF for a fast CPU-only build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOE_BUILD_DIR:-$root/build/dev}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
