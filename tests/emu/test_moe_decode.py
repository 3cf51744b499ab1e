"""moe_decode (the T <= 16 path with no sort) run on the CPU through the emulator.

tests/emu/cpp/moe_decode_test.cu compares act and expert_out against a double-precision
reference on bf16 inputs (x ~ N(0, 1), weights ~ N(0, 1/K), about 1/10 at these K); tolerances:
"kernel_vs_double" per element and GLOBAL_DIFF_VS_DOUBLE per tensor, from tests/tolerances.py (read
as the generated test_tolerances.h); sentinel slots must be exactly zero.

Cases cover T in {1, 2, 7, 16}, k in {1, 2, 6, 8} (k = E included), experts chosen by no token,
one expert chosen by all 16 tokens (two passes of 8 over its weights), runtime k < k_max with -1
slots and ids >= E, and K / N tails (D = 136, F = 72). T = 17 must be refused (errors case).

What the emulator cannot show: bandwidth, occupancy and register spills (test_nvcc_build.py), and
device numerics (FMA contraction; the shuffle reduction order is the same as on a GPU).
"""
import pytest

from emu_harness import CPP, ORDERS, check_program as _run, run_program, sanitize_mode, util_tag as _util_tag


@pytest.fixture(scope="session")
def decode_prog(emu_builder):
    return emu_builder.build(f"moe_decode_test-{_util_tag()}", [CPP / "moe_decode_test.cu"])

# T, k_max, E, D, F, scenario
DECODE_CASES = [
    (1, 1, 4, 64, 64, "uniform"),
    (1, 6, 16, 136, 72, "uniform"),
    (2, 2, 8, 64, 64, "one"),
    (7, 6, 8, 136, 72, "sentinel"),
    (7, 8, 8, 64, 64, "uniform"),       # k = E
    (16, 6, 16, 128, 192, "sparse"),
    (16, 8, 8, 64, 64, "one"),           # k = E and T = 16: every expert has 16 slots, 2 passes
    (16, 2, 4, 136, 72, "sentinel"),
    (2, 2, 3, 2048, 1408, "uniform"),    # the DeepSeekMoE-16B expert shape
    (3, 3, 3, 24, 8, "one"),             # K and N far below one warp step
    (0, 2, 3, 64, 64, "uniform"),        # no tokens
    (16, 8, 4, 64, 64, "dup"),           # an expert twice per row: 32 slots, 4 passes of 8
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "T{}-k{}-E{}-D{}-F{}-{}".format(*c))
def test_moe_decode(decode_prog, case):
    if case[3] >= 1024 and sanitize_mode() == "thread":
        pytest.skip("the 16B shape takes minutes on TSan's threads; the same paths run at small sizes")
    _run(decode_prog, *case, 1)


@pytest.mark.parametrize("order", ORDERS)
def test_moe_decode_thread_orders(decode_prog, order):
    """The slot list in shared memory is rebuilt between passes behind two barriers; a missing
    one shows only in some orders. Cannot show: GPU interleavings no sampled order produces."""
    _run(decode_prog, 16, 6, 8, 136, 72, "one", 2, order=order, seed=5)


def test_moe_decode_errors(decode_prog):
    """Launcher preconditions throw std::invalid_argument naming the value."""
    out = _run(decode_prog, "errors")
    assert "FAIL" not in out and out.count("ok ") == 4, out


def test_moe_decode_threads_backend(decode_prog):
    """One OS thread per CUDA thread, run concurrently between waits: the same answer as fibers.
    (MOE_EMU_SANITIZE=thread builds this under ThreadSanitizer.) Cannot show: GPU scheduling."""
    r = run_program(decode_prog, "2", "2", "4", "136", "72", "one", "1", backend="threads", timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
