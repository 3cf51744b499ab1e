"""attention_decode: one new query per sequence against its KV cache (the cpu backend's decode).

Shapes: B sequences, H query heads, Hkv key/value heads, hd head dim, S used cache columns
(the new token's included), S_cap cache capacity.

    out[b, h] = softmax_s(scale * q[b, h] . k[b, g, s]) @ v[b, g, :S],   g = h // (H // Hkv)
    over keys s < S with valid[b, s] (real tokens) or s == S - 1 (the query itself)

The same math as the model's SDPA call with its decode mask (Model._attn_mask); fp32 inside.
Kernel: csrc/cpu/attention_decode.cpp. Test: tests/test_cpu_ops.py.
"""
from __future__ import annotations

import torch

from . import backend as B


def attention_decode_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         valid: torch.Tensor, S: int, scale: float) -> torch.Tensor:
    """q [B, H, hd]; k_cache, v_cache [B, Hkv, S_cap, hd] (one layer); valid [B, >= S] bool."""
    mod = B.native_module("cpu")
    Bsz, H, hd = q.shape
    B.check(q, "q", dtype=(torch.float32, torch.bfloat16), device="cpu")
    B.check(k_cache, "k_cache", dtype=q.dtype, shape=(Bsz, None, None, hd), device="cpu")
    _, Hkv, S_cap, _ = k_cache.shape
    B.check(v_cache, "v_cache", dtype=q.dtype, shape=(Bsz, Hkv, S_cap, hd), device="cpu")
    B.check(valid, "valid", dtype=torch.bool, device="cpu", contiguous=False)
    if valid.dim() != 2 or valid.shape[0] != Bsz or valid.shape[1] < S or valid.stride(1) != 1:
        raise ValueError(f"valid must be [B={Bsz}, >= S={S}] with unit column stride, got "
                         f"{list(valid.shape)} strides {valid.stride()}")
    if not (0 < S <= S_cap) or H % Hkv:
        raise ValueError(f"attention_decode: S={S} S_cap={S_cap} H={H} Hkv={Hkv}")
    out = torch.empty_like(q)
    ws = torch.empty(Bsz * H * S, dtype=torch.float32)
    p = mod.AttnDecodeParams()
    p.q, p.k_cache, p.v_cache, p.valid = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), valid.data_ptr()
    p.out, p.workspace, p.scale = out.data_ptr(), ws.data_ptr(), float(scale)
    p.dtype = B.native_dtype(mod, q.dtype)
    p.B, p.H, p.Hkv, p.hd, p.S, p.S_cap, p.valid_stride = Bsz, H, Hkv, hd, S, S_cap, valid.stride(0)
    mod.attention_decode_cpu(p)
    return out
