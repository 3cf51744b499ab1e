"""expert_ffn: the routed experts' SwiGLU for every (token, slot), unweighted, token-aligned.

Shapes: T tokens, D hidden, E experts, F expert width, k_max slots.

    expert_out[t, j] = W_down[e] (silu(W_gate[e] x[t]) * (W_up[e] x[t])),  e = topk_ids[t, j]

experts_gate_up is [E, 2F, D] (gate rows [0, F), up rows [F, 2F)), experts_down is [E, D, F].
Rows of slots with a sentinel id (< 0 or >= E) are zeros on every backend (combine skips them
anyway).
expert_out IS the `hook_expert_out` lens tap: slot order = rank order of route.

Backends: torch (this reference, a loop over the experts present), cpu (csrc/cpu/expert_ffn.cpp,
fused: chosen experts only, each expert's weights streamed once per call for all its tokens,
SiLU*up in the gate|up epilogue; it reads the panel-packed copy in `CpuExperts`, made once per
layer at load time -- pass it as `packed=`, else the call packs on the fly), cuda / emu (align + csrc/cuda/expert_gemm.cu, or csrc/cuda/moe_decode.cu for T <= 16).
Tests: tests/test_ops.py, tests/emu/{test_expert_gemm,test_moe_decode}.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from . import backend as backends
from .packed import PackedWeight, pack_weight


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


def expert_ffn(x, topk_ids, experts_gate_up, experts_down, *, backend: str = "auto",
               packed: "CpuExperts | None" = None, out: torch.Tensor | None = None):
    """Checked dispatcher. Returns expert_out [T, k_max, D] in x's dtype.

    packed: the cpu backend's packed copy of these experts (CpuExperts.pack); out: a
    preallocated expert_out (cpu backend)."""
    backends.check(x, "x", dtype=(torch.float32, torch.bfloat16))
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {list(x.shape)}")
    T, D = x.shape
    dev, dt = x.device, x.dtype
    backends.check(topk_ids, "topk_ids", dtype=torch.int32, shape=(T, None), device=dev)
    backends.check(experts_gate_up, "experts_gate_up", dtype=dt, shape=(None, None, D), device=dev)
    E, F2, _ = experts_gate_up.shape
    if F2 % 2:
        raise ValueError(f"experts_gate_up has {F2} rows per expert; expected an even 2F")
    backends.check(experts_down, "experts_down", dtype=dt, shape=(E, D, F2 // 2), device=dev)
    be = backends.resolve(backend, dev)
    if (packed is not None or out is not None) and be != "cpu":
        raise ValueError(f"packed= and out= belong to the cpu backend, not {be!r}")
    if be == "torch":
        return expert_ffn_ref(x, topk_ids, experts_gate_up, experts_down)
    if be == "cpu":
        if packed is None:
            packed = CpuExperts.pack(experts_gate_up, experts_down)
        elif packed.shape != (E, D, F2 // 2) or packed.dtype != dt:
            raise ValueError(f"packed experts are {packed.dtype} (E, D, F) = {packed.shape}; the "
                             f"weights are {dt} {(E, D, F2 // 2)}")
        return expert_ffn_cpu(x, topk_ids, packed, out=out)
    return expert_ffn_cuda(x, topk_ids, experts_gate_up, experts_down, backend=be)


# ---- cpu: csrc/cpu/expert_ffn.cpp ----------------------------------------------------------------
@dataclass(frozen=True)
class CpuExperts:
    """E experts' gate|up [E, 2F, D] and down [E, D, F] weights, panel-packed (ops/packed.py)."""
    w13: PackedWeight
    w2: PackedWeight

    @staticmethod
    def pack(experts_gate_up: torch.Tensor, experts_down: torch.Tensor) -> "CpuExperts":
        """Also packs one dense SwiGLU MLP (gate_up [2S, D], down [D, S]) as E = 1."""
        gu = experts_gate_up.unsqueeze(0) if experts_gate_up.dim() == 2 else experts_gate_up
        dn = experts_down.unsqueeze(0) if experts_down.dim() == 2 else experts_down
        E, F2, D = gu.shape
        if tuple(dn.shape) != (E, D, F2 // 2) or dn.dtype != gu.dtype:
            raise ValueError(f"gate_up {list(gu.shape)} {gu.dtype} and down {list(dn.shape)} "
                             f"{dn.dtype} disagree; expected down [E, D, F] = {[E, D, F2 // 2]}")
        return CpuExperts(pack_weight(gu, gate_up=True), pack_weight(dn))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, D, F)"""
        return self.w13.E, self.w13.Din, self.w2.Din

    @property
    def dtype(self) -> torch.dtype:
        return self.w13.dtype

    def expert_bytes(self) -> int:
        """Weight bytes one expert streams per call (3*D*F elements)."""
        return (self.w13.nbytes_logical + self.w2.nbytes_logical) // self.w13.E


def workspace_bytes(dtype: torch.dtype, T: int, k_max: int, E: int, F: int) -> int:
    mod = backends.native_module("cpu")
    return mod.expert_ffn_workspace_bytes(backends.native_dtype(mod, dtype), T, k_max, E, F)


def expert_ffn_cpu(x: torch.Tensor, topk_ids: torch.Tensor, packed: CpuExperts, *,
                   out: torch.Tensor | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """The cpu kernel on already-validated x [T, D] and topk_ids [T, k_max]; sentinel slots
    come back as zero rows."""
    mod = backends.native_module("cpu")
    E, D, F = packed.shape
    T, k_max = topk_ids.shape
    backends.check(x, "x", dtype=packed.dtype, shape=(T, D), device="cpu")
    out = torch.empty((T, k_max, D), dtype=x.dtype) if out is None else out
    backends.check(out, "out", dtype=x.dtype, shape=(T, k_max, D), device="cpu")
    need = workspace_bytes(x.dtype, T, k_max, E, F)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.uint8)
    backends.check(workspace, "workspace", dtype=torch.uint8, device="cpu")
    if workspace.numel() < need:
        raise ValueError(f"workspace has {workspace.numel()} bytes; expert_ffn needs {need}")
    p = mod.ExpertFFNParams()
    p.x, p.w13, p.w2 = x.data_ptr(), packed.w13.data.data_ptr(), packed.w2.data.data_ptr()
    p.topk_ids, p.expert_out, p.workspace = topk_ids.data_ptr(), out.data_ptr(), workspace.data_ptr()
    p.dtype, p.T, p.k_max, p.D, p.F, p.E = backends.native_dtype(mod, x.dtype), T, k_max, D, F, E
    if T > 0 and k_max > 0:
        mod.expert_ffn_cpu(p)
    return out


# ---- cuda / emu: csrc/cuda/{align,expert_gemm,moe_decode}.cu ------------------------------------


def expert_ffn_cuda(x, topk_ids, experts_gate_up, experts_down, *, backend: str):
    """The CUDA kernels (backend "cuda", or "emu" for the same source run on the CPU): for
    T <= DECODE_MAX_T the no-sort decode path, else align + grouped GEMM up (SiLU*up fused) +
    grouped GEMM down writing expert_out in token order. bf16 only."""
    from ..runner import DECODE_MAX_T  # the path rule (runner.py)
    from .align import align
    mod = backends.native_module(backend)
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the {backend} expert kernels take bfloat16, got {x.dtype}")
    T, D = x.shape
    E, F2, _ = experts_gate_up.shape
    F = F2 // 2
    k_max = topk_ids.shape[1]
    dev = x.device
    stream, device = backends.stream_of(backend, dev), backends.device_of(backend, dev)
    expert_out = torch.empty((T, k_max, D), dtype=x.dtype, device=dev)
    if T == 0:
        return expert_out
    if T <= DECODE_MAX_T:
        p = mod.MoeDecodeParams()
        act = torch.empty((T * k_max, F), dtype=x.dtype, device=dev)
        p.x, p.topk_ids = backends.ptr(x), backends.ptr(topk_ids)
        p.experts_gate_up, p.experts_down = backends.ptr(experts_gate_up), backends.ptr(experts_down)
        p.act, p.expert_out = backends.ptr(act), backends.ptr(expert_out)
        p.T, p.k_max, p.E, p.D, p.F = T, k_max, E, D, F
        mod.moe_decode_cuda(p, stream, device)
        return expert_out
    block_m = mod.expert_gemm_block_m(T, k_max, E)
    a = align(topk_ids, E, block_m, backend=backend)
    cap = a.sorted_slots.numel()
    act = torch.empty((cap, F), dtype=x.dtype, device=dev)
    for up in (True, False):
        p = mod.ExpertGemmParams()
        p.a, p.a_stride = (backends.ptr(x), D) if up else (backends.ptr(act), F)
        p.w = backends.ptr(experts_gate_up if up else experts_down)
        p.c = backends.ptr(act if up else expert_out)
        p.sorted_slots, p.tile_experts, p.num_padded = backends.ptr(a.sorted_slots), backends.ptr(a.tile_experts), backends.ptr(a.num_padded)
        p.T, p.k_max, p.E, p.D, p.F, p.capacity, p.block_m, p.up = T, k_max, E, D, F, cap, block_m, up
        p.topk_ids = backends.ptr(topk_ids)  # the down launch zeroes the sentinel slots' rows
        mod.expert_gemm_cuda(p, stream, device)
    return expert_out


def shared_expert_cuda(x, gate_up, down, *, backend: str):
    """The shared experts as one dense SwiGLU on the CUDA kernels (csrc/cuda/shared_expert.cu)."""
    mod = backends.native_module(backend)
    T, D = x.shape
    S = down.shape[1]
    backends.check(x, "x", dtype=torch.bfloat16)
    backends.check(gate_up, "shared gate_up", dtype=torch.bfloat16, shape=(2 * S, D), device=x.device)
    backends.check(down, "shared down", dtype=torch.bfloat16, shape=(D, S), device=x.device)
    out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    act = torch.empty((T, S), dtype=x.dtype, device=x.device)
    # The down projection of a small batch is split over S (csrc/cuda/shared_expert.cu): its fp32
    # partial sums need this scratch.
    partial_floats = mod.shared_expert_plan(T, D, S, True)[4]
    partial = torch.empty(partial_floats, dtype=torch.float32, device=x.device) if partial_floats else None
    p = mod.SharedExpertParams()
    p.x, p.x_stride, p.gate_up, p.down = backends.ptr(x), D, backends.ptr(gate_up), backends.ptr(down)
    p.act, p.shared_out, p.T, p.D, p.S = backends.ptr(act), backends.ptr(out), T, D, S
    p.partial = 0 if partial is None else backends.ptr(partial)
    mod.shared_expert_cuda(p, backends.stream_of(backend, x.device), backends.device_of(backend, x.device))
    return out
