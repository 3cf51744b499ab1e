"""combine: weighted sum over the k slots, plus the shared experts, plus the residual.

Shapes: T tokens, k_max slots, D hidden.

    routed_out[t] = sum_{j ascending, topk_ids[t,j] >= 0} topk_weights[t,j] * expert_out[t,j]
    out[t]        = routed_out[t] + shared_out[t] + residual[t]

All in fp32, in exactly that order, rounded once to the output dtype (routed_out, the
`hook_routed_out` tap, is rounded separately). shared_out and residual are optional.
Kernels: csrc/cuda/combine.cu (cuda, emu), csrc/cpu/combine.cpp (cpu).
Tests: tests/test_ops.py.
"""
from __future__ import annotations

import torch

from . import backend as backends


def combine_ref(expert_out, topk_weights, topk_ids, shared_out=None, residual=None):
    """Returns (out [T, D], routed_out [T, D]) in expert_out's dtype."""
    T, k_max, D = expert_out.shape
    routed = torch.zeros((T, D), dtype=torch.float32, device=expert_out.device)
    for j in range(k_max):
        valid = (topk_ids[:, j] >= 0).unsqueeze(1)
        term = topk_weights[:, j : j + 1] * expert_out[:, j].float()
        routed = routed + torch.where(valid, term, torch.zeros_like(term))
    acc = routed
    if shared_out is not None:
        acc = acc + shared_out.float()
    if residual is not None:
        acc = acc + residual.float()
    return acc.to(expert_out.dtype), routed.to(expert_out.dtype)


def combine(expert_out, topk_weights, topk_ids, shared_out=None, residual=None, *,
            backend: str = "auto", want_routed: bool = False, out: torch.Tensor | None = None):
    """Checked dispatcher. Returns (out, routed_out or None)."""
    backends.check(expert_out, "expert_out", dtype=(torch.float32, torch.bfloat16))
    if expert_out.dim() != 3:
        raise ValueError(f"expert_out must be [T, k_max, D], got shape {list(expert_out.shape)}")
    T, k_max, D = expert_out.shape
    dev, dt = expert_out.device, expert_out.dtype
    backends.check(topk_weights, "topk_weights", dtype=torch.float32, shape=(T, k_max), device=dev)
    backends.check(topk_ids, "topk_ids", dtype=torch.int32, shape=(T, k_max), device=dev)
    backends.check(shared_out, "shared_out", dtype=dt, shape=(T, D), device=dev, optional=True)
    backends.check(residual, "residual", dtype=dt, shape=(T, D), device=dev, optional=True)
    backends.check(out, "out", dtype=dt, shape=(T, D), device=dev, optional=True)
    be = backends.resolve(backend, dev)
    if be == "torch":
        o, r = combine_ref(expert_out, topk_weights, topk_ids, shared_out, residual)
        if out is not None:
            out.copy_(o)
            o = out
        return o, (r if want_routed else None)
    mod = backends.native_module(be)
    o = torch.empty((T, D), dtype=dt, device=dev) if out is None else out
    routed = torch.empty((T, D), dtype=dt, device=dev) if want_routed else None
    p = mod.CombineParams()
    p.expert_out, p.topk_weights, p.topk_ids = backends.ptr(expert_out), backends.ptr(topk_weights), backends.ptr(topk_ids)
    p.shared_out, p.residual, p.out, p.routed_out = backends.ptr(shared_out), backends.ptr(residual), backends.ptr(o), backends.ptr(routed)
    p.dtype = backends.native_dtype(mod, dt)
    p.T, p.k_max, p.D = T, k_max, D
    if T > 0:
        if be == "cpu":
            mod.combine_cpu(p)
        else:
            mod.combine_cuda(p, backends.stream_of(be, dev), backends.device_of(be, dev))
    return o, routed
