"""Weights in the cpu backend's panel layout, and the packed dense mat-vec (csrc/cpu/expert_ffn.cpp).

Shape legend: E experts, Dout output rows, Din reduction length, T tokens.

A weight W [Dout, Din] (y = x W^T) is stored as ceil(Dout/32) panels of 32 output rows (zero padded),
each panel contiguous: bf16 [ceil(Din/2)][32][2] (k pairs interleaved: the operand layout of
vdpbf16ps, so a token's (x[k], x[k+1]) broadcast times one 64-byte load gives 16 lanes of
partial dot products with no horizontal sums); fp32 [Din][32]. A gate|up weight [E, 2F, D] packs
gate rows 16p..16p+15 and up rows 16p..16p+15 into panel p, so a panel yields 16 SiLU(gate)*up
outputs in its epilogue. The copy is made once, at load time (Model keeps it per layer), and
is the cpu backend's only copy: unpack_weight rebuilds the [E, Dout, Din] tensor when a path needs one.

    linear_cpu(x, W) = x W^T      [T, Dout]   for small T (decode); large T goes to torch GEMMs
    unpack_weight(W) = W          [E, Dout, Din] the exact values, made on demand and not kept
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend as backends


@dataclass(frozen=True)
class PackedWeight:
    """A weight [E, Dout, Din] (y = x W^T per expert) in the panel layout."""
    data: torch.Tensor      # uint8 [pack_size_bytes]
    dtype: torch.dtype
    E: int
    Dout: int
    Din: int
    gate_up: bool

    @property
    def nbytes_logical(self) -> int:
        """Bytes of the unpadded weight, i.e. what one full read streams from memory."""
        return self.E * self.Dout * self.Din * torch.empty(0, dtype=self.dtype).element_size()


def pack_weight(w: torch.Tensor, gate_up: bool = False) -> PackedWeight:
    """Pack [E, Dout, Din] (or [Dout, Din] as E = 1) into panels; gate_up: rows are [gate F | up F]."""
    mod = backends.native_module("cpu")
    backends.check(w, "w", dtype=(torch.float32, torch.bfloat16), device="cpu", contiguous=False)
    w3 = (w.unsqueeze(0) if w.dim() == 2 else w).contiguous()
    if w3.dim() != 3:
        raise ValueError(f"w must be [Dout, Din] or [E, Dout, Din], got shape {list(w.shape)}")
    E, Dout, Din = w3.shape
    if gate_up and Dout % 2:
        raise ValueError(f"gate_up weight has {Dout} rows; expected an even 2F")
    dt = backends.native_dtype(mod, w3.dtype)
    data = torch.empty(mod.pack_size_bytes(dt, E, Dout, Din, gate_up), dtype=torch.uint8)
    p = mod.PackParams()
    p.src, p.dst, p.dtype, p.E, p.Dout, p.Din, p.gate_up = w3.data_ptr(), data.data_ptr(), dt, E, Dout, Din, gate_up
    mod.pack_weights_cpu(p)
    return PackedWeight(data, w3.dtype, E, Dout, Din, gate_up)


# Lanes per panel and gate (or up) rows per gate|up panel: kPanel and kHalf of csrc/cpu/common.h.
_PANEL, _HALF = 32, 16


def unpack_weight(w: PackedWeight) -> torch.Tensor:
    """The weight [E, Dout, Din] that pack_weight packed, bit for bit (the inverse of the layout
    above: panel q, k-group g, lane l, element k % ks at [q][g][l][k % ks], ks = 2 for bf16).
    A fresh tensor each call: the caller uses it and drops it."""
    if not isinstance(w, PackedWeight):
        raise TypeError(f"unpack_weight needs a PackedWeight (pack_weight), got {type(w).__name__}")
    ks = 2 if w.dtype == torch.bfloat16 else 1
    G = -(-w.Din // ks)
    # One 4-byte word = the ks elements of one row at one k-group (a bf16 pair, or one fp32), so
    # unpacking is a transpose of words: several times faster than moving 2-byte elements.
    words = w.data.view(torch.int32)
    out = torch.empty((w.E, w.Dout, w.Din), dtype=w.dtype)
    if w.gate_up:  # panel q: lanes 0..15 gate rows 16q.., lanes 16..31 up rows F + 16q..
        F = w.Dout // 2
        n_p = -(-F // _HALF)
        src = words.view(w.E, n_p, G, 2, _HALF).permute(0, 3, 1, 4, 2)   # [E, 2, n_p, 16, G]
        dst, rows = out.view(w.E, 2, F, w.Din), n_p * _HALF
    else:
        n_p = -(-w.Dout // _PANEL)
        src = words.view(w.E, n_p, G, _PANEL).permute(0, 1, 3, 2)        # [E, n_p, 32, G]
        dst, rows = out, n_p * _PANEL
    if rows == dst.shape[-2] and G * ks == w.Din:  # no padding: one copy, word by word
        dst.view(torch.int32).view(src.shape).copy_(src)
    else:
        full = torch.empty((*dst.shape[:-2], rows, G), dtype=torch.int32)
        full.copy_(src.reshape(full.shape))
        dst.copy_(full.view(w.dtype)[..., :dst.shape[-2], :w.Din])      # [..., rows, G * ks] -> rows, Din
    return out


def linear_cpu(x: torch.Tensor, w: PackedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T with a packed [Dout, Din] weight."""
    mod = backends.native_module("cpu")
    if w.E != 1 or w.gate_up:
        raise ValueError(f"linear_cpu needs a plain packed [Dout, Din] weight, got E={w.E} gate_up={w.gate_up}")
    backends.check(x, "x", dtype=w.dtype, shape=(None, w.Din), device="cpu")
    T = x.shape[0]
    y = torch.empty((T, w.Dout), dtype=x.dtype) if out is None else out
    backends.check(y, "out", dtype=x.dtype, shape=(T, w.Dout), device="cpu")
    p = mod.LinearParams()
    p.x, p.w, p.y = x.data_ptr(), w.data.data_ptr(), y.data_ptr()
    p.dtype, p.T, p.Dout, p.Din = backends.native_dtype(mod, x.dtype), T, w.Dout, w.Din
    if T > 0:
        mod.linear_cpu(p)
    return y
