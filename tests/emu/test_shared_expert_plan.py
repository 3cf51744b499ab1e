"""The shared experts' plan and batch invariance on cuda, as stated in csrc/cuda/shared_expert.cu
("Batch invariance"), checked on the emulator through the emu backend:

  - a token's shared_out row has the same bits in two batches whose shared_expert_plan has the
    same (decode, up_splits, down_splits), whatever the tile height (block_m 16 or 64) and the
    other rows;
  - between plans (moe_decode vs expert_gemm, or another split count) the rows agree within the
    expert_ffn tolerance (tests/tolerances.py).

D = 136 and S = 1032 are no tile multiples, and at these sizes every batch splits the down
projection (5 ranges on the decode path, 9 on the GEMM path, which also splits gate_up into 3),
so the split-K reduces are in every comparison. Cannot show: the tensor cores' own rounding (the `cuda` test repeats it on a GPU),
whether the split grids fill a GPU, or their speed.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tolerances import assert_close  # noqa: E402

D, S = 136, 1032
TS = (1, 7, 16, 17, 33, 127, 128)


def _module(backend):
    from moe_engine.ops import available_backends, backend as backends
    if backend not in available_backends():
        pytest.skip(f"the {backend} backend is not available here")
    return backends.native_module(backend)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(max(TS), D, generator=g).bfloat16()
    gate_up = (torch.randn(2 * S, D, generator=g) / D ** 0.5).bfloat16()
    down = (torch.randn(D, S, generator=g) / S ** 0.5).bfloat16()
    return x, gate_up, down


def _outputs(data, backend):
    from moe_engine.ops.expert_ffn import shared_expert_cuda
    dev = "cuda" if backend == "cuda" else "cpu"
    x, gate_up, down = (t.to(dev) for t in data)
    return {T: shared_expert_cuda(x[:T].contiguous(), gate_up, down, backend=backend).cpu() for T in TS}


def _check_invariance(data, backend):
    mod = _module(backend)
    plans = {T: mod.shared_expert_plan(T, D, S, True) for T in TS}
    outs = _outputs(data, backend)
    same = other = across_tiles = 0
    for a, b in itertools.combinations(TS, 2):
        key_a, key_b = (plans[a][0], *plans[a][2:4]), (plans[b][0], *plans[b][2:4])  # (decode, up, down splits)
        if key_a == key_b:
            assert torch.equal(outs[a], outs[b][:a]), f"T={a} and T={b} share the plan {key_a} but differ"
            same += 1
            across_tiles += plans[a][1] != plans[b][1]
        else:
            assert_close(outs[a], outs[b][:a], "expert_ffn", torch.bfloat16, f"T={a} {plans[a]} vs T={b} {plans[b]}")
            other += 1
    assert same and other and across_tiles, "the sizes no longer cover equal plans, other plans and both tile heights"


def test_plan_table():
    """The plan the header's table describes, on the DeepSeekMoE-16B shape (D 2048, S 2816)."""
    mod = _module("emu")
    D16, S16 = 2048, 2816
    plan = {T: mod.shared_expert_plan(T, D16, S16, True) for T in (1, 16, 17, 32, 33, 64, 65, 128, 129, 384, 385)}
    want = {1: (True, 0, 1, 3), 16: (True, 0, 1, 3), 17: (False, 16, 2, 5), 32: (False, 16, 2, 5),
            33: (False, 16, 1, 3), 64: (False, 16, 1, 3), 65: (False, 64, 2, 5), 128: (False, 64, 2, 5),
            129: (False, 64, 1, 3), 384: (False, 64, 1, 2), 385: (False, 64, 1, 1)}
    assert {T: p[:4] for T, p in plan.items()} == want
    for T, (_, _, up, down, floats) in plan.items():  # one scratch, the larger of the two
        need = max(2 * up * T * S16 if up > 1 else 0, down * T * D16 if down > 1 else 0)
        assert floats == need, (T, plan[T])
    # a strided x cannot take moe_decode; bad sizes are refused with their name
    assert mod.shared_expert_plan(8, 2048, 2816, False)[0] is False
    with pytest.raises(ValueError, match="T=-1"):
        mod.shared_expert_plan(-1, 2048, 2816, True)


def test_batch_invariance_emu(data):
    _check_invariance(data, "emu")


def test_missing_partial_is_refused(data):
    """A split plan without its fp32 scratch is refused, naming the size it needs."""
    mod = _module("emu")
    from moe_engine.ops import backend as backends
    x, gate_up, down = data
    x = x[:7].contiguous()
    out = torch.empty(7, D, dtype=torch.bfloat16)
    act = torch.empty(7, S, dtype=torch.bfloat16)
    p = mod.SharedExpertParams()
    p.x, p.x_stride, p.gate_up, p.down = backends.ptr(x), D, backends.ptr(gate_up), backends.ptr(down)
    p.act, p.shared_out, p.T, p.D, p.S = backends.ptr(act), backends.ptr(out), 7, D, S
    with pytest.raises(ValueError, match="partial must hold"):
        mod.shared_expert_cuda(p, 0, -1)


@pytest.mark.cuda
def test_batch_invariance_on_the_gpu(data):
    """The same property on a GPU, where the tensor cores' own rounding applies."""
    _check_invariance(data, "cuda")
