"""expert_ffn: the routed experts' SwiGLU for every (token, slot), unweighted, token-aligned.

Shapes: T tokens, D hidden, E experts, F expert width, k_max slots.

    expert_out[t, j] = W_down[e] (silu(W_gate[e] x[t]) * (W_up[e] x[t])),  e = topk_ids[t, j]

experts_gate_up is [E, 2F, D] (gate rows [0, F), up rows [F, 2F)), experts_down is [E, D, F].
Rows of slots with a sentinel id (< 0 or >= E) are left unspecified; combine skips them.
expert_out IS the `hook_expert_out` lens tap: slot order = rank order of route.

Backends: torch (this reference, a loop over the experts present), cpu (csrc/cpu/expert_ffn.cpp,
fused), cuda / emu (align + csrc/cuda/expert_gemm.cu, or csrc/cuda/moe_decode.cu for T <= 16).
Test: tests/test_ops_expert_ffn.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from . import backend as B


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate_up = [gate; up] stacked on the output axis."""
    gu = x @ gate_up.t()
    F = gu.shape[-1] // 2
    return (Fn.silu(gu[..., :F]) * gu[..., F:]) @ down.t()


def expert_ffn_ref(x, topk_ids, experts_gate_up, experts_down):
    T, k_max = topk_ids.shape
    E, D = experts_gate_up.shape[0], x.shape[1]
    out = torch.zeros((T, k_max, D), dtype=x.dtype, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()
    for e in torch.unique(flat_ids[(flat_ids >= 0) & (flat_ids < E)]).tolist():
        slots = (flat_ids == e).nonzero().squeeze(1)
        y = swiglu(x[slots // k_max], experts_gate_up[e], experts_down[e])
        out.view(T * k_max, D)[slots] = y
    return out


def expert_ffn(x, topk_ids, experts_gate_up, experts_down, *, backend: str = "auto"):
    """Checked dispatcher. Returns expert_out [T, k_max, D] in x's dtype."""
    B.check(x, "x", dtype=(torch.float32, torch.bfloat16))
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {list(x.shape)}")
    T, D = x.shape
    dev, dt = x.device, x.dtype
    B.check(topk_ids, "topk_ids", dtype=torch.int32, shape=(T, None), device=dev)
    B.check(experts_gate_up, "experts_gate_up", dtype=dt, shape=(None, None, D), device=dev)
    E, F2, _ = experts_gate_up.shape
    if F2 % 2:
        raise ValueError(f"experts_gate_up has {F2} rows per expert; expected an even 2F")
    B.check(experts_down, "experts_down", dtype=dt, shape=(E, D, F2 // 2), device=dev)
    be = B.resolve(backend, dev)
    if be == "torch":
        return expert_ffn_ref(x, topk_ids, experts_gate_up, experts_down)
    return _NATIVE[be](x, topk_ids, experts_gate_up, experts_down)


def _unavailable(name):
    def run(*args):
        raise B.BackendUnavailable(f"expert_ffn has no {name} implementation in this build")
    return run


# Filled in by the cpu and cuda/emu implementations below as they land.
_NATIVE = {"cpu": _unavailable("cpu"), "cuda": _unavailable("cuda"), "emu": _unavailable("emu")}
