"""The CUDA kernels of csrc/cuda (route, align, combine) run on the emulator against the C++
references in tests/emu/cpp/*_test.cu, in every thread order.

What this cannot show: the kernels' speed, occupancy or register pressure (tools/check_ptxas.py
covers spills); weak-memory effects (route and combine have no inter-thread communication
through memory; align's only shared-memory hand-offs are behind __syncthreads, which the order
sweep exercises); the GPU's own expf / division rounding (route weights are compared to
"route_weights" of tests/tolerances.py, ids exactly on inputs without near-ties); behaviour of the multi-block align path when
its three launches overlap on a real stream (they are stream-ordered, and run one after
another here).
"""
from __future__ import annotations

import pytest

from emu_harness import CPP, ORDERS, REPO, run_program, sanitize_mode

# TSan runs one OS thread per CUDA thread (~100x slower than fibers), so it takes the smaller
# sweeps of the test programs: full = all T, quick = T <= 17, tiny = T <= 2. ASan runs the fibers
# (a few times slower than -O2) and the full sweeps.
SWEEPS = {"none": dict(route="full", align="full", combine="full"),
          "address": dict(route="full", align="full", combine="full"),
          "thread": dict(route="tiny", align="tiny", combine="tiny")}[sanitize_mode()]

KERNELS = {
    "route": "route.cu",
    "align": "align.cu",
    "combine": "combine.cu",
}


@pytest.fixture(scope="session")
def kernel_tests(emu_builder):
    built = {}

    def get(name):
        if name not in built:
            built[name] = emu_builder.build(
                f"{name}_test", [CPP / f"{name}_test.cu", REPO / "csrc" / "cuda" / KERNELS[name]])
        return built[name]

    return get


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_vs_reference(kernel_tests, name, order):
    """Full sweep of awkward sizes (see the header of tests/emu/cpp/<name>_test.cu): ids, slots
    and counts bitwise; combine bitwise against its fixed-order fp32 replica; weights and sums
    within the stated tolerances of a double reference; launcher preconditions raise
    std::invalid_argument naming the value. Cannot show: GPU timing or weak-memory races."""
    r = run_program(kernel_tests(name), SWEEPS[name], order=order, seed=11, timeout=900)
    assert r.returncode == 0 and f"OK {name}_test" in r.stdout, (
        f"{name} ({order}): rc={r.returncode}\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}")


@pytest.mark.skipif(sanitize_mode() == "thread", reason="under TSan every test uses the threads backend")
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_threads_backend(kernel_tests, name):
    """The small sizes again with one OS thread per CUDA thread (the TSan configuration).
    Cannot show: GPU scheduling; only what the host OS interleaves."""
    r = run_program(kernel_tests(name), "tiny", backend="threads", timeout=300)
    assert r.returncode == 0 and f"OK {name}_test" in r.stdout, (
        f"{name} (threads): rc={r.returncode}\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}")
