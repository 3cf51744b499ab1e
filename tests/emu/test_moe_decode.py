"""moe_decode (the T <= 16 path with no sort) run on the CPU through the emulator.

tests/emu/cpp/test_moe_decode.cpp compares act and expert_out against a double-precision
reference on bf16 inputs (x ~ N(0, 1), weights ~ N(0, 1/10)); tolerances in
tests/emu/cpp/moe_test_util.h: |got - ref| <= 2e-2 + 1e-2 |ref| per element and
1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-5 per tensor; sentinel slots must be exactly zero.

Cases cover T in {1, 2, 7, 16}, k in {1, 2, 6, 8} (k = E included), experts chosen by no token,
one expert chosen by all 16 tokens (two passes of 8 over its weights), runtime k < k_max with -1
slots and ids >= E, and K / N tails (D = 136, F = 72). T = 17 must be refused (errors case).

What the emulator cannot show: bandwidth, occupancy and register spills (test_nvcc_build.py), and
device numerics (FMA contraction; the shuffle reduction order is the same as on a GPU).
"""
import pytest

from emu_run import run_program

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
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "T{}-k{}-E{}-D{}-F{}-{}".format(*c))
def test_moe_decode(emu_program, case):
    run_program(emu_program("test_moe_decode"), *case, 1)


@pytest.mark.parametrize("order", ["reverse", "random"])
def test_moe_decode_thread_orders(emu_program, order):
    run_program(emu_program("test_moe_decode"), 16, 6, 8, 136, 72, "one", 2, order=order)


def test_moe_decode_errors(emu_program):
    run_program(emu_program("test_moe_decode"), "errors")
