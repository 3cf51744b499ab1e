#!/usr/bin/env bash
# The emulator steps of CI (docs/emulator.md, "The CI steps"):
#   1. tests/emu with fibers in forward, reverse and random thread order (-O2);
#   2. the same tests built with -fsanitize=address,undefined (the fibers' switches carry ASan's
#      fiber annotations), in forward, reverse and random order;
#   3. the threads backend under -fsanitize=thread (small cases; a missing barrier is a race);
#   4. nvcc for sm_80 and sm_90a with -Xptxas -v: zero spills (tools/check_ptxas.py).
# Usage: tools/run_emu_tests.sh [step...]   steps: orders asan tsan ptxas (default: all)
# Binaries are cached by source hash under build/emu-tests, so a rerun only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(orders asan tsan ptxas)
PYTEST=${PYTEST:-python -m pytest}

run() {
  local name=$1
  shift
  local t0=$SECONDS
  echo "== emu: $name"
  "$@"
  echo "== emu: $name passed in $((SECONDS - t0)) s"
}

# With pytest-xdist (PYTEST="... -n 2"): compile the step's test programs first, a test file per
# worker (--dist loadfile; --setup-only builds the session fixtures and runs no test), so the
# run after finds every program built: no worker waits idle on the other's compile of the same
# program (tests/emu/emu_harness.py lets one worker compile each). Its output only on failure.
prebuild() {  # prebuild ENV... -- PYTEST-ARGS...
  [[ " $PYTEST " == *" -n "* ]] || return 0
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  local log t0=$SECONDS
  log=$(mktemp)
  if ! env "${envs[@]}" $PYTEST -q --setup-only --dist loadfile -p no:cacheprovider "$@" >"$log" 2>&1; then
    tail -n 60 "$log"; rm -f "$log"; return 1
  fi
  rm -f "$log"
  echo "== emu: test programs compiled in $((SECONDS - t0)) s"
}

# TSan runs one OS thread per CUDA thread, ~100x slower than fibers: the emulator self-tests,
# route/align/combine, and the small threads-backend cases of the GEMM and decode kernels
# (their full sweeps run under the fibers and ASan steps).
tsan_k="test_emulator or test_kernels or threads_backend"
for s in "${steps[@]}"; do
  case $s in
    orders) prebuild MOE_EMU_SANITIZE=0 -- tests/emu
            run "fibers, forward/reverse/random order" env MOE_EMU_SANITIZE=0 \
              MOE_EMU_ORDERS=forward,reverse,random $PYTEST -q tests/emu ;;
    asan) prebuild MOE_EMU_SANITIZE=address -- tests/emu
          run "ASan + UBSan" env MOE_EMU_SANITIZE=address MOE_EMU_ORDERS=forward,reverse,random \
            $PYTEST -q tests/emu ;;
    tsan) prebuild MOE_EMU_SANITIZE=thread -- tests/emu -k "$tsan_k"
          run "TSan, threads backend" env MOE_EMU_SANITIZE=thread MOE_EMU_ORDERS=forward \
            $PYTEST -q tests/emu -k "$tsan_k" ;;
    ptxas) run "ptxas sm_80 + sm_90a, zero spills" python tools/check_ptxas.py ;;
    *) echo "unknown step $s (expected orders, asan, tsan, ptxas)" >&2; exit 2 ;;
  esac
done
