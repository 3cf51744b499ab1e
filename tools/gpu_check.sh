#!/usr/bin/env bash
# One command for the first run on a lent GPU (an H100 or H200, a few minutes of it):
#
#   tools/gpu_check.sh [--no-build] [RESULTS_FILE]      (default results: gpu_check_results.txt)
#
# Steps, each with its own time limit; everything (commands, output, times) goes into one
# results file, and the script stops at the first step that fails:
#   1. build     tools/dev_build.sh (nvcc sm_80 + sm_90a; no GPU needed)
#   2. gpu       nvidia-smi and torch see a GPU, and the cuda backend loads   <- first GPU step
#   3. tests     pytest -m cuda (the GPU test suite)
#   4. selftests the nvcc-built kernel self-tests, one case each on the GPU
#                (tests/emu/test_nvcc_build.py::test_kernel_tests_build_for_the_gpu)
#   5. kernels   bench/kernels.py on cuda: route / align / expert_ffn / shared / combine at T = 1, 8, 64,
#                512, 4096, bench-small and 16b shapes, and the quantized expert FFN (ffn_q8 and
#                ffn_q4, g128: moe_decode_q / expert_gemm_q), each result checked against PyTorch
#                first, with the HBM floor (bench/gpu.py, bench/README.md) beside each figure
#   6. layer     bench/throughput.py --backend cuda --no-generate: the MoE layer in us at the same
#                T for bench-small and 16b-layer, with floor fractions
#   7. decode    bench/throughput.py --backend cuda on bench-small, generation at batch 1 and 8:
#                decode steps replaying the captured CUDA graph (src/moe_engine/graphs.py), then
#                the same with --no-cuda-graph (the op-by-op layer loop)
#
# Time on an H100/H200 (16 CPU cores), estimated from the sizes, limits in brackets:
#   build ~120 s (8 .cu files x 2 architectures, the same as CI's nvcc step) [240 s];
#   gpu ~10 s (CUDA context) [60 s]; tests ~30 s (a handful of small ops) [120 s];
#   selftests 5 nvcc compiles ~20 s each + runs < 1 s [150 s];
#   kernels: 2 shapes x 5 T x 7 ops x (1 check + 5 x 0.04 s timed) ~ 18 s of timing, plus the
#     16b weights (1.1 GB bf16 made on the CPU, copied once, and the GPTQ tensors of both widths,
#     dequantised on the CPU for the checks) ~40 s per shape [150 s];
#   layer: 2 models x 5 T x 12 reps; 16b-layer is 2 layers (~2.3 GB of synthetic weights written
#     and loaded) ~40 s, bench-small ~15 s [180 s].
#   decode: 4 runs of bench-small (64-token prompt, 32 steps, 2 reps, one capture each) ~15 s
#     each [90 s].
#   Sum of the estimates ~5.5 min; of the limits 16.5 min, but a step that needs its whole limit
#   has failed anyway. Without the build (--no-build, a prebuilt tree) ~4 min.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
gpu_present() {
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "error: no GPU here (nvidia-smi is missing or lists no device); steps 2-7 need one"
    return 1
  fi
  python - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device (CPU-only torch build, or no driver)")
from moe_engine.ops import backend
backend.native_module("cuda")  # raises BackendUnavailable naming the reason
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
EOF
}
if [[ "${1:-}" == "--gpu-present" ]]; then gpu_present; exit; fi  # step 2, run by step() under timeout

build=1
if [[ "${1:-}" == "--no-build" ]]; then build=0; shift; fi
results=${1:-gpu_check_results.txt}
tokens=1,8,64,512,4096
: >"$results"
t0=$SECONDS

log() { echo "$*" | tee -a "$results"; }

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, output into the results file
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  log "== $name: $*"
  timeout "$limit" "$@" >>"$results" 2>&1
  rc=$?
  if [[ $rc -ne 0 ]]; then
    tail -n 20 "$results" | sed -n '/^== /!p' >&2
    log "== $name: FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ", over its ${limit} s limit")) after $((SECONDS - t)) s"
    log "== stopped; $((SECONDS - t0)) s in all; results in $results"
    exit 1
  fi
  log "== $name: ok in $((SECONDS - t)) s"
}


log "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [[ $build -eq 1 ]]; then step build 240 tools/dev_build.sh; fi
step gpu 60 "$0" --gpu-present
step tests 120 python -m pytest -q -m cuda tests
step selftests 150 python -m pytest -q tests/emu/test_nvcc_build.py -k kernel_tests_build_for_the_gpu
for shape in bench-small 16b; do
  step "kernels $shape" 150 python bench/kernels.py --device cuda --backends cuda,torch --shape "$shape" --tokens "$tokens"
done
for preset in bench-small 16b-layer; do
  step "layer $preset" 180 python bench/throughput.py --preset "$preset" --backend cuda --no-generate --moe-tokens "$tokens"
done
for graph in "" --no-cuda-graph; do
  for batch in 1 8; do
    step "decode batch $batch ${graph:-(graph)}" 90 python bench/throughput.py --preset bench-small --backend cuda \
      --batch "$batch" --prompt-len 64 --gen-len 32 --reps 2 --moe-tokens "$batch" --json $graph
  done
done
log "== all steps passed in $((SECONDS - t0)) s; results in $results"
