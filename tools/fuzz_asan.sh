#!/usr/bin/env bash
# The C++ boundary fuzz test (tests/reliability/test_cpp_boundary.py) against an AddressSanitizer
# build of _C and _C_emu, so an out-of-bounds access that lands inside the fuzzer's generous
# buffers is reported too, not only a crash.
# Builds into build/asan (its own dir; the dev build is untouched), assembles a package there
# (links to src/moe_engine's Python files + the ASan modules) and runs the test with libasan
# and libstdc++ preloaded (python itself is not instrumented). Leak reports are off: CPython's allocations at
# exit are not ours.
# Usage: tools/fuzz_asan.sh [pytest args...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOE_ASAN_BUILD_DIR:-$root/build/asan}
pkg=$build/pkg/moe_engine
mkdir -p "$pkg"
for f in "$root"/src/moe_engine/*; do
  case $(basename "$f") in _C.*|_C_emu.*|__pycache__) continue ;; esac
  ln -sfn "$f" "$pkg/$(basename "$f")"
done
# No LTO (pybind11 adds it to _C otherwise): it moves the compile of every object into one
# serial-ish link step and buys nothing here; ASan instruments each object the same either way.
# -O1 -g1 (line tables: file:line in every report) rather than RelWithDebInfo's -O2 -g: what ASan
# checks is the same (ASan's own advice is -O1 or higher) and the build takes ~30% less CPU;
# NDEBUG as in the release build, so the entry points are fuzzed as users get them.
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=None -DMOE_ENGINE_CUDA=OFF \
  -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF \
  -DMOE_OUTPUT_DIR="$pkg" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
  -DCMAKE_CXX_FLAGS="-O1 -g1 -DNDEBUG -fsanitize=address -fno-omit-frame-pointer" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address" >/dev/null
cmake --build "$build" -j"$(nproc)"
# libstdc++ preloaded too: ASan's __cxa_throw interceptor must find it at start-up, or the
# first C++ exception (every refusal the fuzzer provokes) aborts in an ASan CHECK
preload="$(${CXX:-c++} -print-file-name=libasan.so) $(${CXX:-c++} -print-file-name=libstdc++.so)"
cd "$root"
LD_PRELOAD=$preload ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 PYTHONPATH="$build/pkg" \
  MOE_ENGINE_REQUIRE_BACKENDS=cpu,emu python -m pytest -q -p no:cacheprovider \
  tests/reliability/test_cpp_boundary.py "$@"
