"""expert_gemm_q (the grouped GEMM on 4/8-bit experts, SiLU*up fused) run on the CPU through the
emulator.

tests/emu/cpp/expert_gemm_q_test.cu makes random GPTQ tensors, repacks them on the device
(qrepack_cuda) and runs the up and down launches over align's slot list (moe_test_util.h's
align_ref), comparing with a double-precision dequantise-then-matmul reference whose weights are
rounded to bf16 as the kernel rounds them for the tensor cores; tolerances in
tests/emu/cpp/moe_test_util.h. Padding rows and rows past num_padded must keep their canary (never
written), padding rows of act are NaN for the down launch (never read), sentinel slots zero.

Cases: both widths, every group size, both symmetries and scale dtypes, both tile heights, the
awkward sizes of the bf16 GEMM tests (D = 136, F = 72: K and N tails inside a 64-wide k-tile and
a 128-row N tile), T in {17, 129}, sparse / one / sentinel routing, dense mode (no slot lists).

What the emulator cannot show: timing and bandwidth, occupancy, registers and spills
(tools/check_ptxas.py), shared-memory bank conflicts, weak-memory effects between the cp.async ring,
the dequantised tile and their barriers (the emulator defers each cp.async to its wait, so a
missing wait reads poison, and a missing barrier shows only in some thread orders), and the
tensor cores' accumulation order (the emulator sums each mma in double).
"""
import pytest

from emu_harness import CPP, ORDERS, check_program as _run, run_program
from test_moe_decode_q import quant_util_tag


@pytest.fixture(scope="session")
def gemm_q_prog(emu_builder):
    return emu_builder.build(f"expert_gemm_q_test-{quant_util_tag()}", [CPP / "expert_gemm_q_test.cu"])


# T, k_max, E, D, F, block_m, bits, group, sym, scales, scenario
CASES = [
    (17, 6, 8, 136, 72, 16, 4, 32, 0, "fp16", "uniform"),
    (17, 2, 4, 136, 72, 16, 4, 64, 1, "bf16", "sentinel"),
    (129, 6, 8, 136, 72, 64, 4, 128, 0, "bf16", "sparse"),
    (17, 6, 8, 136, 72, 16, 8, 32, 1, "bf16", "one"),
    (129, 6, 8, 136, 72, 64, 8, 64, 0, "fp16", "sentinel"),
    (17, 2, 4, 136, 72, 64, 8, 128, 1, "fp16", "uniform"),
    (20, 1, 1, 72, 136, 16, 4, 128, 0, "fp16", "dense"),     # shared experts: no slot lists
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-k{}-E{}-D{}-F{}-bm{}-int{}-g{}-sym{}-{}-{}".format(*c))
def test_expert_gemm_q(gemm_q_prog, case):
    """One case against the double-precision reference (module docstring). Cannot show: timing,
    bank conflicts, weak-memory effects of the ring, the tensor cores' accumulation order."""
    _run(gemm_q_prog, *case, 1)


@pytest.mark.parametrize("order", ORDERS)
def test_expert_gemm_q_thread_orders(gemm_q_prog, order):
    """The code ring and the dequantised tile are guarded by two barriers per k-tile; a missing
    one shows only in some orders. Cannot show: GPU interleavings no sampled order produces."""
    _run(gemm_q_prog, 33, 4, 4, 136, 72, 16, 4, 32, 0, "bf16", "one", 3, order=order, seed=7)


def test_expert_gemm_q_errors(gemm_q_prog):
    """Launcher preconditions throw std::invalid_argument naming the value."""
    out = _run(gemm_q_prog, "errors")
    assert "FAIL" not in out and out.count("ok ") == 6, out


def test_expert_gemm_q_threads_backend(gemm_q_prog):
    """One OS thread per CUDA thread, run concurrently between waits: the same answer as fibers.
    (MOE_EMU_SANITIZE=thread builds this under ThreadSanitizer.) Cannot show: GPU scheduling."""
    r = run_program(gemm_q_prog, "17", "2", "2", "72", "64", "16", "8", "32", "0", "fp16", "one", "1",
                    backend="threads", timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
