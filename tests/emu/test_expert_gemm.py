"""expert_gemm (grouped GEMM up / down) and the shared experts, run on the CPU through the emulator.

The C++ programs (tests/emu/cpp/expert_gemm_test.cu, shared_expert_test.cu) compare against a
double-precision reference on bf16 inputs (x ~ N(0, 1), weights ~ N(0, 1/K), about 1/10 at these K); tolerances:
"kernel_vs_double" per element and GLOBAL_DIFF_VS_DOUBLE per tensor, from tests/tolerances.py (the
programs read them as the generated test_tolerances.h, see tests/emu/emu_harness.py). They also check that padding rows and sentinel
slots are never written (canary values) and that padding rows are never read (NaN there).

Sizes: D, F around 64-200 with tails (D = 136 = 2 x 64 + 8 leaves a K tail in up and an N tail
in down; F = 72 the reverse), T in {1, 2, 7, 16, 17, 129}, k in {1, 2, 6, 8} (k = E included),
experts with no tokens (sparse), every token to one expert (one), runtime k < k_max and ids >= E
(sentinel), both tile heights.

What the emulator cannot show: timing and bandwidth, occupancy, register spills (see
test_nvcc_build.py), shared-memory capacity and bank conflicts, weak-memory races between the
cp.async ring and the __syncthreads that guards it (the emulator defers each cp.async to its
wait_group, so a missing wait reads poison, but a real GPU's reordering is not modelled), and the
exact tensor-core accumulation order (the emulator sums each mma in double).
"""
import pytest

from emu_harness import CPP, ORDERS, REPO, check_program as _run, run_program, sanitize_mode, util_tag as _util_tag


@pytest.fixture(scope="session")
def gemm_prog(emu_builder):
    return emu_builder.build(f"expert_gemm_test-{_util_tag()}", [CPP / "expert_gemm_test.cu"])


@pytest.fixture(scope="session")
def ffn_prog(emu_builder):
    kernels = [REPO / "csrc" / "cuda" / f"{k}.cu" for k in ("align", "expert_gemm", "moe_decode")]
    return emu_builder.build(f"expert_ffn_test-{_util_tag()}", [CPP / "expert_ffn_test.cu", *kernels])


@pytest.fixture(scope="session")
def shared_prog(emu_builder):
    return emu_builder.build(f"shared_expert_test-{_util_tag()}", [CPP / "shared_expert_test.cu"])

# T, k_max, E, D, F, block_m, scenario
GEMM_CASES = [
    (1, 1, 4, 64, 64, 16, "uniform"),
    (2, 2, 8, 136, 72, 16, "uniform"),
    (7, 6, 8, 136, 72, 16, "sentinel"),
    (7, 8, 8, 64, 64, 64, "uniform"),       # k = E: every expert gets every token
    (16, 6, 16, 128, 192, 16, "sparse"),    # odd experts get no tokens
    (17, 2, 4, 136, 72, 64, "one"),
    (17, 8, 16, 64, 64, 16, "sentinel"),
    (129, 1, 8, 64, 64, 64, "one"),         # one expert with 129 rows: 3 tiles of 64
    (129, 6, 8, 136, 72, 64, "uniform"),
    (129, 2, 16, 64, 64, 16, "sparse"),
    (3, 2, 2, 2048, 1408, 16, "uniform"),   # the DeepSeekMoE-16B expert shape (22 x 64, 16 x 128)
    (5, 2, 3, 8, 16, 16, "uniform"),        # K and N far below one tile
    (0, 2, 3, 64, 64, 16, "uniform"),       # no tokens: nothing launched, nothing written
    (9, 3, 4, 64, 64, 16, "dup"),           # one expert twice in a token's row
]


def _id(c):
    return "T{}-k{}-E{}-D{}-F{}-bm{}-{}".format(*c)


@pytest.mark.parametrize("case", GEMM_CASES, ids=_id)
def test_expert_gemm(gemm_prog, case):
    if case[3] >= 1024 and sanitize_mode() == "thread":
        pytest.skip("the 16B shape takes minutes on TSan's threads; the same paths run at small sizes")
    _run(gemm_prog, *case, 1)


@pytest.mark.parametrize("order", ORDERS)
def test_expert_gemm_thread_orders(gemm_prog, order):
    """A missing __syncthreads or cp.async wait shows only in some schedules (and blocks run in
    that order too). Cannot show: a GPU interleaving that no sampled order produces."""
    _run(gemm_prog, 17, 6, 8, 136, 72, 16, "sentinel", 2, order=order, seed=5)
    _run(gemm_prog, 33, 4, 4, 136, 72, 64, "uniform", 3, order=order, seed=5)


def test_expert_gemm_threads_backend(gemm_prog):
    """One OS thread per CUDA thread, run concurrently between waits: the same answer as fibers.
    (MOE_EMU_SANITIZE=thread builds this under ThreadSanitizer, where a missing barrier around
    the cp.async ring or the slot table becomes a reported race.) Cannot show: GPU scheduling."""
    r = run_program(gemm_prog, "2", "2", "4", "136", "72", "16", "uniform", "1", backend="threads", timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def test_expert_gemm_errors(gemm_prog):
    """Launcher preconditions throw std::invalid_argument naming the value."""
    out = _run(gemm_prog, "errors")
    assert "FAIL" not in out and out.count("ok ") == 5, out


# T, D, S, x_stride, expected plan: T <= 16 with contiguous x runs moe_decode, otherwise
# expert_gemm (dense mode); up_splits / down_splits = the gate_up projection split over D / the
# down projection over S into that many ranges (csrc/cuda/shared_expert.cu). D = 136 is no
# multiple of any N tile or K step (32 / 64 / 128, 64), nor S = 1032 (64, 256), so the last
# split range of each is a tail (8 elements).
SHARED_CASES = [
    (1, 64, 128, 64, "decode=1 block_m=0 up_splits=1 down_splits=1"),       # too few K steps to split
    (1, 136, 1032, 136, "decode=1 block_m=0 up_splits=1 down_splits=5"),
    (7, 136, 144, 136, "decode=1 block_m=0 up_splits=1 down_splits=1"),
    (7, 136, 1032, 144, "decode=0 block_m=16 up_splits=3 down_splits=9"),   # strided x: the GEMM path at T = 7
    (16, 64, 72, 72, "decode=0 block_m=16 up_splits=1 down_splits=2"),
    (16, 136, 1032, 136, "decode=1 block_m=0 up_splits=1 down_splits=5"),
    (17, 64, 128, 64, "decode=0 block_m=16 up_splits=1 down_splits=2"),
    (17, 136, 1032, 136, "decode=0 block_m=16 up_splits=3 down_splits=9"),
    (33, 136, 1032, 136, "decode=0 block_m=16 up_splits=3 down_splits=9"),
    (127, 136, 1032, 136, "decode=0 block_m=64 up_splits=3 down_splits=9"),
    (128, 136, 1032, 136, "decode=0 block_m=64 up_splits=3 down_splits=9"),
    (129, 136, 144, 144, "decode=0 block_m=64 up_splits=3 down_splits=3"),
    (1, 2048, 2816, 2048, "decode=1 block_m=0 up_splits=1 down_splits=3"),  # the 16B shape
]


@pytest.mark.parametrize("case", SHARED_CASES, ids=lambda c: "T{}-D{}-S{}-xs{}".format(*c))
def test_shared_expert(shared_prog, case):
    """Every plan of shared_expert_plan (decode / GEMM, split or not) against the double reference;
    the partial scratch starts as NaN, so a split range left unwritten fails. Cannot show: whether
    the split grids fill a GPU (occupancy, speed) or the concurrency with the routed experts."""
    if case[1] >= 1024 and sanitize_mode() == "thread":
        pytest.skip("the 16B shape takes minutes on TSan's threads; the same paths run at small sizes")
    out = _run(shared_prog, *case[:4], 1)
    assert f"plan {case[4]}" in out, out


@pytest.mark.parametrize("order", ORDERS)
def test_shared_expert_thread_orders(shared_prog, order):
    """The split-K paths (moe_decode and expert_gemm down launches over S ranges, then the reduce)
    in each thread / block order. Cannot show: a GPU interleaving no sampled order produces."""
    _run(shared_prog, 7, 136, 1032, 136, 2, order=order, seed=5)
    _run(shared_prog, 33, 136, 1032, 136, 3, order=order, seed=5)


# T, k_max, E, D, F, scenario: block_m from expert_gemm_block_m; T = 300 and 600 take align's
# multi-block path (R > 1024)
@pytest.mark.parametrize("case", [(1, 6, 16, 64, 64, "uniform"), (7, 2, 4, 136, 72, "sentinel"),
                                  (16, 8, 8, 64, 64, "one"), (129, 6, 16, 64, 64, "sparse"),
                                  (300, 6, 16, 64, 64, "uniform"), (600, 2, 4, 64, 64, "one")],
                         ids=lambda c: "T{}-k{}-E{}-D{}-F{}-{}".format(*c))
def test_expert_ffn_pipeline(ffn_prog, case):
    """The real align kernel feeds the grouped GEMM (its output must equal the align contract the
    GEMM tests assume, bit for bit); for T <= 16 moe_decode must agree with the GEMM path."""
    _run(ffn_prog, *case, 1)
