"""quant.py: the GPTQ tensors read back exactly what an independent packer (written here, from the
published description in docs/quantization.md, with plain Python integers) wrote, in both
zero-point conventions; our packer writes the same words; round-to-nearest quantization stays
within half a step of every weight at awkward sizes (partial last group, odd expert counts)."""
import random

import pytest
import torch

from moe_engine.quant import (QuantError, QuantizedWeight, QuantSpec, pack_cols, pack_rows, quantize,
                              unpack_cols, unpack_rows)


def _int32(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def reference_gptq(q, z, scales, bits, g, v1):
    """The description, literally: q[k][n] integer codes, z[grp][n] true zeros, scales[grp][n].
    qweight[i][n]: code of row k = i*p + j in bits [bits*j, bits*j + bits); qzeros[grp][i]:
    zero of column n = i*p + j likewise; v1 stores z - 1."""
    p = 32 // bits
    Din, Dout = len(q), len(q[0])
    G = len(z)
    qweight = [[_int32(sum(q[i * p + j][n] << (bits * j) for j in range(p))) for n in range(Dout)]
               for i in range(Din // p)]
    mask = (1 << bits) - 1
    qzeros = [[_int32(sum(((z[grp][i * p + j] - (1 if v1 else 0)) & mask) << (bits * j) for j in range(p)))
               for i in range(Dout // p)] for grp in range(G)]
    w = [[scales[k // g][n] * (q[k][n] - z[k // g][n]) for k in range(Din)] for n in range(Dout)]
    return (torch.tensor(qweight, dtype=torch.int32), torch.tensor(qzeros, dtype=torch.int32),
            torch.tensor(scales, dtype=torch.float16), torch.tensor(w, dtype=torch.float64))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("v1", [True, False])
def test_reader_matches_independent_packer(bits, g, v1):
    rng = random.Random(bits * 1000 + g + v1)
    p = 32 // bits
    Din, Dout = 5 * p + (3 * p if g == 32 else 0) + 2 * p, 3 * p  # Din not a multiple of g: partial last group
    G = -(-Din // g)
    maxq = (1 << bits) - 1
    q = [[rng.randint(0, maxq) for _ in range(Dout)] for _ in range(Din)]
    q[0][0], q[1][0] = maxq, 0  # the sign bit of a word and the extremes
    q[p - 1][1] = maxq          # top slot of the first word: bits 28..31 (4-bit) set
    z = [[rng.randint(1, maxq) for _ in range(Dout)] for _ in range(G)]  # v1 cannot hold z = 0
    z[0][Dout - 1] = maxq
    scales = [[float(torch.tensor(rng.uniform(1e-3, 0.1)).half()) for _ in range(Dout)] for _ in range(G)]
    qweight, qzeros, s16, w = reference_gptq(q, z, scales, bits, g, v1)
    qw = QuantizedWeight(qweight, s16, qzeros, bits, g, sym=False, zero_offset=1 if v1 else 0)
    assert qw.shape == (Dout, Din)
    codes, zeros = qw.codes()
    assert codes.tolist() == q and zeros.tolist() == z
    torch.testing.assert_close(qw.dequantize().double(), w, atol=0, rtol=0)  # fp32 holds it exactly
    # our packer writes the same words
    assert torch.equal(pack_rows(torch.tensor(q), bits), qweight)
    assert torch.equal(pack_cols(torch.tensor(z) - (1 if v1 else 0), bits), qzeros)


def test_pack_unpack_round_trip_with_leading_dims():
    for bits in (4, 8):
        x = torch.randint(0, 1 << bits, (3, 2, 32 // bits * 7, 5), dtype=torch.int32)
        assert torch.equal(unpack_rows(pack_rows(x, bits), bits), x)
        y = x.transpose(-1, -2).contiguous()
        assert torch.equal(unpack_cols(pack_cols(y, bits), bits), y)


CASES = [(4, 32, True), (4, 64, False), (4, 128, True), (4, 128, False), (8, 32, False),
         (8, 64, True), (8, 128, True), (8, 128, False)]


@pytest.mark.parametrize("bits,g,sym", CASES)
@pytest.mark.parametrize("shape", [(24, 200), (3, 16, 40), (1, 8, 8)])
def test_round_to_nearest_error_bound(bits, g, sym, shape):
    """|w - dequant| <= s/2 per group (s = the stored fp16 scale), at Din below, at and off a
    multiple of g; a group of zeros, an all-positive group (z would be 0 asym) and one large value
    included. Asymmetric allows s: rounding the zero point can add half a step at an end."""
    torch.manual_seed(bits + g)
    w = torch.randn(*shape) * 0.05
    w.reshape(-1, shape[-1])[0, : min(g, shape[-1])] = 0.0
    if w.reshape(-1, shape[-1]).shape[0] > 1:
        w.reshape(-1, shape[-1])[1] = w.reshape(-1, shape[-1])[1].abs()
    w.reshape(-1)[-1] = 3.0
    qw = quantize(w.bfloat16(), QuantSpec(bits, g, sym))
    d = qw.dequantize()
    s = qw.scales.float().index_select(-2, qw.g_idx.long()).transpose(-1, -2)
    ratio = ((d - w.bfloat16().float()).abs() / s)
    assert float(ratio.max()) <= (0.5 + 1e-6 if sym else 1.0)
    codes, zeros = qw.codes()
    assert int(codes.min()) >= 0 and int(codes.max()) < 1 << bits
    if sym:
        assert bool((zeros == 1 << (bits - 1)).all())
    else:
        assert int(zeros.min()) >= 1  # the v1 format stores z - 1 without wrapping
    # a zero group dequantizes to exact zeros
    assert bool((d.reshape(-1, shape[-1])[0, : min(g, shape[-1])] == 0).all())


def test_v1_and_v2_give_the_same_weights():
    w = torch.randn(16, 96)
    a = quantize(w, QuantSpec(4, 32, False, zero_offset=1))
    b = quantize(w, QuantSpec(4, 32, False, zero_offset=0))
    assert not torch.equal(a.qzeros, b.qzeros)
    assert torch.equal(a.dequantize(), b.dequantize())


def test_cat_stack_split_index():
    ws = [quantize(torch.randn(8 * (i + 1), 64), QuantSpec(4, 32)) for i in range(3)]
    cat = QuantizedWeight.cat_rows(ws)
    torch.testing.assert_close(cat.dequantize(), torch.cat([w.dequantize() for w in ws]), atol=0, rtol=0)
    parts = cat.split_rows([8, 16, 24])
    assert all(torch.equal(a.dequantize(), b.dequantize()) for a, b in zip(parts, ws))
    st = QuantizedWeight.stack([ws[0], ws[0]])
    assert st.shape == (2, 8, 64) and torch.equal(st[1].dequantize(), ws[0].dequantize())
    x = torch.randn(3, 64)
    torch.testing.assert_close(ws[1].linear(x), x @ ws[1].dequantize().t(), atol=1e-6, rtol=1e-6)
    with pytest.raises(QuantError, match="different settings"):
        QuantizedWeight.cat_rows([ws[0], quantize(torch.randn(8, 64), QuantSpec(8, 32))])


def test_invalid_inputs_are_named():
    with pytest.raises(QuantError, match="bits = 3"):
        QuantSpec(3)
    with pytest.raises(QuantError, match="group_size = 100"):
        QuantSpec(4, 100)
    with pytest.raises(QuantError, match="multiples of 8"):
        quantize(torch.randn(8, 12), QuantSpec(4))
    with pytest.raises(QuantError, match="non-finite"):
        quantize(torch.full((8, 8), float("inf")), QuantSpec(4, 32))
    with pytest.raises(QuantError, match="overflows fp16"):
        quantize(torch.full((8, 8), 1e9), QuantSpec(4, 32))
    qw = quantize(torch.randn(8, 64), QuantSpec(4, 32))
    with pytest.raises(QuantError, match="scales has shape"):
        QuantizedWeight(qw.qweight, qw.scales[:1], qw.qzeros, 4, 32, True)
    with pytest.raises(QuantError, match="quant_method"):
        QuantSpec.from_config({"quant_method": "awq", "bits": 4, "group_size": 128})
    with pytest.raises(QuantError, match="desc_act"):
        QuantSpec.from_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})
    with pytest.raises(QuantError, match="checkpoint_format"):
        QuantSpec.from_config({"quant_method": "gptq", "bits": 4, "group_size": 128,
                               "checkpoint_format": "marlin"})
    spec = QuantSpec(8, 64, False)
    assert QuantSpec.from_config(spec.to_config()) == spec
    assert QuantSpec.from_config({"quant_method": "gptq", "bits": 4, "group_size": 32,
                                  "checkpoint_format": "gptq_v2"}).zero_offset == 0


def _same_bits(a: QuantizedWeight, b: QuantizedWeight) -> None:
    for name in ("qweight", "qzeros", "scales"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.equal(x.view(torch.int16) if x.dtype == torch.float16 else x,
                           y.view(torch.int16) if y.dtype == torch.float16 else y), name
    assert (a.bits, a.group_size, a.sym, a.zero_offset) == (b.bits, b.group_size, b.sym, b.zero_offset)


def _awkward_weight(shape, dtype, seed):
    """Normal weights plus the groups the rule treats specially: all zeros, all positive (asym
    zero would round to 0: the z = 1 branch), all negative, one huge outlier, values on exact
    half-steps (round half to even)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    w[..., 0, :] = 0.0
    w[..., 1, :] = w[..., 1, :].abs() + 1e-3
    w[..., 2, :] = -w[..., 2, :].abs()
    w[..., 3, 5] = 40.0
    w[..., 4, :] = torch.arange(shape[-1]) * 0.5 - 3.0
    return w.to(dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape,dtype", [((40, 200), torch.bfloat16), ((3, 24, 96), torch.float32),
                                         ((16, 136), torch.float16)])
def test_compiled_quantizer_equals_reference(bits, g, sym, shape, dtype):
    """quantize (csrc/cpu/quantize_rtn.cpp) and quantize_reference (PyTorch) give the same bits:
    qweight, qzeros and fp16 scales, at a partial last group, stacked experts and every dtype."""
    backend = pytest.importorskip("moe_engine.ops.backend")
    try:
        backend.native_module("cpu")
    except backend.BackendUnavailable:
        pytest.skip("no compiled cpu module")
    from moe_engine.quant import quantize_reference
    spec = QuantSpec(bits, g, sym)
    w = _awkward_weight(shape, dtype, seed=bits + g + sym)
    _same_bits(quantize(w, spec), quantize_reference(w, spec))
    v2 = QuantSpec(bits, g, sym, zero_offset=0)
    _same_bits(quantize(w, v2), quantize_reference(w, v2))


def test_compiled_quantizer_refuses_what_the_reference_refuses():
    from moe_engine.quant import quantize_reference
    w = torch.randn(8, 64)
    w[3, 7] = float("nan")
    for fn in (quantize, quantize_reference):
        with pytest.raises(QuantError, match="non-finite"):
            fn(w, QuantSpec(8, 32))
    big = torch.full((8, 64), 1e9)
    for fn in (quantize, quantize_reference):
        with pytest.raises(QuantError, match="overflows fp16"):
            fn(big, QuantSpec(8, 32))
