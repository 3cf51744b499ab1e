"""Quantized weights on the cpu backend: repack GPTQ tensors into the kernels' panel layout, the
quantized linear layer and the quantized fused expert FFN (csrc/cpu/quant_gemm.cpp).

Shape legend: E experts, Dout output rows, Din reduction length (input features), T tokens,
D hidden, F expert width, k_max slots; g group size, G = ceil(Din / g) groups.

A weight W [Dout, Din] (y = x W^T) quantized weight-only to `bits` in {4, 8}, group-wise along Din:

    w[n, k] = scales[k // g, n] * (q[k, n] - z[k // g, n])

arrives as the standard GPTQ tensors (per expert; stacked experts add a leading E):
    qweight  int32 [Din * bits / 32, Dout]   q packed along Din, low bits first: element k of a word
                                        at bit offset (k % (32 / bits)) * bits
    scales   fp16 or bf16 [G, Dout]
    qzeros   int32 [G, ceil(Dout * bits / 32)]  z packed along Dout the same way; the zero exactly as
                                        the formula uses it (any "+1" convention of the
                                        checkpoint is resolved by the caller). With sym=True,
                                        z = 2^(bits - 1) and qzeros may be None (if given it
                                        must hold that value everywhere).

`pack_quantized` repacks once, at load, into 32-row panels (layout and bytes: csrc/ops.h
"CPU quantized weights"); the kernels stream those bytes and dequantize in registers:

    linear_q_cpu(x, W)                       y = x W^T          [T, Dout]
    expert_ffn_q_cpu(x, topk_ids, W13, W2)   expert_ffn_cpu's contract on quantized experts:
        expert_out[t, j] = W2[e] (SiLU(W13_gate[e] x[t]) * W13_up[e] x[t]), e = topk_ids[t, j],
        unweighted, [T, k_max, D]; sentinel slots (id < 0 or >= E) get zero rows
    dequantize_packed(W)                     the dense [.., Dout, Din] weight (fp32 exact)

x is bf16 or fp32, the result has its dtype; accumulation is fp32 in a fixed order, so the bits
do not depend on the thread count or on which other tokens share the call.
Test: tests/test_quant_kernels.py.

The cuda and emu backends take the same GPTQ tensors, repacked once on their device into the
CUDA kernels' row layout (csrc/cuda/moe_decode_q.cu, its header gives the layout and bytes):

    repack_quantized_cuda(qweight, scales, qzeros, ...)   -> CudaQWeight
    expert_ffn_q_cuda(x, topk_ids, w13, w2)               expert_ffn_q_cpu's contract, bf16 x:
        T <= 16 moe_decode_q, else align + expert_gemm_q (csrc/cuda/expert_gemm_q.cu);
        topk_ids None: dense, every token through expert 0 (shared experts, dense MLPs)
    CudaQExperts(w13, w2)(x, topk_ids)                    the same, on the weights' own backend
    linear_q_cuda(x, w)                                   y = x W^T [T, Dout]: expert_gemm_q's down
                                                          launch in dense mode (attention projections)

Test: tests/test_quant_cuda.py (emu), tests/emu/test_moe_decode_q.py (the kernel's own program);
the whole model on them: tests/test_quant_model.py (cuda_weights.py holds a model's copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend as backends

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = (torch.float16, torch.bfloat16)


class _QuantLayout:
    """What both kernel layouts of a quantized weight (PackedQWeight on the cpu, CudaQWeight on
    cuda/emu) answer alike: the bytes the kernels stream for one full read (every expert,
    padding included) and the QFormat the C++ entry points take."""

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def native_format(self, mod):
        f = mod.QFormat()
        f.bits, f.group_size, f.scales_bf16 = self.bits, self.group_size, self.scale_dtype == torch.bfloat16
        return f


@dataclass(frozen=True)
class PackedQWeight(_QuantLayout):
    """A quantized weight [E, Dout, Din] in the kernels' panel layout."""
    data: torch.Tensor          # uint8 [qpack_size_bytes]
    E: int
    Dout: int
    Din: int
    bits: int
    group_size: int
    sym: bool
    gate_up: bool               # rows are [gate F | up F], panels pair them (expert FFN w13)
    scale_dtype: torch.dtype    # fp16 or bf16, as the checkpoint stores them
    stacked: bool               # given as [E, ...] (else [Dout, Din] with E = 1)

    @property
    def groups(self) -> int:
        return -(-self.Din // self.group_size)



def _check_format(bits, group_size, sym):
    if bits not in BITS:
        raise ValueError(f"bits={bits!r}, expected one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r}, expected one of {GROUP_SIZES}")
    if not isinstance(sym, bool):
        raise TypeError(f"sym must be a bool, got {type(sym).__name__}")


def pack_quantized(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
                   group_size: int, sym: bool, *, gate_up: bool = False) -> PackedQWeight:
    """Repack GPTQ tensors ([Din*bits/32, Dout] or stacked [E, Din*bits/32, Dout]) into quantized panels.

    gate_up: the weight is an expert FFN's w13, rows [gate F | up F] (Dout = 2F)."""
    mod = backends.native_module("cpu")
    qw, sc, zc, E, Dout, Din, stacked = _gptq_inputs(qweight, scales, qzeros, bits, group_size, sym, gate_up,
                                                torch.device("cpu"))
    fmt = mod.QFormat()
    fmt.bits, fmt.group_size, fmt.scales_bf16 = bits, group_size, sc.dtype == torch.bfloat16
    data = torch.empty(mod.qpack_size_bytes(E, Dout, Din, fmt, gate_up), dtype=torch.uint8)
    p = mod.QPackParams()
    p.qweight, p.scales, p.qzeros, p.dst = qw.data_ptr(), sc.data_ptr(), backends.ptr(zc), data.data_ptr()
    p.fmt, p.E, p.Dout, p.Din, p.sym, p.gate_up = fmt, E, Dout, Din, sym, gate_up
    mod.pack_quantized_cpu(p)
    return PackedQWeight(data, E, Dout, Din, bits, group_size, sym, gate_up, sc.dtype, stacked)


def _gptq_inputs(qweight, scales, qzeros, bits, group_size, sym, gate_up, device):
    """Validate GPTQ tensors ([Din*bits/32, Dout] or stacked [E, Din*bits/32, Dout]) on `device`; returns
    them contiguous with a leading E, and (E, Dout, Din, stacked)."""
    _check_format(bits, group_size, sym)
    backends.check(qweight, "qweight", dtype=torch.int32, device=device, contiguous=False)
    if qweight.dim() not in (2, 3):
        raise ValueError(f"qweight must be [Din*bits/32, Dout] or [E, Din*bits/32, Dout], got shape {list(qweight.shape)}")
    stacked = qweight.dim() == 3
    qw = (qweight if stacked else qweight.unsqueeze(0)).contiguous()
    E, rows, Dout = qw.shape
    Din = rows * 32 // bits
    G = -(-Din // group_size)
    if E == 0 or rows == 0 or Dout == 0:
        raise ValueError(f"qweight has shape {list(qweight.shape)}; every dimension must be > 0")
    if gate_up and Dout % 2:
        raise ValueError(f"gate_up weight has Dout={Dout} rows; expected an even 2F")
    lead = (E,) if stacked else ()
    backends.check(scales, "scales", dtype=SCALE_DTYPES, shape=(*lead, G, Dout), device=device, contiguous=False)
    sc = (scales if stacked else scales.unsqueeze(0)).contiguous()
    zc = None
    if qzeros is not None:
        backends.check(qzeros, "qzeros", dtype=torch.int32, shape=(*lead, G, -(-Dout * bits // 32)), device=device,
                       contiguous=False)
        zc = (qzeros if stacked else qzeros.unsqueeze(0)).contiguous()
        if sym:
            z = _unpack_cols(zc, bits, Dout)
            if not bool((z == 1 << (bits - 1)).all()):
                bad = int(z[z != 1 << (bits - 1)][0])
                raise ValueError(f"sym=True but qzeros holds {bad}; symmetric {bits}-bit zeros are "
                                 f"{1 << (bits - 1)} (pass qzeros=None or sym=False)")
    elif not sym:
        raise ValueError("qzeros is required when sym=False")
    return qw, sc, zc, E, Dout, Din, stacked


def _unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[.., C] int32 words -> [.., n] codes, element i at bit offset (i % (32/bits)) * bits."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :n]


def dequantize_packed(packed: PackedQWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [Dout, Din] (or [E, Dout, Din] when stacked) in dtype (fp32: exact)."""
    if not isinstance(packed, PackedQWeight):
        raise TypeError(f"packed must be a PackedQWeight, got {type(packed).__name__}")
    mod = backends.native_module("cpu")
    out = torch.empty((packed.E, packed.Dout, packed.Din), dtype=dtype)
    p = mod.QDequantParams()
    p.src, p.dst, p.fmt, p.dtype = packed.data.data_ptr(), out.data_ptr(), packed.native_format(mod), \
        backends.native_dtype(mod, dtype)
    p.E, p.Dout, p.Din, p.gate_up = packed.E, packed.Dout, packed.Din, packed.gate_up
    mod.dequantize_packed_cpu(p)
    return out if packed.stacked else out[0]


def linear_q_workspace_bytes(T: int, packed: PackedQWeight) -> int:
    """Bytes of the `workspace=` linear_q_cpu needs for T tokens (fp32 activations + group sums)."""
    mod = backends.native_module("cpu")
    return mod.linear_q_workspace_bytes(T, packed.Din, packed.native_format(mod)) + 64


def expert_ffn_q_workspace_bytes(T: int, k_max: int, packed_w13: PackedQWeight, packed_w2: PackedQWeight) -> int:
    """Bytes of the `workspace=` expert_ffn_q_cpu needs for T tokens and k_max slots."""
    mod = backends.native_module("cpu")
    return mod.expert_ffn_q_workspace_bytes(T, k_max, packed_w13.E, packed_w13.Din, packed_w13.Dout // 2,
                                            packed_w13.native_format(mod), packed_w2.native_format(mod)) + 64


def _workspace(ws: torch.Tensor | None, need: int) -> torch.Tensor:
    if ws is None:
        return torch.empty(need, dtype=torch.uint8)
    backends.check(ws, "workspace", dtype=torch.uint8, device="cpu")
    if ws.numel() < need:
        raise ValueError(f"workspace has {ws.numel()} bytes; this call needs {need}")
    return ws


def linear_q_cpu(x: torch.Tensor, packed: PackedQWeight, out: torch.Tensor | None = None, *,
                 workspace: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T, x [T, Din] bf16 or fp32, W a quantized packed [Dout, Din] weight; y [T, Dout] in x's dtype.

    out: a preallocated y; workspace: uint8, >= linear_q_workspace_bytes(T, packed) (else
    allocated per call)."""
    if not isinstance(packed, PackedQWeight):
        raise TypeError(f"packed must be a PackedQWeight, got {type(packed).__name__}")
    if packed.E != 1 or packed.stacked or packed.gate_up:
        raise ValueError(f"linear_q_cpu needs a plain [Dout, Din] weight, got E={packed.E} stacked={packed.stacked} "
                         f"gate_up={packed.gate_up}")
    mod = backends.native_module("cpu")
    backends.check(x, "x", dtype=(torch.float32, torch.bfloat16), shape=(None, packed.Din), device="cpu")
    T = x.shape[0]
    y = torch.empty((T, packed.Dout), dtype=x.dtype) if out is None else out
    backends.check(y, "out", dtype=x.dtype, shape=(T, packed.Dout), device="cpu")
    if T == 0:
        return y
    fmt = packed.native_format(mod)
    ws = _workspace(workspace, linear_q_workspace_bytes(T, packed))
    p = mod.QLinearParams()
    p.x, p.w, p.y, p.workspace = x.data_ptr(), packed.data.data_ptr(), y.data_ptr(), _aligned64(ws)
    p.fmt, p.dtype, p.T, p.Dout, p.Din = fmt, backends.native_dtype(mod, x.dtype), T, packed.Dout, packed.Din
    mod.linear_q_cpu(p)
    return y


def _aligned64(buf: torch.Tensor) -> int:
    """The first 64-byte boundary in buf (the workspace sizes include the 64 bytes this may skip)."""
    ptr = buf.data_ptr()
    return (ptr + 63) // 64 * 64


def expert_ffn_q_cpu(x: torch.Tensor, topk_ids: torch.Tensor, packed_w13: PackedQWeight,
                     packed_w2: PackedQWeight, *, out: torch.Tensor | None = None,
                     workspace: torch.Tensor | None = None) -> torch.Tensor:
    """expert_ffn on quantized experts: x [T, D], topk_ids int32 [T, k_max], packed_w13 the
    gate|up weights (pack_quantized(..., gate_up=True), [E, 2F, D]), packed_w2 the down weights
    ([E, D, F]). Returns expert_out [T, k_max, D] in x's dtype, unweighted, slot order as
    topk_ids; sentinel slots (id < 0 or >= E) are zero rows. out: a preallocated expert_out;
    workspace: uint8, >= expert_ffn_q_workspace_bytes(T, k_max, packed_w13, packed_w2)."""
    for name, w in (("packed_w13", packed_w13), ("packed_w2", packed_w2)):
        if not isinstance(w, PackedQWeight):
            raise TypeError(f"{name} must be a PackedQWeight, got {type(w).__name__}")
    if not packed_w13.gate_up or packed_w2.gate_up:
        raise ValueError(f"packed_w13 must be packed with gate_up=True (got {packed_w13.gate_up}) and "
                         f"packed_w2 without (got {packed_w2.gate_up})")
    E, D, F = packed_w13.E, packed_w13.Din, packed_w13.Dout // 2
    if (packed_w2.E, packed_w2.Dout, packed_w2.Din) != (E, D, F):
        raise ValueError(f"packed_w2 is (E, Dout, Din) = {(packed_w2.E, packed_w2.Dout, packed_w2.Din)}; gate|up "
                         f"(E, 2F, D) = {(E, 2 * F, D)} needs {(E, D, F)}")
    mod = backends.native_module("cpu")
    backends.check(x, "x", dtype=(torch.float32, torch.bfloat16), shape=(None, D), device="cpu")
    T = x.shape[0]
    backends.check(topk_ids, "topk_ids", dtype=torch.int32, shape=(T, None), device="cpu")
    k_max = topk_ids.shape[1]
    out = torch.empty((T, k_max, D), dtype=x.dtype) if out is None else out
    backends.check(out, "out", dtype=x.dtype, shape=(T, k_max, D), device="cpu")
    if T == 0 or k_max == 0:
        return out
    f13, f2 = packed_w13.native_format(mod), packed_w2.native_format(mod)
    ws = _workspace(workspace, expert_ffn_q_workspace_bytes(T, k_max, packed_w13, packed_w2))
    p = mod.QExpertFFNParams()
    p.x, p.w13, p.w2 = x.data_ptr(), packed_w13.data.data_ptr(), packed_w2.data.data_ptr()
    p.topk_ids, p.expert_out, p.workspace = topk_ids.data_ptr(), out.data_ptr(), _aligned64(ws)
    p.fmt13, p.fmt2, p.dtype = f13, f2, backends.native_dtype(mod, x.dtype)
    p.T, p.k_max, p.D, p.F, p.E = T, k_max, D, F, E
    mod.expert_ffn_q_cpu(p)
    return out


# ---- cuda / emu: csrc/cuda/moe_decode_q.cu ---------------------------------------------------------
@dataclass(frozen=True)
class CudaQWeight(_QuantLayout):
    """A quantized weight [E, Dout, Din] in the CUDA kernels' qrow layout (csrc/cuda/moe_decode_q.cu:
    per row the codes along Din, then one word per group with the scale bits and the folded zero),
    on the device the kernels run on (CPU tensors for the emu backend)."""
    data: torch.Tensor          # uint8 [E, Dout, qcuda_row_bytes(Din)]
    E: int
    Dout: int
    Din: int
    bits: int
    group_size: int
    scale_dtype: torch.dtype    # fp16 or bf16, as the checkpoint stores them
    stacked: bool               # given as [E, ...] (else [Dout, Din] with E = 1)

    @property
    def backend(self) -> str:
        """The backend the bytes are for: "cuda" on a CUDA device, else "emu" (the only backend
        that runs the CUDA kernels on CPU tensors)."""
        return "cuda" if self.data.device.type == "cuda" else "emu"


@dataclass(frozen=True)
class CudaQExperts:
    """E quantized SwiGLU experts for the CUDA kernels (QuantExperts' cuda/emu twin): calling it
    is expert_ffn_q_cuda on its own backend; topk_ids None runs every token through expert 0
    (a shared or dense MLP held as a stack of one)."""
    w13: CudaQWeight   # [E, 2F, D], rows [gate F | up F]
    w2: CudaQWeight    # [E, D, F]

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor | None) -> torch.Tensor:
        return expert_ffn_q_cuda(x.contiguous(), topk_ids, self.w13, self.w2, backend=self.w13.backend)


def repack_quantized_cuda(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
                          group_size: int, sym: bool, *, backend: str = "auto") -> CudaQWeight:
    """Repack GPTQ tensors ([Din*bits/32, Dout] or stacked [E, Din*bits/32, Dout], qzeros holding the true
    zeros, as pack_quantized) into the qrow layout, on their own device by a kernel (backend
    "cuda", or "emu" for CPU tensors). Done once at load; an expert FFN's w13 is the gate and up
    weights concatenated along Dout ([gate F | up F])."""
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"qweight must be a torch.Tensor, got {type(qweight).__name__}")
    backend = backends.resolve(backend, qweight.device)
    if backend not in ("cuda", "emu"):
        raise ValueError(f"repack_quantized_cuda runs on backend 'cuda' or 'emu', got {backend!r}")
    mod = backends.native_module(backend)
    qw, sc, zc, E, Dout, Din, stacked = _gptq_inputs(qweight, scales, qzeros, bits, group_size, sym, False,
                                                qweight.device)
    per = 32 // bits
    if Dout % per:
        raise ValueError(f"Dout={Dout} must be a multiple of {per} at {bits} bits (qzeros packs Dout)")
    out = CudaQWeight(None, E, Dout, Din, bits, group_size, sc.dtype, stacked)
    fmt = out.native_format(mod)
    data = torch.empty((E, Dout, mod.qcuda_row_bytes(Din, fmt)), dtype=torch.uint8, device=qweight.device)
    p = mod.QRepackParams()
    p.qweight, p.scales, p.qzeros, p.dst = qw.data_ptr(), sc.data_ptr(), backends.ptr(zc), data.data_ptr()
    p.fmt, p.E, p.Dout, p.Din, p.sym = fmt, E, Dout, Din, sym and zc is None
    dev = qweight.device
    mod.qrepack_cuda(p, backends.stream_of(backend, dev), backends.device_of(backend, dev))
    return CudaQWeight(data, E, Dout, Din, bits, group_size, sc.dtype, stacked)


def expert_ffn_q_cuda(x: torch.Tensor, topk_ids: torch.Tensor | None, w13: CudaQWeight, w2: CudaQWeight, *,
                      backend: str = "auto") -> torch.Tensor:
    """expert_ffn on quantized experts through the CUDA kernels (backend "cuda", or "emu" for the
    same source on CPU tensors): x [T, D] bf16, topk_ids int32 [T, k_max] (None: dense mode, every
    token to expert 0 with k_max = 1: shared experts and dense MLPs), w13 the gate|up weights
    [E, 2F, D], w2 the down weights [E, D, F], both repack_quantized_cuda'd in one format.
    Returns expert_out [T, k_max, D] bf16, unweighted, slot order as topk_ids; sentinel slots
    (id < 0 or >= E) are zero rows. T <= DECODE_MAX_T: moe_decode_q (exact fp32 weights); more:
    align + expert_gemm_q up (SiLU*up fused) + down (weights rounded to bf16 for the tensor
    cores), as expert_ffn_cuda does for bf16 weights."""
    from ..runner import DECODE_MAX_T  # the path rule (runner.py)
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, CudaQWeight):
            raise TypeError(f"{name} must be a CudaQWeight (repack_quantized_cuda), got {type(w).__name__}")
    backend = backends.resolve(backend, x.device)
    if backend not in ("cuda", "emu"):
        raise ValueError(f"expert_ffn_q_cuda runs on backend 'cuda' or 'emu', got {backend!r}")
    mod = backends.native_module(backend)
    E, D, F = w13.E, w13.Din, w13.Dout // 2
    if w13.Dout % 2 or (w2.E, w2.Dout, w2.Din) != (E, D, F):
        raise ValueError(f"w13 (E, Dout, Din) = {(w13.E, w13.Dout, w13.Din)} needs an even Dout = 2F and w2 = (E, D, F) = "
                         f"{(E, D, F)}; got w2 {(w2.E, w2.Dout, w2.Din)}")
    if (w13.bits, w13.group_size, w13.scale_dtype) != (w2.bits, w2.group_size, w2.scale_dtype):
        raise ValueError(f"w13 and w2 must share one format; got (bits, group, scales) "
                         f"{(w13.bits, w13.group_size, w13.scale_dtype)} and {(w2.bits, w2.group_size, w2.scale_dtype)}")
    backends.check(x, "x", dtype=torch.bfloat16, shape=(None, D))
    T = x.shape[0]
    backends.check(topk_ids, "topk_ids", dtype=torch.int32, shape=(T, None), optional=True)
    backends.check_same_device(x.device, topk_ids=topk_ids, w13=w13.data, w2=w2.data)
    k_max = 1 if topk_ids is None else topk_ids.shape[1]
    dev = x.device
    out = torch.empty((T, k_max, D), dtype=x.dtype, device=dev)
    if T == 0 or k_max == 0:
        return out
    stream, device = backends.stream_of(backend, dev), backends.device_of(backend, dev)
    if T > DECODE_MAX_T:
        _expert_gemm_q(mod, backend, x, topk_ids, w13, w2, out, stream, device)
        return out
    act = torch.empty((T * k_max, F), dtype=x.dtype, device=dev)
    p = mod.MoeDecodeQParams()
    p.x, p.topk_ids, p.w13, p.w2 = x.data_ptr(), backends.ptr(topk_ids), w13.data.data_ptr(), w2.data.data_ptr()
    p.act, p.expert_out, p.fmt = act.data_ptr(), out.data_ptr(), w13.native_format(mod)
    p.T, p.k_max, p.E, p.D, p.F = T, k_max, E, D, F
    mod.moe_decode_q_cuda(p, stream, device)
    return out


def _expert_gemm_q(mod, backend, x, topk_ids, w13, w2, out, stream, device):
    """align + grouped GEMM up + down on qrow weights (csrc/cuda/expert_gemm_q.cu); topk_ids None:
    dense mode (row i is token i, expert 0)."""
    from .align import align
    T, D = x.shape
    E, F = w13.E, w13.Dout // 2
    k_max = out.shape[1]
    if topk_ids is None:
        block_m, slots, cap = 16, None, T
    else:
        block_m = mod.expert_gemm_block_m(T, k_max, E)
        slots = align(topk_ids, E, block_m, backend=backend)
        cap = slots.sorted_slots.numel()
    act = torch.empty((cap, F), dtype=x.dtype, device=x.device)
    _gemm_q(mod, stream, device, x, D, w13, act, True, T, k_max, D, F, cap, block_m, slots, topk_ids)
    _gemm_q(mod, stream, device, act, F, w2, out, False, T, k_max, D, F, cap, block_m, slots, topk_ids)


def _gemm_q(mod, stream, device, a, a_stride, w, c, up, T, k_max, D, F, cap, block_m, slots, topk_ids):
    """One expert_gemm_q launch (up: a = x [T, D] -> act; down: a = act -> c rows in slot order);
    slots an align() result, or None for dense mode (row i is slot i, expert 0)."""
    p = mod.ExpertGemmQParams()
    p.a, p.a_stride, p.w, p.c, p.fmt = a.data_ptr(), a_stride, w.data.data_ptr(), c.data_ptr(), w.native_format(mod)
    if slots is not None:
        p.sorted_slots, p.tile_experts, p.num_padded = (slots.sorted_slots.data_ptr(), slots.tile_experts.data_ptr(),
                                                        slots.num_padded.data_ptr())
    p.T, p.k_max, p.E, p.D, p.F, p.capacity, p.block_m, p.up = T, k_max, w.E, D, F, cap, block_m, up
    p.topk_ids = backends.ptr(topk_ids)  # the down launch zeroes the sentinel slots' rows
    mod.expert_gemm_q_cuda(p, stream, device)


def linear_q_cuda(x: torch.Tensor, w: CudaQWeight, *, backend: str | None = None) -> torch.Tensor:
    """y = x W^T for a plain quantized weight W [Dout, Din] (repack_quantized_cuda of an unstacked
    weight) through the CUDA kernels: x [T, Din] bf16 -> y [T, Dout] bf16. It is expert_gemm_q's down
    launch in dense mode (one expert, row i of x is slot i, D = Dout, F = Din), so the weights enter
    the tensor cores rounded to bf16 at every T and each row's bits do not depend on T (no
    switch at DECODE_MAX_T: moe_decode_q launches up and down together and has no plain mode).
    backend: "cuda" or "emu", default the weight's own (CudaQWeight.backend)."""
    if not isinstance(w, CudaQWeight):
        raise TypeError(f"w must be a CudaQWeight (repack_quantized_cuda), got {type(w).__name__}")
    if w.E != 1 or w.stacked:
        raise ValueError(f"linear_q_cuda needs a plain [Dout, Din] weight, got E={w.E} stacked={w.stacked}")
    backend = backends.resolve(w.backend if backend is None else backend, x.device)
    if backend not in ("cuda", "emu"):
        raise ValueError(f"linear_q_cuda runs on backend 'cuda' or 'emu', got {backend!r}")
    backends.check(x, "x", dtype=torch.bfloat16, shape=(None, w.Din))
    backends.check_same_device(x.device, w=w.data)
    mod = backends.native_module(backend)
    T = x.shape[0]
    y = torch.empty((T, w.Dout), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    _gemm_q(mod, backends.stream_of(backend, x.device), backends.device_of(backend, x.device), x, w.Din, w, y, False,
            T, 1, w.Dout, w.Din, T, mod.expert_gemm_block_m(T, 1, 1), None, None)
    return y


def expert_ffn_q_cuda_bytes(T: int, k_max: int, w13: CudaQWeight, w2: CudaQWeight, topk_ids=None) -> int:
    """Bytes one expert_ffn_q_cuda call moves at least (bench/kernels.py's floor): the rows of every
    distinct expert the slots chose (all E when topk_ids is None: dense), x, act written and read,
    expert_out."""
    if topk_ids is None:
        experts = w13.E
    else:
        ids = topk_ids.flatten()
        experts = int(torch.unique(ids[(ids >= 0) & (ids < w13.E)]).numel())
    per_expert = w13.data[0].numel() + w2.data[0].numel()
    D, F = w13.Din, w13.Dout // 2
    return experts * per_expert + 2 * (T * D + 2 * T * k_max * F + T * k_max * D)
