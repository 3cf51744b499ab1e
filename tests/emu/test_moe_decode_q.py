"""moe_decode_q (quantized experts, T <= 16) and its load-time repack, run on the CPU through the
emulator.

tests/emu/cpp/moe_decode_q_test.cu makes random GPTQ tensors (codes, fp16 or bf16 scales, zeros),
repacks them on the device (qrepack_cuda), runs moe_decode_q_cuda and compares act and expert_out
with a double-precision dequantise-then-matmul reference built from the GPTQ tensors directly
(w = s (q - z)); tolerances in tests/emu/cpp/moe_test_util.h, the same as moe_decode's; sentinel
slots must be exactly zero.

Cases: both widths, every group size, both symmetries and both scale dtypes, at the awkward sizes
of the bf16 decode tests (D = 136, F = 72: K not a multiple of 32 or of the group, so the padded
codes and the short last group are exercised), T in {1, 2, 7, 16}, k = E, one expert taking
every token (two passes of 8), runtime k < k_max with -1 and >= E sentinels, dense mode
(topk_ids null: the shared experts' path), and K of several warp steps with a tail (D = 1096,
F = 536; smaller under TSan, see SANITIZER_SIZES).

What the emulator cannot show: bandwidth, occupancy, registers and spills (tools/check_ptxas.py,
test_nvcc_build.py), device numerics (FMA contraction; the dequantised weights are exact either
way, the accumulation order is the GPU's), and faults of misaligned vector loads.
"""
import hashlib

import pytest

from emu_harness import CPP, ORDERS, check_program as _run, run_program, sanitize_mode, util_tag as _util_tag


def quant_util_tag() -> str:
    """The binary cache does not hash headers beside the test programs: name the binaries after
    moe_test_util.h and quant_test_util.h so an edit there rebuilds them."""
    return _util_tag() + hashlib.sha256((CPP / "quant_test_util.h").read_bytes()).hexdigest()[:8]


@pytest.fixture(scope="session")
def decode_q_prog(emu_builder):
    return emu_builder.build(f"moe_decode_q_test-{quant_util_tag()}", [CPP / "moe_decode_q_test.cu"])


# T, k_max, E, D, F, bits, group, sym, scales, scenario
CASES = [
    (1, 6, 16, 136, 72, 4, 32, 0, "fp16", "uniform"),
    (2, 2, 8, 136, 72, 4, 64, 1, "bf16", "one"),
    (7, 6, 8, 136, 72, 4, 128, 0, "bf16", "sentinel"),
    (16, 8, 8, 64, 64, 4, 32, 1, "fp16", "one"),        # k = E, T = 16: two passes of 8 per expert
    (3, 2, 4, 136, 72, 4, 64, 0, "fp16", "dup"),
    (5, 1, 1, 136, 72, 4, 128, 1, "fp16", "dense"),      # topk_ids null (shared experts)
    (1, 6, 16, 136, 72, 8, 32, 1, "bf16", "uniform"),
    (2, 2, 8, 136, 72, 8, 64, 0, "fp16", "one"),
    (7, 6, 8, 136, 72, 8, 128, 1, "fp16", "sentinel"),
    (16, 2, 4, 136, 72, 8, 32, 0, "bf16", "sentinel"),
    (3, 3, 3, 24, 8, 8, 64, 0, "bf16", "one"),           # K and N far below one warp step
    (4, 1, 1, 64, 96, 8, 128, 0, "bf16", "dense"),
    (0, 2, 3, 64, 64, 4, 32, 0, "fp16", "uniform"),      # no tokens
    (2, 2, 2, 1096, 536, 4, 128, 0, "fp16", "uniform"),  # K > one warp step (1024 k at 4 bits) + tail
    (2, 2, 2, 1096, 536, 8, 64, 1, "bf16", "one"),       # 8 bits: 512 k a step, both launches 2+ steps
]

# Under TSan (one OS thread per CUDA thread; tools/run_emu_tests.sh) the two cases above of
# several warp steps run at the smallest D, F that keep their paths: a race depends on the
# sizes' step counts and tails, not on their values. The fibers and ASan steps run them at full size.
#   4 bits, (1096, 536) -> (1096, 72): the up launch still spans a 1024-k step plus a 72-k tail;
#           the down launch's K is one step with a tail at either F, as in the small cases.
#   8 bits, (1096, 536) -> (536, 536): both launches still span a 512-k step plus a 24-k tail.
SANITIZER_SIZES = {(1096, 536, 4): (1096, 72), (1096, 536, 8): (536, 536)}
if sanitize_mode() == "thread":
    CASES = [(*c[:3], *SANITIZER_SIZES.get((c[3], c[4], c[5]), c[3:5]), *c[5:]) for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-k{}-E{}-D{}-F{}-int{}-g{}-sym{}-{}-{}".format(*c))
def test_moe_decode_q(decode_q_prog, case):
    """One case against the double-precision reference (module docstring). Cannot show:
    bandwidth, registers, device FMA contraction."""
    _run(decode_q_prog, *case, 1)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_moe_decode_q_16b_shape(decode_q_prog, bits):
    """The DeepSeekMoE-16B expert shape (D 2048, F 1408: several warp steps per row, 11 or 16
    groups of 128). Cannot show: bandwidth at that size."""
    if sanitize_mode() == "thread":
        pytest.skip("minutes on TSan's threads; the same paths run at small sizes")
    _run(decode_q_prog, 2, 2, 2, 2048, 1408, bits, 128, 0, "fp16", "uniform", 1)


@pytest.mark.parametrize("order", ORDERS)
def test_moe_decode_q_thread_orders(decode_q_prog, order):
    """The slot list in shared memory is rebuilt between passes behind two barriers; a missing
    one shows only in some orders. Cannot show: GPU interleavings no sampled order produces."""
    _run(decode_q_prog, 16, 6, 8, 136, 72, 4, 64, 0, "bf16", "one", 2, order=order, seed=5)


def test_moe_decode_q_errors(decode_q_prog):
    """Launcher preconditions (decode and repack) throw std::invalid_argument naming the value."""
    out = _run(decode_q_prog, "errors")
    assert "FAIL" not in out and out.count("ok ") == 7, out


def test_moe_decode_q_threads_backend(decode_q_prog):
    """One OS thread per CUDA thread, run concurrently between waits: the same answer as fibers.
    (MOE_EMU_SANITIZE=thread builds this under ThreadSanitizer.) Cannot show: GPU scheduling."""
    r = run_program(decode_q_prog, "2", "2", "4", "136", "72", "4", "32", "0", "fp16", "one", "1",
                    backend="threads", timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
