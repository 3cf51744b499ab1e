#!/usr/bin/env bash
# The cpu tests against each of csrc/cpu/simd.h's three builds that this machine can run, not only
# the -march=native one: _C alone (no CUDA, no _C_emu) is built per -march into its own directory
# and loaded in place of moe_engine._C through MOE_ENGINE_CPU_MODULE (src/moe_engine/ops/backend.py).
#   x86-64          portable loops
#   x86-64-v3       AVX2 + FMA
#   cooperlake      AVX-512F + AVX512_BF16 (only where /proc/cpuinfo lists the AVX-512 extensions it
#                   enables). Not sapphirerapids: that also enables AVX512-FP16, which Zen 4/5 lack,
#                   and GCC then emits FP16 instructions (vmovw for a 16-bit scalar load, as in
#                   csrc/cpu/quant_gemm.cpp) that die with SIGILL there; cooperlake's set is a
#                   subset of both Zen 4/5's and Sapphire Rapids'.
# Each runs the cpu cases of tests/test_ops.py (`-k cpu`: every id there names its backend or says
# cpu; test_loaded_cpu_build_is_the_expected_isa checks _C.cpu_isa), tests/test_quant_kernels.py
# and the cpu cases of tests/test_model_backends.py. Needs cmake >= 3.26, ninja and pybind11 in the Python environment.
# Builds go under $MOE_ISA_BUILD_ROOT (default build/isa), so a rerun only rebuilds what changed.
# MOE_ISA_SKIP="avx512 ..." skips builds whose isa is already tested elsewhere (CI: the -march=native
# build that the README test command ran the whole suite against).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${MOE_ISA_BUILD_ROOT:-build/isa}"
broot=$(cd "${MOE_ISA_BUILD_ROOT:-build/isa}" && pwd)
PYTEST=${PYTEST:-python -m pytest}
pybind11_dir=$(python -m pybind11 --cmakedir) || {
  echo "test_cpu_isas: pybind11 is not installed (pip install pybind11 cmake ninja)" >&2; exit 2; }
if [ "$(uname -m)" != x86_64 ]; then
  echo "== cpu isas: not an x86-64 machine, nothing to test"; exit 0
fi
t0=$SECONDS

# -march, the cpu_isa that build reports, the /proc/cpuinfo flags it needs.
variants=(
  "x86-64 portable"
  "x86-64-v3 avx2 avx avx2 bmi1 bmi2 f16c fma abm movbe"
  "cooperlake avx512 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16"
)
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
ran=() skipped=() failed=()
for v in "${variants[@]}"; do
  read -r arch isa needs <<<"$v"
  if [[ " ${MOE_ISA_SKIP:-} " == *" $isa "* ]]; then
    echo "== cpu isa $isa (-march=$arch): skipped, MOE_ISA_SKIP (tested by the native build)"
    skipped+=("$isa")
    continue
  fi
  missing=()
  for f in $needs; do [[ $cpu_flags == *" $f "* ]] || missing+=("$f"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== cpu isa $isa (-march=$arch): skipped, this CPU lacks ${missing[*]}"
    skipped+=("$isa")
    continue
  fi
  t1=$SECONDS
  echo "== cpu isa $isa (-march=$arch): build"
  build=$broot/$arch
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$pybind11_dir" \
    -DMOE_ENGINE_CUDA=OFF -DMOE_ENGINE_EMU=OFF -DMOE_ENGINE_ARCH="$arch" -DMOE_OUTPUT_DIR="$build/out" \
    >/dev/null
  cmake --build "$build" -j"$(nproc)" --target _C
  so=$(echo "$build"/out/_C.*.so)
  [ -f "$so" ] || { echo "test_cpu_isas: expected one _C module in $build/out, found: $so" >&2; exit 1; }
  echo "== cpu isa $isa (-march=$arch): tests"
  run=(env MOE_ENGINE_CPU_MODULE="$so" MOE_ENGINE_EXPECT_CPU_ISA="$isa" MOE_ENGINE_REQUIRE_BACKENDS=cpu
       $PYTEST -q)
  # "not emu": the cpu cases, including the cpu-only rope-scaling tests whose ids do not say cpu.
  if "${run[@]}" -k cpu tests/test_ops.py && "${run[@]}" tests/test_quant_kernels.py &&
     "${run[@]}" -k "not emu" tests/test_model_backends.py; then
    echo "== cpu isa $isa (-march=$arch): passed in $((SECONDS - t1)) s"
    ran+=("$isa")
  else
    echo "== cpu isa $isa (-march=$arch): FAILED after $((SECONDS - t1)) s"
    failed+=("$isa")
  fi
done
echo "== cpu isas: passed ${ran[*]:-none}; failed ${failed[*]:-none};" \
  "skipped (this CPU cannot run them) ${skipped[*]:-none}; $((SECONDS - t0)) s"
[ ${#failed[@]} -eq 0 ]
