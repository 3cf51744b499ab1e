"""Batch invariance of the CUDA expert path, as stated in csrc/cuda/moe_decode.cu and
expert_gemm.cu ("Batch invariance"), checked on the emulator through the emu backend:

  - bitwise within a path: a token's expert_out rows do not depend on the other tokens of the
    batch for T <= 16 (moe_decode: each slot's sums run in the same lane order whoever else is
    there) nor for T > 16 (expert_gemm: each row's k-order is fixed, at block_m 16 or 64);
  - across the T = 16 / 17 switch the two paths agree within the expert_ffn tolerance
    (tests/tolerances.py), not bitwise (lane-strided fp32 sums vs the mma k-order).

Sentinel rows (slot id -1) are zeros on both paths.
Cannot show: the tensor cores' own accumulation order inside one mma (the emulator sums each
mma exactly and rounds once; a GPU may round differently, but the same way for every row, so
the bitwise property is expected to hold there too; the `cuda` test below checks it on a GPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tolerances import assert_close  # noqa: E402

E, K, D, F = 8, 2, 64, 64


@pytest.fixture(scope="module")
def data():
    from moe_engine.ops import available_backends
    if "emu" not in available_backends():
        pytest.skip("the emu backend (_C_emu) is not built")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(140, D, generator=g) * 0.5).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(140)]).int()
    ids[5, 1] = -1  # a sentinel slot (top-k below k_max)
    gu = (torch.randn(E, 2 * F, D, generator=g) / D ** 0.5).bfloat16()
    dn = (torch.randn(E, D, F, generator=g) / F ** 0.5).bfloat16()
    return x, ids, gu, dn


def _run(data, n, backend="emu"):
    from moe_engine.ops import expert_ffn
    dev = "cuda" if backend == "cuda" else "cpu"
    x, ids, gu, dn = (t.to(dev) for t in data)
    return expert_ffn(x[:n], ids[:n], gu, dn, backend=backend).cpu()


def test_bitwise_within_the_decode_path(data):
    full = _run(data, 16)
    for n in (1, 6, 9):
        assert torch.equal(_run(data, n), full[:n]), f"T={n} rows differ from the same rows in T=16"
    assert torch.equal(full[5, 1], torch.zeros(D, dtype=torch.bfloat16)), "sentinel row not zero (decode)"


def test_bitwise_within_the_gemm_path(data):
    full = _run(data, 140)  # R = 280 >= 32 E: block_m 64
    for n in (17, 40):      # block_m 16
        assert torch.equal(_run(data, n), full[:n]), f"T={n} rows differ from the same rows in T=140"
    assert torch.equal(full[5, 1], torch.zeros(D, dtype=torch.bfloat16)), "sentinel row not zero (gemm)"


def test_paths_agree_within_tolerance(data):
    small, big = _run(data, 16), _run(data, 17)
    assert_close(small, big[:16], "expert_ffn", torch.bfloat16, "T=16 (moe_decode) vs T=17 (expert_gemm)")


@pytest.mark.cuda
def test_batch_invariance_on_the_gpu(data):
    """The same three properties on a GPU, where the tensor cores' own rounding applies."""
    from moe_engine.ops import available_backends
    if "cuda" not in available_backends():
        pytest.skip("needs a GPU and the cuda backend")
    full16, full140 = _run(data, 16, "cuda"), _run(data, 140, "cuda")
    for n in (1, 6, 9):
        assert torch.equal(_run(data, n, "cuda"), full16[:n]), f"T={n}"
    for n in (17, 40):
        assert torch.equal(_run(data, n, "cuda"), full140[:n]), f"T={n}"
    assert not full16[5, 1].any() and not full140[5, 1].any(), "sentinel rows not zero"
    assert_close(full16, _run(data, 17, "cuda")[:16], "expert_ffn", torch.bfloat16, "cuda T=16 vs T=17")
