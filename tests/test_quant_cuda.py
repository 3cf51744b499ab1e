"""The quantized CUDA expert kernels (csrc/cuda/moe_decode_q.cu) through moe_engine.ops.quant on
the emu backend, against a dequantise-then-matmul PyTorch reference (test_quant_kernels.py's
QCase packer and expert_ffn_q_ref, written from the GPTQ description, never from the library).

Every bits x group size x symmetry, fp16 and bf16 scales, awkward sizes (D = 200 and F = 40: K not
a multiple of 32 nor of the group size, so the padded codes and the short last group run),
T in {1, 2, 7, 16} (moe_decode_q) and 17 (align + expert_gemm_q), runtime k < k_max with -1 and
>= E sentinels, dense mode (topk_ids None); a token's bits alone equal its bits in a batch (the
batch-invariance rule of moe_decode / expert_gemm). On a GPU the same test runs with backend
"cuda" (pytest -m cuda).
The emu thread order comes from MOE_EMU_ORDER (tools/run_emu_tests.sh runs tests/emu, which has
the kernels' own programs in three orders and under ASan/UBSan: tests/emu/test_moe_decode_q.py,
tests/emu/test_expert_gemm_q.py).
Tolerances: tests/tolerances.py ("expert_ffn", bf16).

What the emulator cannot show: bandwidth, occupancy, registers and spills (tools/check_ptxas.py),
device numerics (FMA contraction: compare with tolerances, not bits, across machines), weak
memory and real warp scheduling; a GPU run of this file with backend "cuda" is the check of those.
"""
import pytest
import torch

from moe_engine.ops import available_backends
from moe_engine.ops.quant import (CudaQWeight, expert_ffn_q_cuda, expert_ffn_q_cuda_bytes, linear_q_cuda,
                                  repack_quantized_cuda)
from test_quant_kernels import FORMATS, QCase, expert_ffn_q_ref, random_ids
from tolerances import assert_close

pytestmark = pytest.mark.skipif("emu" not in available_backends(), reason="moe_engine._C_emu not built")
BACKENDS = [pytest.param("emu", marks=pytest.mark.emu),
            pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif("cuda" not in available_backends(),
                                                                             reason="no GPU")])]
DEVICE = {"emu": "cpu", "cuda": "cuda"}


def repack(c: QCase, zeros=True, backend="emu"):
    dev = DEVICE[backend]
    qz = c.qzeros.to(dev) if zeros else None
    return repack_quantized_cuda(c.qweight.to(dev), c.scales.to(dev), qz, c.bits, c.g, c.sym, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,g,sym", FORMATS)
def test_expert_ffn_q_matches_dequantized_ref(bits, g, sym, backend):
    """T <= 16 runs moe_decode_q (exact weights), T = 17 align + expert_gemm_q (weights rounded
    to bf16 for the tensor cores): both within the expert_ffn bf16 tolerance of the exact
    dequantised reference. Cannot show on emu: device FMA contraction and mma accumulation order
    (the cuda parametrisation does, on a GPU)."""
    E, D, F = 6, 200, 40
    dev = DEVICE[backend]
    sdt = torch.bfloat16 if g == 64 else torch.float16
    c13, c2 = QCase(E, 2 * F, D, bits, g, sym, scale_dtype=sdt), QCase(E, D, F, bits, g, sym, scale_dtype=sdt)
    w13, w2 = repack(c13, zeros=not sym, backend=backend), repack(c2, backend=backend)
    for i, T in enumerate((1, 2, 7, 16, 17)):
        k = (1, 3)[i % 2]
        ids = torch.cat([random_ids(T, k, E), torch.full((T, 1), -1, dtype=torch.int32)], 1)  # k_max = k + 1
        if T > 2:
            ids[1, 0] = E  # out of range: a sentinel too
        x = (torch.randn(T, D) * 0.1).bfloat16()
        got = expert_ffn_q_cuda(x.to(dev), ids.to(dev), w13, w2, backend=backend).cpu()
        ref = expert_ffn_q_ref(x, ids, c13.w, c2.w)
        assert_close(got, ref, "expert_ffn", torch.bfloat16, f"int{bits} g{g} sym={sym} T={T} k={k}")
        sentinel = (ids < 0) | (ids >= E)
        assert (got[sentinel] == 0).all(), "sentinel slots must be zero rows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,g,sym", [(4, 32, False), (4, 128, True), (8, 64, False), (8, 32, True)])
def test_linear_q_cuda_matches_dequantized_ref(bits, g, sym, backend):
    """linear_q_cuda (expert_gemm_q's down launch, dense mode: the attention projections) against
    x @ W^T on the exact dequantised weight, K = 200 (a short last group), N = 40 (a partial N tile),
    T = 1, 5, 17 and 70 (both BM tiles); a row's bits do not depend on the call's other rows.
    Cannot show on emu: the mma accumulation order on a device (the cuda parametrisation does)."""
    dev = DEVICE[backend]
    c = QCase(1, 40, 200, bits, g, sym, scale_dtype=torch.bfloat16 if bits == 8 else torch.float16)
    w = repack_quantized_cuda(c.qweight[0].to(dev), c.scales[0].to(dev), None if sym else c.qzeros[0].to(dev),
                              bits, g, sym, backend=backend)
    x = (torch.randn(70, 200) * 0.1).bfloat16()
    full = linear_q_cuda(x.to(dev), w).cpu()
    for T in (1, 5, 17, 70):
        got = linear_q_cuda(x[:T].to(dev), w).cpu()
        ref = (x[:T].float() @ c.w[0].t()).bfloat16()
        assert_close(got, ref, "expert_ffn", torch.bfloat16, f"int{bits} g{g} sym={sym} T={T}")
        assert torch.equal(got, full[:T]), f"T={T}: rows changed with the batch"
    with pytest.raises(ValueError, match="plain"):
        linear_q_cuda(x, repack(QCase(2, 16, 64, bits, g, sym), backend=backend))
    with pytest.raises(ValueError, match="x"):
        linear_q_cuda(x[:, :64].contiguous().to(dev), w)


def test_dense_mode_and_batch_invariance():
    """topk_ids None runs every token through expert 0 (shared experts, dense MLPs), at T = 16
    (moe_decode_q) and T = 20 (expert_gemm_q, no slot lists); a token's rows alone are bitwise
    its rows in a batch of 16 (T <= 16), and in a batch of 20 its rows in one of 17 (grouped GEMM).
    Cannot show: that the GPU's accumulation order keeps the same invariance (it is the same
    order by construction; a GPU run of the cuda tests checks the values)."""
    D, F = 64, 48
    c13, c2 = QCase(1, 2 * F, D, 4, 32, False), QCase(1, D, F, 4, 32, False)
    w13, w2 = repack(c13), repack(c2)
    x = (torch.randn(20, D) * 0.1).bfloat16()
    for T in (16, 20):
        got = expert_ffn_q_cuda(x[:T], None, w13, w2, backend="emu")
        ref = expert_ffn_q_ref(x[:T], torch.zeros(T, 1, dtype=torch.int32), c13.w, c2.w)
        assert_close(got, ref, "expert_ffn", torch.bfloat16, f"dense T={T}")
    small = expert_ffn_q_cuda(x[:16], None, w13, w2, backend="emu")
    for t in (0, 9):
        assert torch.equal(small[t:t + 1], expert_ffn_q_cuda(x[t:t + 1].contiguous(), None, w13, w2, backend="emu"))
    big = expert_ffn_q_cuda(x, None, w13, w2, backend="emu")
    assert torch.equal(big[:17], expert_ffn_q_cuda(x[:17], None, w13, w2, backend="emu"))


def test_repack_layout_and_bytes():
    """The qrow layout of one row, read back: codes in GPTQ order along K, then per group the
    scale bits | (z + 128) << 16 at 4 bits; rows padded to 16 bytes. Cannot show: the repack
    kernel's speed on a GPU (it runs once per load)."""
    c = QCase(1, 8, 72, 4, 32, False)  # K = 72: codes padded to 96 k, 3 groups padded to 4
    w = repack(c)
    assert isinstance(w, CudaQWeight) and w.data.shape == (1, 8, 48 + 16)
    row = w.data[0, 3].view(torch.int32)
    assert torch.equal(row[:9], c.qweight[0, :, 3]) and (row[9:12] == 0).all()
    meta = row[12:15].long() & 0xFFFFFFFF
    scale_bits = c.scales[0, :, 3].view(torch.int16).long() & 0xFFFF
    assert torch.equal(meta & 0xFFFF, scale_bits) and torch.equal(meta >> 16, c.z[0, :, 3] + 128)
    assert row[15] == 0
    ids = torch.tensor([[0, -1]], dtype=torch.int32)
    assert expert_ffn_q_cuda_bytes(1, 2, w, w, ids) == w.nbytes * 2 + 2 * (72 + 2 * 2 * 4 + 2 * 72)


def test_bad_inputs_raise_with_the_value():
    """Typed errors naming the bad value, from Python and from the launchers. Nothing the
    emulator could miss: the checks run before any launch."""
    c13, c2 = QCase(2, 16, 64, 8, 32, False), QCase(2, 64, 8, 8, 32, False)
    w13, w2 = repack(c13), repack(c2)
    x = torch.randn(17, 64).bfloat16()
    with pytest.raises(ValueError, match="topk_ids has shape"):
        expert_ffn_q_cuda(x, torch.zeros(16, 1, dtype=torch.int32), w13, w2, backend="emu")
    with pytest.raises(ValueError, match="float32"):
        expert_ffn_q_cuda(x[:2].float(), None, w13, w2, backend="emu")
    with pytest.raises(ValueError, match="qzeros is required"):
        repack_quantized_cuda(c13.qweight, c13.scales, None, 8, 32, False, backend="emu")
    with pytest.raises(ValueError, match="group_size=48"):
        repack_quantized_cuda(c13.qweight, c13.scales, c13.qzeros, 8, 48, False, backend="emu")
    with pytest.raises(ValueError, match="backend 'cuda' or 'emu'"):
        repack_quantized_cuda(c13.qweight, c13.scales, c13.qzeros, 8, 32, False, backend="cpu")
    w2_4 = repack(QCase(2, 64, 8, 4, 32, False))
    with pytest.raises(ValueError, match="one format"):
        expert_ffn_q_cuda(x[:2], None, w13, w2_4, backend="emu")
