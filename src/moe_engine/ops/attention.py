"""attention_decode: one new query per sequence against its KV cache (the cpu backend's decode).

Shapes: B sequences, H query heads, Hkv key/value heads, hd head dim, Tkv used cache columns
(the new token's included), Tkv_cap cache capacity.

    out[b, h] = softmax_s(scale * q[b, h] . k[b, g, s]) @ v[b, g, :Tkv],   g = h // (H // Hkv)
    over keys s < Tkv with valid[b, s] (real tokens) or s == Tkv - 1 (the query itself)

The same math as the model's SDPA call with its decode mask (Model._attn_mask); fp32 inside.
Kernel: csrc/cpu/attention_decode.cpp. Test: tests/test_ops.py.
"""
from __future__ import annotations

import torch

from . import backend as backends


def attention_decode_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         valid: torch.Tensor, Tkv: int, scale: float) -> torch.Tensor:
    """q [B, H, hd]; k_cache, v_cache [B, Hkv, Tkv_cap, hd] (one layer); valid [B, >= Tkv] bool."""
    mod = backends.native_module("cpu")
    B, H, hd = q.shape
    backends.check(q, "q", dtype=(torch.float32, torch.bfloat16), device="cpu")
    backends.check(k_cache, "k_cache", dtype=q.dtype, shape=(B, None, None, hd), device="cpu")
    _, Hkv, Tkv_cap, _ = k_cache.shape
    backends.check(v_cache, "v_cache", dtype=q.dtype, shape=(B, Hkv, Tkv_cap, hd), device="cpu")
    backends.check(valid, "valid", dtype=torch.bool, device="cpu", contiguous=False)
    if valid.dim() != 2 or valid.shape[0] != B or valid.shape[1] < Tkv or valid.stride(1) != 1:
        raise ValueError(f"valid must be [B={B}, >= Tkv={Tkv}] with unit column stride, got "
                         f"{list(valid.shape)} strides {valid.stride()}")
    if not (0 < Tkv <= Tkv_cap) or H % Hkv:
        raise ValueError(f"attention_decode: Tkv={Tkv} Tkv_cap={Tkv_cap} H={H} Hkv={Hkv}")
    out = torch.empty_like(q)
    ws = torch.empty(B * H * Tkv, dtype=torch.float32)
    p = mod.AttnDecodeParams()
    p.q, p.k_cache, p.v_cache, p.valid = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), valid.data_ptr()
    p.out, p.workspace, p.scale = out.data_ptr(), ws.data_ptr(), float(scale)
    p.dtype = backends.native_dtype(mod, q.dtype)
    p.B, p.H, p.Hkv, p.hd, p.Tkv, p.Tkv_cap, p.valid_stride = B, H, Hkv, hd, Tkv, Tkv_cap, valid.stride(0)
    mod.attention_decode_cpu(p)
    return out


def attention_block_decode_cpu(x: torch.Tensor, qkv, o, cos: torch.Tensor, sin: torch.Tensor,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor,
                               pos: int, H: int, Hkv: int, scale: float) -> torch.Tensor:
    """A layer's attention for one new token per sequence, in one call: x [B, D] (normed) ->
    packed q|k|v mat-vec -> rope (cos, sin [B, hd]) -> k, v into cache column `pos` -> attention
    over columns <= pos -> packed o mat-vec -> [B, D]. qkv, o: each an ops.packed.PackedWeight
    or an ops.quant.PackedQWeight (the quantized mat-vec, linear_q_cpu's kernel)."""
    from .quant import PackedQWeight, linear_q_workspace_bytes
    mod = backends.native_module("cpu")
    B, D = x.shape
    hd = cos.shape[-1]
    dense = [w.dtype for w in (qkv, o) if not isinstance(w, PackedQWeight)]
    backends.check(x, "x", dtype=tuple(dense[:1]) or (torch.float32, torch.bfloat16), device="cpu")
    if any(dt != x.dtype for dt in dense):
        raise ValueError(f"attention_block_decode: packed qkv / o dtypes {dense} differ from x's {x.dtype}")
    backends.check(cos, "cos", dtype=x.dtype, shape=(B, hd))
    backends.check(sin, "sin", dtype=x.dtype, shape=(B, hd))
    backends.check(k_cache, "k_cache", dtype=x.dtype, shape=(B, Hkv, None, hd))
    backends.check(v_cache, "v_cache", dtype=x.dtype, shape=tuple(k_cache.shape))
    if qkv.Dout != (H + 2 * Hkv) * hd or qkv.Din != D or o.Dout != D or o.Din != H * hd:
        raise ValueError(f"attention_block_decode: packed qkv [{qkv.Dout}, {qkv.Din}] / o [{o.Dout}, {o.Din}] do "
                         f"not fit D={D} H={H} Hkv={Hkv} hd={hd}")
    if valid.dtype != torch.bool or valid.dim() != 2 or valid.stride(1) != 1 or valid.shape[1] <= pos:
        raise ValueError(f"valid must be bool [B, > pos={pos}] with unit column stride")
    out = torch.empty_like(x)
    qkv_buf = torch.empty(B, qkv.Dout, dtype=x.dtype)
    attn_buf = torch.empty(B, H * hd, dtype=x.dtype)
    scores = torch.empty(B * H * (pos + 1), dtype=torch.float32)
    p = mod.AttnBlockParams()
    p.x, p.qkv, p.o, p.cos, p.sin = x.data_ptr(), qkv.data.data_ptr(), o.data.data_ptr(), cos.data_ptr(), sin.data_ptr()
    p.k_cache, p.v_cache, p.valid = k_cache.data_ptr(), v_cache.data_ptr(), valid.data_ptr()
    p.qkv_buf, p.attn_buf, p.scores, p.out = qkv_buf.data_ptr(), attn_buf.data_ptr(), scores.data_ptr(), out.data_ptr()
    p.scale, p.dtype = float(scale), backends.native_dtype(mod, x.dtype)
    p.B, p.D, p.H, p.Hkv, p.hd = B, D, H, Hkv, hd
    p.pos, p.Tkv_cap, p.valid_stride = pos, k_cache.shape[2], valid.stride(0)
    quantized = [w for w in (qkv, o) if isinstance(w, PackedQWeight)]
    if quantized:  # the quantized mat-vecs' scratch (fp32 activations, group sums), one at a time
        ws = torch.empty(max(linear_q_workspace_bytes(B, w) for w in quantized), dtype=torch.uint8)
        p.workspace = (ws.data_ptr() + 63) // 64 * 64
        p.qkv_fmt, p.o_fmt = (w.native_format(mod) if isinstance(w, PackedQWeight) else mod.QFormat()
                              for w in (qkv, o))
    mod.attention_block_decode_cpu(p)
    return out
