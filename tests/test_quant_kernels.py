"""The quantized cpu kernels (csrc/cpu/quant_gemm.cpp via moe_engine.ops.quant) against a
dequantize-then-matmul reference written here from the GPTQ description:

    w[n, k] = scales[k // g, n] * (q[k, n] - z[k // g, n])

with q packed along Din into int32 qweight [Din*bits/32, Dout] and z along Dout into qzeros
[G, ceil(Dout*bits/32)], low bits first. The packer below builds those tensors from random codes
independently of the library (it never calls pack_quantized's internals).

Every bits x group size x symmetry, fp16 and bf16 scales, fp32 and bf16 activations, awkward
sizes (Din not a multiple of the group size, Dout = 1..3 and 32 + 1..3 tails, T in {1, 2, 7, 16, 17,
129}), 1 vs 2 threads bitwise, a row's bits independent of the other rows of its call.
Tolerances: tests/tolerances.py. tools/test_cpu_isas.sh runs this file against each ISA build.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as Fn

from moe_engine.ops.quant import (dequantize_packed, expert_ffn_q_cpu, expert_ffn_q_workspace_bytes, linear_q_cpu,
                                  linear_q_workspace_bytes, pack_quantized)
from tolerances import assert_close

TS = (1, 2, 7, 16, 17, 129)
FORMATS = [(b, g, s) for b in (4, 8) for g in (32, 64, 128) for s in (False, True)]


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)  # torch and _C share one OpenMP runtime
    try:
        yield
    finally:
        torch.set_num_threads(old)


def pack_words(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack `bits`-bit codes along `dim` (zero-padded to whole words) into int32, element i of a
    word at bit offset (i % (32/bits)) * bits."""
    per = 32 // bits
    c = codes.long().movedim(dim, -1)
    pad = -c.shape[-1] % per
    c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)
    words = (c << (torch.arange(per) * bits)).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


class QCase:
    """Random codes, zeros and scales of E weights [Dout, Din], their GPTQ tensors and the dense reference."""

    def __init__(self, E, Dout, Din, bits, g, sym, scale_dtype=torch.float16, scale=None):
        G = -(-Din // g)
        self.q = torch.randint(0, 1 << bits, (E, Din, Dout))
        if sym:
            self.z = torch.full((E, G, Dout), 1 << (bits - 1))
        else:
            self.z = torch.randint(0, 1 << bits, (E, G, Dout))
        # weights ~0.1 in magnitude, as the tolerance table assumes
        base = scale if scale is not None else 0.1 / (1 << (bits - 1))
        self.scales = (torch.rand(E, G, Dout) * base + base / 2).to(scale_dtype)
        self.qweight = pack_words(self.q, bits, 1)
        self.qzeros = pack_words(self.z, bits, 2)
        k_group = torch.arange(Din) // g
        w_kn = self.scales.float()[:, k_group, :] * (self.q - self.z[:, k_group, :]).float()  # [E, Din, Dout]
        self.w = w_kn.transpose(1, 2).contiguous()  # [E, Dout, Din] fp32, exact
        self.bits, self.g, self.sym = bits, g, sym

    def pack(self, gate_up=False, stacked=True, zeros=True):
        sl = (lambda t: t) if stacked else (lambda t: t[0])
        qz = sl(self.qzeros) if zeros else None
        return pack_quantized(sl(self.qweight), sl(self.scales), qz, self.bits, self.g, self.sym, gate_up=gate_up)


# ---- pack / dequantize -------------------------------------------------------------------------
@pytest.mark.parametrize("bits,g,sym", FORMATS)
def test_dequantize_packed_is_exact(bits, g, sym):
    for E, Dout, Din, gate_up in ((1, 1, 8 * 13, False), (2, 35, 264, False), (3, 2 * 20, 200, True)):
        c = QCase(E, Dout, Din, bits, g, sym, scale_dtype=torch.bfloat16 if Dout % 2 else torch.float16)
        got = dequantize_packed(c.pack(gate_up=gate_up))
        assert torch.equal(got, c.w), f"dequantize [E={E} Dout={Dout} Din={Din} gate_up={gate_up}]"
        got16 = dequantize_packed(c.pack(gate_up=gate_up), torch.bfloat16)
        assert torch.equal(got16, c.w.to(torch.bfloat16))
    c = QCase(1, 33, 96, bits, g, sym)
    assert torch.equal(dequantize_packed(c.pack(stacked=False)), c.w[0])
    if sym:  # qzeros may be left out when symmetric
        assert torch.equal(dequantize_packed(c.pack(stacked=False, zeros=False)), c.w[0])


# ---- linear ------------------------------------------------------------------------------------
SHAPES = ((1, 200), (2, 96), (3, 8 * 17), (33, 264), (35, 128), (66, 520))  # (Dout, Din), Din % 8 == 0


@pytest.mark.parametrize("bits,g,sym", FORMATS)
def test_linear_q_matches_dequantized_matmul(bits, g, sym):
    for i, (Dout, Din) in enumerate(SHAPES):
        c = QCase(1, Dout, Din, bits, g, sym, scale_dtype=(torch.float16, torch.bfloat16)[i % 2])
        pw = c.pack(stacked=False)
        w = c.w[0]
        for T in TS:
            for dt in (torch.float32, torch.bfloat16):
                x = (torch.randn(T, Din) * 0.1).to(dt)
                ref = (x.float() @ w.t()).to(dt)
                assert_close(linear_q_cpu(x, pw), ref, "expert_ffn", dt, f"linear_q T={T} Dout={Dout} Din={Din}")


@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("dt", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("Din,g", [(1024, 64), (1352, 128)])  # 11 groups, the last partial: a single
def test_linear_q_row_bits_do_not_depend_on_the_call(bits, dt, Din, g):  # one after the pairs of one-row tiles
    """A row's result is the same bits alone, in any tile, and with 1 or 2 threads."""
    c = QCase(1, 70, Din, bits, g, False)
    pw = c.pack(stacked=False)
    x = (torch.randn(29, Din) * 0.1).to(dt)
    whole = linear_q_cpu(x, pw)
    for i in range(29):
        assert torch.equal(whole[i:i + 1], linear_q_cpu(x[i:i + 1].contiguous(), pw)), f"row {i}"
    assert torch.equal(whole[3:20], linear_q_cpu(x[3:20].contiguous(), pw))
    ws = torch.empty(linear_q_workspace_bytes(29, pw), dtype=torch.uint8)
    assert torch.equal(whole, linear_q_cpu(x, pw, torch.empty_like(whole), workspace=ws))
    with threads(1):
        one = linear_q_cpu(x, pw)
    with threads(2):
        two = linear_q_cpu(x, pw)
    assert torch.equal(one, two) and torch.equal(one, whole), "1 vs 2 threads differ"


def test_linear_q_nonfinite_input_stays_in_its_row():
    c = QCase(1, 40, 256, 4, 32, False)
    pw = c.pack(stacked=False)
    x = torch.randn(5, 256) * 0.1
    x[2, 7] = float("inf")
    y = linear_q_cpu(x, pw)
    assert not torch.isfinite(y[2]).all()
    keep = torch.tensor([0, 1, 3, 4])
    assert_close(y[keep], x[keep] @ c.w[0].t(), "expert_ffn", torch.float32, "finite rows")


# ---- expert FFN --------------------------------------------------------------------------------
def expert_ffn_q_ref(x, ids, w13, w2):
    """Dense reference: fp32 math on the dequantized weights, SiLU*up rounded to x's dtype."""
    T, k_max = ids.shape
    E, F2, D = w13.shape
    F = F2 // 2
    out = torch.zeros(T * k_max, D, dtype=x.dtype)
    flat = ids.reshape(-1).long()
    for e in range(E):
        slots = (flat == e).nonzero().squeeze(1)
        if slots.numel():
            gu = x[slots // k_max].float() @ w13[e].t()
            h = (Fn.silu(gu[:, :F]) * gu[:, F:]).to(x.dtype).float()
            out[slots] = (h @ w2[e].t()).to(x.dtype)
    return out.view(T, k_max, D)


def random_ids(T, k, E):
    return torch.argsort(torch.rand(T, E), dim=1)[:, :k].int()


@pytest.mark.parametrize("bits,g,sym", FORMATS)
def test_expert_ffn_q_matches_dequantized_ref(bits, g, sym):
    E, D, F = 8, 200, 40  # D, F not multiples of 32 or of g: short last groups, padded panels
    c13 = QCase(E, 2 * F, D, bits, g, sym)
    c2 = QCase(E, D, F, bits, g, sym, scale_dtype=torch.bfloat16)
    w13, w2 = c13.pack(gate_up=True), c2.pack()
    for i, T in enumerate(TS):
        for k in ((1, 6)[i % 2],):
            ids = torch.cat([random_ids(T, k, E), torch.full((T, 1), -1, dtype=torch.int32)], 1)  # k_max = k + 1
            if T > 2:
                ids[1, 0] = E  # out of range: a sentinel as well
                ids[2, :k] = torch.arange(k, dtype=torch.int32) % E  # skew onto the low experts
            for dt in (torch.float32, torch.bfloat16):
                x = (torch.randn(T, D) * 0.1).to(dt)
                got = expert_ffn_q_cpu(x, ids, w13, w2)
                ref = expert_ffn_q_ref(x, ids, c13.w, c2.w)
                assert_close(got, ref, "expert_ffn", dt, f"expert_ffn_q T={T} k={k}")
                sentinel = (ids < 0) | (ids >= E)
                assert (got[sentinel] == 0).all(), "sentinel slots must be zero rows"


@pytest.mark.parametrize("dt", (torch.float32, torch.bfloat16))
def test_expert_ffn_q_threads_and_rows(dt):
    """1 vs 2 threads bitwise, and a token's slots give the same bits alone as in a batch."""
    E, D, F = 16, 256, 96
    w13 = QCase(E, 2 * F, D, 4, 128, False).pack(gate_up=True)
    w2 = QCase(E, D, F, 8, 32, True).pack()
    T, k = 33, 4
    ids = random_ids(T, k, E)
    x = (torch.randn(T, D) * 0.1).to(dt)
    with threads(1):
        one = expert_ffn_q_cpu(x, ids, w13, w2)
    with threads(2):
        two = expert_ffn_q_cpu(x, ids, w13, w2)
    assert torch.equal(one, two), "1 vs 2 threads differ"
    ws = torch.empty(expert_ffn_q_workspace_bytes(T, k + 1, w13, w2), dtype=torch.uint8)  # k_max larger: fits
    out = torch.empty(T, k, D, dtype=dt)
    assert torch.equal(one, expert_ffn_q_cpu(x, ids, w13, w2, out=out, workspace=ws))
    for t in (0, 5, 32):
        assert torch.equal(one[t:t + 1], expert_ffn_q_cpu(x[t:t + 1].contiguous(), ids[t:t + 1].contiguous(), w13, w2))


def test_expert_ffn_q_empty_and_all_sentinel():
    E, D, F = 4, 64, 32
    w13 = QCase(E, 2 * F, D, 8, 32, False).pack(gate_up=True)
    w2 = QCase(E, D, F, 8, 32, False).pack()
    assert expert_ffn_q_cpu(torch.randn(0, D), torch.zeros(0, 2, dtype=torch.int32), w13, w2).shape == (0, 2, D)
    out = torch.full((3, 2, D), float("nan"))
    expert_ffn_q_cpu(torch.randn(3, D), torch.full((3, 2), -1, dtype=torch.int32), w13, w2, out=out)
    assert (out == 0).all()


# ---- validation --------------------------------------------------------------------------------
def test_bad_inputs_raise_with_the_value():
    c = QCase(1, 16, 64, 4, 32, False)
    qw, sc, qz = c.qweight[0], c.scales[0], c.qzeros[0]
    with pytest.raises(ValueError, match="bits=3"):
        pack_quantized(qw, sc, qz, 3, 32, False)
    with pytest.raises(ValueError, match="group_size=48"):
        pack_quantized(qw, sc, qz, 4, 48, False)
    with pytest.raises(ValueError, match="scales has shape"):
        pack_quantized(qw, sc[:1], qz, 4, 32, False)
    with pytest.raises(ValueError, match="scales has dtype"):
        pack_quantized(qw, sc.float(), qz, 4, 32, False)
    with pytest.raises(ValueError, match="qzeros is required"):
        pack_quantized(qw, sc, None, 4, 32, False)
    with pytest.raises(ValueError, match="sym=True but qzeros holds"):
        pack_quantized(qw, sc, pack_words(torch.full((2, 16), 7), 4, 1), 4, 32, True)
    with pytest.raises(ValueError, match="gate_up weight has Dout=15"):
        pack_quantized(c.qweight[0][:, :15], sc[:, :15], pack_words(c.z[0][:, :15], 4, 1), 4, 32, False, gate_up=True)
    pw = pack_quantized(qw, sc, qz, 4, 32, False)
    with pytest.raises(ValueError, match=r"x has shape \[2, 63\]"):
        linear_q_cpu(torch.randn(2, 63), pw)
    with pytest.raises(ValueError, match="x has dtype torch.float16"):
        linear_q_cpu(torch.randn(2, 64).half(), pw)
    with pytest.raises(ValueError, match="workspace has 10 bytes"):
        linear_q_cpu(torch.randn(2, 64), pw, workspace=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="packed_w13 must be packed with gate_up=True"):
        expert_ffn_q_cpu(torch.randn(2, 64), torch.zeros(2, 1, dtype=torch.int32), pw, pw)
