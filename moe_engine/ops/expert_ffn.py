"""expert_ffn: the routed-expert FFN, unweighted per slot (the ``hook_expert_out`` tap).

Shape legend: T tokens, D hidden, E routed experts, K top-k (k_max slots per token), F expert
width, R = T*k_max slots.

    expert_out[t, j, :] = down_e( silu(gate_e(x_t)) * up_e(x_t) ),   e = topk_ids[t, j]
    expert_out[t, j, :] = 0                                            where e < 0 (sentinel)

Weights as loaded (DESIGN.md, "Checkpoints"): w13 [E, 2F, D] rows [gate | up], w2 [E, D, F].
The cpu backend streams them from a packed copy (``CpuExperts``: panels of 32 output rows,
k-pairs interleaved for vdpbf16ps; csrc/cpu/expert_ffn.cpp), made once at load time.

Numerics: fp32 accumulation; in bf16 the SiLU*up intermediate is rounded to bf16 (as the
reference does) and the output is rounded once. Tolerances: tests/tolerances.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_

from moe_engine import _C

_DTYPES = {torch.float32: _C.DType.f32, torch.bfloat16: _C.DType.bf16}


def expert_ffn_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Per-expert loop in x.dtype, as the Hugging Face remote code computes one expert."""
    T, D = x.shape
    k_max = topk_ids.shape[1]
    F = w2.shape[2]
    out = torch.zeros(T, k_max, D, dtype=x.dtype)
    ids = topk_ids.long()
    for e in torch.unique(ids[(ids >= 0) & (ids < w13.shape[0])]).tolist():
        t, j = torch.nonzero(ids == e, as_tuple=True)
        gu = x[t] @ w13[e].t()                                   # [n, 2F]
        h = F_.silu(gu[:, :F]) * gu[:, F:]
        out[t, j] = h @ w2[e].t()
    return out


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a cpu tensor, got {t.device}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (strides {t.stride()})")


@dataclass(frozen=True)
class PackedWeight:
    """A weight [E, N, K] (y = x W^T per expert) in the cpu backend's panel layout."""
    data: torch.Tensor      # uint8 [pack_size_bytes]
    dtype: torch.dtype
    E: int
    N: int
    K: int
    gate_up: bool


def pack_weight(w: torch.Tensor, gate_up: bool = False) -> PackedWeight:
    """Pack [E, N, K] or [N, K] (E = 1) for csrc/cpu/expert_ffn.cpp. One copy, at load time."""
    w3 = w.unsqueeze(0) if w.dim() == 2 else w
    if w3.dtype not in _DTYPES:
        raise ValueError(f"pack_weight: dtype {w3.dtype} not in {list(_DTYPES)}")
    w3 = w3.contiguous()
    E, N, K = w3.shape
    dt = _DTYPES[w3.dtype]
    data = torch.empty(_C.pack_size_bytes(dt, E, N, K, gate_up), dtype=torch.uint8)
    p = _C.PackParams()
    p.src, p.dst, p.dtype, p.E, p.N, p.K, p.gate_up = w3.data_ptr(), data.data_ptr(), dt, E, N, K, gate_up
    _C.pack_weights_cpu(p)
    return PackedWeight(data, w3.dtype, E, N, K, gate_up)


@dataclass(frozen=True)
class CpuExperts:
    """Packed gate|up and down weights of E experts for backend="cpu"."""
    w13: PackedWeight   # [E, 2F, D], gate_up
    w2: PackedWeight    # [E, D, F]

    @staticmethod
    def pack(w13: torch.Tensor, w2: torch.Tensor) -> "CpuExperts":
        if w13.dim() == 2:
            w13, w2 = w13.unsqueeze(0), w2.unsqueeze(0)
        E, F2, D = w13.shape
        if tuple(w2.shape) != (E, D, F2 // 2) or w2.dtype != w13.dtype:
            raise ValueError(f"CpuExperts.pack: w13 {tuple(w13.shape)} {w13.dtype} and w2 "
                             f"{tuple(w2.shape)} {w2.dtype} disagree (want w2 [E, D, F])")
        return CpuExperts(pack_weight(w13, gate_up=True), pack_weight(w2))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, D, F)"""
        return self.w13.E, self.w13.K, self.w2.K

    @property
    def dtype(self) -> torch.dtype:
        return self.w13.dtype

    def nbytes_per_expert(self) -> int:
        E, D, F = self.shape
        return 3 * D * F * torch.empty(0, dtype=self.dtype).element_size()


def workspace_bytes(dtype: torch.dtype, T: int, k_max: int, E: int, F: int) -> int:
    return _C.expert_ffn_workspace_bytes(_DTYPES[dtype], T, k_max, E, F)


def expert_ffn_cpu(x: torch.Tensor, experts: CpuExperts, topk_ids: torch.Tensor,
                   expert_out: torch.Tensor | None = None,
                   workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Checked call of csrc/cpu/expert_ffn.cpp; returns expert_out [T, k_max, D]."""
    E, D, F = experts.shape
    T, k_max = topk_ids.shape
    _check("x", x, (T, D), experts.dtype)
    _check("topk_ids", topk_ids, (T, k_max), torch.int32)
    if expert_out is None:
        expert_out = torch.empty(T, k_max, D, dtype=x.dtype)
    _check("expert_out", expert_out, (T, k_max, D), x.dtype)
    need = workspace_bytes(x.dtype, T, k_max, E, F)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.uint8)
    elif workspace.dtype != torch.uint8 or workspace.numel() < need or not workspace.is_contiguous():
        raise ValueError(f"workspace: need a contiguous uint8 tensor of >= {need} bytes")
    p = _C.ExpertFFNParams()
    p.x, p.w13, p.w2 = x.data_ptr(), experts.w13.data.data_ptr(), experts.w2.data.data_ptr()
    p.topk_ids, p.expert_out, p.workspace = topk_ids.data_ptr(), expert_out.data_ptr(), workspace.data_ptr()
    p.dtype, p.T, p.k_max, p.D, p.F, p.E = _DTYPES[x.dtype], T, k_max, D, F, E
    _C.expert_ffn_cpu(p)
    return expert_out


def linear_cpu(x: torch.Tensor, w: PackedWeight, y: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T with a packed [N, K] weight (the decode mat-vec of the cpu backend)."""
    if w.E != 1 or w.gate_up:
        raise ValueError("linear_cpu: want a plain packed [N, K] weight")
    T = x.shape[0]
    _check("x", x, (T, w.K), w.dtype)
    if y is None:
        y = torch.empty(T, w.N, dtype=x.dtype)
    _check("y", y, (T, w.N), x.dtype)
    p = _C.LinearParams()
    p.x, p.w, p.y, p.dtype, p.T, p.N, p.K = x.data_ptr(), w.data.data_ptr(), y.data_ptr(), _DTYPES[x.dtype], T, w.N, w.K
    _C.linear_cpu(p)
    return y
