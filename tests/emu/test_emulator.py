"""Self-tests of the CUDA emulator (csrc/emu/emu.h) through tests/emu/cpp/emu_selftest.cu and
tests/emu/cpp/mma_selftest.cu.

What the emulator cannot show, whatever these tests say: timing, occupancy, register use,
shared-memory capacity and bank conflicts; weak-memory races (all accesses are sequentially
consistent; only a *missing barrier* can surface, as an order-dependent result or a TSan report);
real warp divergence (__activemask() is the set of live lanes); preemption (a spin-wait on a plain
load hangs instead of progressing); exact GPU numerics (__expf, FMA contraction, tensor-core
accumulation order). The mma layouts are checked for self-consistency against the PTX
documentation; only a run of mma_selftest.cu on a real GPU checks them against hardware.
"""
from __future__ import annotations

import pytest

from emu_harness import CPP, ORDERS, run_program, sanitize_mode


@pytest.fixture(scope="session")
def selftest(emu_builder):
    return emu_builder.build("emu_selftest", [CPP / "emu_selftest.cu"])


@pytest.fixture(scope="session")
def mma_selftest(emu_builder):
    return emu_builder.build("mma_selftest", [CPP / "mma_selftest.cu"])


def _ok(r, case):
    assert r.returncode == 0 and f"OK {case}" in r.stdout, (
        f"case {case}: rc={r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}")


POSITIVE = {
    "shfl": "__shfl_sync / up / down / xor for every width 1..32 and offset 0..39 on two warps, against "
            "the PTX shfl.sync pseudocode and (power-of-two widths, offsets < 32) the CUDA guide rules",
    "shfl_types": "64-bit, double and bf16 payloads; two half-warps shuffling with disjoint masks",
    "vote": "__ballot_sync / __any_sync / __all_sync / __syncwarp with full and partial masks",
    "atomics": "atomicAdd int/float, atomicMax, an atomicCAS loop, atomicExch, a histogram, 6 blocks x 192",
    "shared": "static (MOE_SHARED_ARRAY) and dynamic shared memory: block sum and scan; both poisoned "
              "(0xFF) before every block; emulated cudaMalloc fills 0xCD",
    "cp_async": "a two-stage cp.async pipeline (commit / wait_group 1) and cp_async_16_zfill",
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", list(POSITIVE))
def test_positive_case(selftest, case, order):
    """Each primitive gives the documented result in every thread order (fibers backend).
    Cannot show: timing or weak-memory effects; atomics here are contended only logically."""
    _ok(run_program(selftest, case, order=order), case)


@pytest.mark.parametrize("case", ["vote", "atomics", "shared", "cp_async", "order_correct"])
def test_threads_backend(selftest, case):
    """The std::thread backend (one OS thread per CUDA thread, run concurrently between waits) gives
    the same results. Cannot show: GPU scheduling; this is only what the host OS interleaves."""
    _ok(run_program(selftest, case, order="forward", backend="threads", timeout=120), case)


def _checksum(r):
    return [l for l in r.stdout.splitlines() if l.startswith("CHECKSUM")]


def test_correct_kernel_same_result_in_every_order(selftest):
    """A block reduction with correct barriers gives one answer in forward, reverse and several
    random orders. Cannot show: orders a GPU could produce that these do not (e.g. warps
    preempted mid-phase); it samples interleavings at barrier and warp-collective granularity."""
    sums = set()
    for order, seed in [("forward", None), ("reverse", None), ("random", 1), ("random", 2), ("random", 3)]:
        r = run_program(selftest, "order_correct", order=order, seed=seed)
        _ok(r, "order_correct")
        sums.update(_checksum(r))
    assert len(sums) == 1, sums


@pytest.mark.skipif(sanitize_mode() == "thread", reason="under TSan the race is reported instead")
def test_missing_barrier_shows_as_order_dependence(selftest):
    """The same reduction without its second barrier: different thread orders give different
    results, which is how the order sweep in CI exposes a missing __syncthreads. Cannot show: a
    race that no sampled order happens to expose."""
    sums = set()
    for order, seed in [("forward", None), ("reverse", None), ("random", 1)]:
        r = run_program(selftest, "order_racy", order=order, seed=seed)
        assert r.returncode == 0, r.stderr
        sums.update(_checksum(r))
    assert len(sums) > 1, f"racy kernel gave the same result in every order: {sums}"


NEGATIVE = {
    "neg_divergent_syncthreads": "divergent __syncthreads",
    "neg_shfl_outside_mask": "outside mask",
    "neg_caller_not_in_mask": "is not in mask",
    "neg_mask_disagree": "__ballot_sync",
    "neg_partial_warp": "do not exist in this block",
    "neg_deadlock": "deadlock",
    "neg_exited_lane": "exited",
    "neg_ldmatrix_global": "not in shared memory",
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", list(NEGATIVE))
def test_misuse_fails_loudly(selftest, case, order):
    """Undefined behaviour on a GPU (divergent barrier, bad warp masks, exited lanes, deadlock,
    ldmatrix on global memory) aborts with a message naming the problem and the source line.
    Cannot show: what a particular GPU would do instead (often: silently wrong data or a hang)."""
    r = run_program(selftest, case, order=order, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"{case} was not stopped:\n{out}"
    assert "moe_emu" in out and NEGATIVE[case] in out, out
    assert "emu_selftest.cu:" in out, f"the message should name the kernel source line:\n{out}"


def test_deadlock_threads_backend(selftest):
    """The threads backend detects the same deadlock (every live thread waits). A spin-wait on a
    plain load would instead be caught by the watchdog (MOE_EMU_WATCHDOG_S)."""
    r = run_program(selftest, "neg_deadlock", backend="threads", timeout=60)
    assert r.returncode != 0 and "deadlock" in r.stderr, r.stderr


@pytest.mark.parametrize("backend", ["fibers", "threads"])
def test_spin_wait_caught_by_watchdog(selftest, backend):
    """A spin-wait on a flag nobody sets would hang forever (fibers are never preempted); the
    watchdog aborts after MOE_EMU_WATCHDOG_S seconds with the stuck report. Cannot show: spin
    waits that a GPU would complete because another warp or block runs concurrently (e.g.
    inter-block flags): those hang here too and must be redesigned or tested on a GPU."""
    if sanitize_mode() == "thread" and backend == "fibers":
        pytest.skip("TSan runs the threads backend only")
    r = run_program(selftest, "neg_spin_wait", backend=backend, timeout=60,
                    env_extra={"MOE_EMU_WATCHDOG_S": "1"})
    assert r.returncode != 0 and "watchdog" in r.stderr and "running" in r.stderr, r.stderr


@pytest.mark.parametrize("order", ORDERS)
def test_missing_cp_async_wait_reads_poison(selftest, order):
    """Without cp_async_wait the shared tile still holds the 0xFF poison (NaN), and the kernel's
    own check reports it. Cannot show: on a GPU the copy may or may not have landed in time."""
    r = run_program(selftest, "neg_missing_cp_async_wait", order=order)
    assert r.returncode == 1 and "poison" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("order", ORDERS)
def test_mma_ldmatrix_formulas_matmul(mma_selftest, order):
    """mma.m16n8k16 bf16 through ldmatrix (x4 / x2 / x2.trans / x4.trans) equals mma from fragments
    built straight from the documented formulas equals a double matmul, exactly; every ldmatrix
    variant matches the documented layout. Cannot show: that the documentation matches hardware
    (run mma_selftest.cu under nvcc on a GPU for that) or tensor-core rounding."""
    r = run_program(mma_selftest, order=order)
    _ok(r, "mma_selftest")


@pytest.mark.skipif(sanitize_mode() != "address", reason="needs MOE_EMU_SANITIZE=address")
@pytest.mark.parametrize("case,report", [("neg_asan_global_oob", "use-after-poison"),
                                         ("neg_asan_fiber_stack_oob", "stack-buffer-overflow")])
def test_asan_reports_kernel_out_of_bounds(selftest, case, report):
    """Under -fsanitize=address a kernel's write one past a cudaMalloc'd buffer (the emulator's
    cudaMalloc poisons its rounding, hence "use-after-poison"), and a read one past a local array
    on the emulated thread's own (fiber) stack, are reported: the fibers' context switch carries
    ASan's fiber annotations, so ASan knows which stack is live. Cannot show: an
    access that lands inside another valid allocation (ASan sees only redzones), or a GPU's own
    memory checker (compute-sanitizer) on device memory."""
    r = run_program(selftest, case)
    assert r.returncode != 0 and f"AddressSanitizer: {report}" in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.mark.skipif(sanitize_mode() != "thread", reason="needs MOE_EMU_SANITIZE=thread")
def test_tsan_reports_missing_barrier(selftest):
    """Under -fsanitize=thread (threads backend forced) the reduction without its barrier is a
    reported data race. Cannot show: races between blocks (blocks never overlap)."""
    r = run_program(selftest, "order_racy", env_extra={"TSAN_OPTIONS": "halt_on_error=1"})
    assert r.returncode != 0 and "data race" in r.stderr, r.stderr[-3000:]


LIMITS_OK = {  # case -> MOE_EMU_ARCH
    "dyn_smem_48k_no_attribute": "sm_80",
    "dyn_smem_with_attribute": "sm_80",
    "dyn_smem_200k_sm90": "sm_90",
    "attribute_too_large": "sm_90",
}


@pytest.mark.parametrize("case", list(LIMITS_OK))
def test_shared_memory_within_limits_runs(selftest, case):
    """Dynamic shared memory up to 48 KB needs no attribute; above it, the opt-in attribute lets a
    launch use up to its value (up to 227 KB on sm_90); an attribute above the maximum is refused
    with cudaErrorInvalidValue, as on a GPU. Cannot show: the real capacity left by the driver's
    reservation per block, or occupancy."""
    _ok(run_program(selftest, case, env_extra={"MOE_EMU_ARCH": LIMITS_OK[case]}), case)


LIMITS_NEG = {  # case -> (MOE_EMU_ARCH, text the abort message must contain)
    "neg_dyn_smem_no_attribute": ("sm_90", "need cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize"),
    "neg_dyn_smem_attribute_too_small": ("sm_90", "this kernel's attribute is 65536"),
    "neg_dyn_smem_capacity_sm80": ("sm_80", "above the 166912 bytes one block may use"),
    "neg_static_smem": ("sm_90", "limit of static __shared__ arrays"),
    "neg_static_plus_dyn": ("sm_80", "above the 166912 bytes one block may use on sm_80"),
    "neg_threads_per_block": ("sm_80", "1025 threads per block, more than 1024"),
    "neg_block_z": ("sm_80", "block dimensions above"),
    "neg_grid_y": ("sm_80", "grid dimensions above"),
}


@pytest.mark.parametrize("case", list(LIMITS_NEG))
def test_hardware_limits_abort(selftest, case):
    """A launch a GPU would refuse (dynamic shared memory above 48 KB without
    cudaFuncSetAttribute(..., cudaFuncAttributeMaxDynamicSharedMemorySize, ...), shared memory above
    the architecture's per-block maximum, static shared arrays above 48 KB, more than 1024 threads,
    grid or block dimensions too large) aborts with a message naming the limit and the kernel.
    Cannot show: registers per thread (tools/check_ptxas.py checks them against
    __launch_bounds__) or shared memory of plain __shared__ arrays (only MOE_SHARED_ARRAY counts)."""
    arch, text = LIMITS_NEG[case]
    r = run_program(selftest, case, timeout=60, env_extra={"MOE_EMU_ARCH": arch})
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"{case} was not stopped:\n{out}"
    assert "moe_emu: error" in out and text in out, out
