"""The cpu backend's packed copy of a model's weights (panel layout, ops/packed.py).

Shape legend: N tokens of the call, D hidden, H heads, Hkv key/value heads, hd head dim,
E routed experts, F expert width, S shared width, I dense width, V vocab.

Why: at decode sizes a step is a string of mat-vecs whose cost is reading the weights, and
torch's bf16 GEMM reaches a fraction of the memory bandwidth at N = 1 (bench/kernels.py shows
both). The panel kernels stream every weight once at full bandwidth, so for N <= SMALL_N the
cpu backend runs the model's GEMMs on packed copies; larger N (prefill) stays on torch/oneDNN
GEMMs where torch has a fast one (runner.use_packed), except the routed experts, the router and
the shared experts, which always run on the packed kernels.
Made once, when a Model is created with (or first run on) backend="cpu".

The packed copy is the cpu backend's only copy of every linear (attention q|k|v and o, the dense
MLP, the routed and shared experts, the routers and an untied lm_head): packing replaces each
weight in the ModelWeights by a PackedRows view of its panels, layer by layer, so the
checkpoint-layout tensors are freed as the layers are packed (peak: the model plus one layer's
panels). The paths that want a [N, K] tensor -- torch's GEMM for more than SMALL_N tokens where
use_packed says it wins, the PyTorch reference backend, the lens's lm_head -- ask dense() /
dense_all() for one: unpacked from the panels (exact, ops/packed.unpack_weight) or dequantized,
made per call and not kept. Only the embedding (a row gather), the norms, and an lm_head tied to
the embedding keep their tensors.

Quantized linears (quant.QuantizedWeight: attention q|k|v and o, dense MLP, routed and shared
experts) are repacked into the quantized panel layout (ops/quant.py, PackedQWeight) and run on
its kernels at every token count: that packed copy is the model's only copy of them. Packing
replaces each QuantizedWeight in the ModelWeights by a PackedRows view of the packed bytes, so
the GPTQ tensors are dropped and no bf16 copy exists; the PyTorch reference path dequantizes a
view per call (loader.dequantized_layer). The router, norms and embedding stay as they are; so
does the lm_head unless it was quantized (quant_lm_head), when it is repacked like the linears.
The one-call C++ paths (decode_step_cpu, moe_layer_cpu, attention_block_decode_cpu) take each
weight as either kind of panel, told by a QFormat per weight (bits 0: bf16/fp32 panels;
csrc/cpu/either_panels.h), and call the same kernels as the op-by-op path, so quantized models
take them too (CpuModelWeights.one_call).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

from .decode_threads import DecodeThreads
from .loader import DenseMLPWeights, LayerWeights, ModelWeights, MoEWeights
from .ops import backend as backends
from .ops.expert_ffn import CpuExperts, expert_ffn_cpu, swiglu, workspace_bytes
from .ops.norm import rms_norm_ref
from .ops.packed import PackedWeight, linear_cpu, pack_weight, unpack_weight
from .ops.quant import (CudaQExperts, CudaQWeight, PackedQWeight, dequantize_packed, expert_ffn_q_cpu,
                        expert_ffn_q_workspace_bytes, linear_q_cpu, linear_q_cuda, pack_quantized)
from .ops.route import control_strides
from .quant import QuantError, QuantizedWeight
from .runner import SMALL_N, runs_packed, use_packed  # the path rule (runner.py)

# Shapes (N, k_max) whose fused-layer buffers a layer keeps (oldest dropped first): a decode loop
# uses one or two; a lens run over varied sample lengths would otherwise hold one set per length.
MAX_SHAPES = 8
# Only calls of at most this many tokens keep their buffers: keeping them spares a decode step
# its allocations, while a prefill or corpus batch of thousands of tokens would pin tens of MB per
# layer and shape (8 shapes x every MoE layer: about 1 GB for 8192-token batches of the bundled
# model, which is what made a prune run grow) for an allocation its own compute dwarfs.
MAX_KEPT_TOKENS = 64


@dataclass(frozen=True)
class QuantExperts:
    """E quantized SwiGLU experts in the quantized panel layout (CpuExperts' quantized twin)."""
    w13: PackedQWeight   # [E, 2F, D], gate_up panels
    w2: PackedQWeight    # [E, D, F]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, D, F), like CpuExperts.shape."""
        return self.w13.E, self.w13.Din, self.w13.Dout // 2


@dataclass(frozen=True)
class PackedRows:
    """Rows [start, stop) of a packed weight (bf16/fp32 panels or quantized panels): what
    ModelWeights holds for a linear once the cpu backend has packed it (the packed bytes are
    its only copy; q, k and v are three views of one q|k|v weight)."""
    packed: PackedWeight | PackedQWeight
    start: int
    stop: int
    stacked: bool    # the weight is [E, N, K] (routed experts), else [N, K]

    @property
    def shape(self) -> tuple[int, ...]:
        lead = (self.packed.E,) if self.stacked else ()
        return (*lead, self.stop - self.start, self.packed.Din)

    def whole(self, dtype: torch.dtype) -> torch.Tensor:
        """Every row of the packed weight as a tensor in dtype, made now and not kept: unpacked
        (exact) from bf16/fp32 panels; dequantized from quantized ones (fp32 exact, then rounded
        once, like QuantizedWeight.dequantize)."""
        if isinstance(self.packed, PackedQWeight):
            full = dequantize_packed(self.packed)
        else:
            full = unpack_weight(self.packed)
            full = full if self.stacked else full[0]
        return full.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This view's weight in dtype, made now and not kept (the same method as
        QuantizedWeight's, so loader.dequantized_layer takes either)."""
        return self.whole(dtype)[..., self.start:self.stop, :].contiguous()


def dense_all(ws, dtype: torch.dtype) -> list:
    """Each linear of ws as a tensor in dtype: a tensor is returned as it is; a QuantizedWeight or
    PackedRows view is dequantized / unpacked now and not kept, views of one packed weight (q, k,
    v) from one unpacking (contiguous row slices of it)."""
    whole, out = {}, []
    for w in ws:
        if isinstance(w, PackedRows):
            key = id(w.packed)
            if key not in whole:
                whole[key] = w.whole(dtype)
            out.append(whole[key][..., w.start:w.stop, :])
        else:
            out.append(w if isinstance(w, torch.Tensor) else w.dequantize(dtype))
    return out


def dense(w, dtype: torch.dtype) -> torch.Tensor:
    """One linear as a tensor in dtype (dense_all of one)."""
    return dense_all([w], dtype)[0]


def _repack(qw: QuantizedWeight, gate_up: bool = False) -> PackedQWeight:
    """pack_quantized of a QuantizedWeight (the kernels take true zero points: kernel_qzeros)."""
    return pack_quantized(qw.qweight, qw.scales, qw.kernel_qzeros(), qw.bits, qw.group_size, qw.sym,
                          gate_up=gate_up)


def _views(packed, ws: list, stacked: bool) -> list:
    """One PackedRows per part of ws, the parts stacked along N in `packed` in this order."""
    ends = torch.tensor([w.shape[-2] for w in ws]).cumsum(0).tolist()
    return [PackedRows(packed, e - w.shape[-2], e, stacked) for w, e in zip(ws, ends)]


def _pack_linears(ws: list, what: str, gate_up: bool = False):
    """Weights stacked along N, as (packed, one PackedRows view per part): a PackedQWeight when
    every part is quantized, else a PackedWeight."""
    quantized = [isinstance(w, QuantizedWeight) for w in ws]
    if not any(quantized):
        packed = pack_weight(torch.cat(ws, -2) if len(ws) > 1 else ws[0], gate_up=gate_up)
        return packed, _views(packed, ws, ws[0].dim() == 3)
    if not all(quantized):
        raise QuantError(f"{what}: quantized and unquantized parts cannot be packed together")
    packed = _repack(QuantizedWeight.cat_rows(ws) if len(ws) > 1 else ws[0], gate_up)
    return packed, _views(packed, ws, packed.stacked)


def _pack_experts(gate_up, down, what: str):
    """(CpuExperts or QuantExperts, gate_up view, down view) of one set of SwiGLU weights."""
    if not isinstance(gate_up, QuantizedWeight) and not isinstance(down, QuantizedWeight):
        experts = CpuExperts.pack(gate_up, down)
        stacked = gate_up.dim() == 3
        return experts, PackedRows(experts.w13, 0, gate_up.shape[-2], stacked), \
            PackedRows(experts.w2, 0, down.shape[-2], stacked)
    w13, (gu,) = _pack_linears([gate_up], what + " gate|up", gate_up=True)
    w2, (dn,) = _pack_linears([down], what + " down")
    return QuantExperts(w13, w2), gu, dn


def native_format(mod, packed):
    """The QFormat the one-call C++ paths read for one packed weight: its quantized format, or
    bits 0 (bf16/fp32 panels)."""
    return packed.native_format(mod) if isinstance(packed, PackedQWeight) else mod.QFormat()


def _ffn_workspace_bytes(dt: torch.dtype, N: int, k_max: int, packed) -> int:
    """Workspace bytes of expert_ffn_packed on N tokens and k_max slots (either kind of experts)."""
    if isinstance(packed, QuantExperts):
        return expert_ffn_q_workspace_bytes(N, k_max, packed.w13, packed.w2)
    E, _, F = packed.shape
    return workspace_bytes(dt, N, k_max, E, F)


def expert_ffn_packed(x: torch.Tensor, topk_ids: torch.Tensor, packed) -> torch.Tensor:
    """expert_ffn_cpu on CpuExperts or expert_ffn_q_cpu on QuantExperts (same contract)."""
    if isinstance(packed, QuantExperts):
        return expert_ffn_q_cpu(x, topk_ids, packed.w13, packed.w2)
    return expert_ffn_cpu(x, topk_ids, packed)


@dataclass(frozen=True)
class CpuMoEWeights:
    router: PackedWeight         # [E, D]
    experts: CpuExperts | QuantExperts          # E routed experts
    shared: CpuExperts | QuantExperts | None    # the shared MLP as one expert (E = 1, F = S)
    # Intermediate buffers of the fused layer call, per (N, k_max): reused across decode steps.
    # They make a layer non-reentrant: one forward at a time per Model.
    _buffers: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def pack(w: MoEWeights) -> "CpuMoEWeights":
        return CpuMoEWeights.pack_views(w)[0]

    @staticmethod
    def pack_views(w: MoEWeights) -> "tuple[CpuMoEWeights, MoEWeights]":
        """The packed layer and the MoEWeights to keep in its place (PackedRows views of it)."""
        shared, shared_w = None, None
        if w.shared is not None:
            shared, gu, dn = _pack_experts(w.shared.gate_up, w.shared.down, "shared experts")
            shared_w = DenseMLPWeights(gu, dn)
        experts, gu, dn = _pack_experts(w.experts_gate_up, w.experts_down, "routed experts")
        router, (router_w,) = _pack_linears([w.router], "router")
        return CpuMoEWeights(router, experts, shared), MoEWeights(router_w, gu, dn, shared_w, w.ep)

    def fused(self, u: torch.Tensor, resid_mid: torch.Tensor, k: int, k_max: int, controls,
              mask_mode: str, renormalize: bool, usage: torch.Tensor | None) -> torch.Tensor:
        """The whole MoE FFN of the layer in one C++ call (csrc/cpu/moe_layer.cpp); same kernels
        and order as the op-by-op path, so the same bits. u, resid_mid [N, D]; returns resid_post.
        The caller has validated the routing controls (Interventions.resolve)."""
        mod = backends.native_module("cpu")
        N, D = u.shape
        key = (N, k_max)
        if N > MAX_KEPT_TOKENS:
            p, _bufs = self._build(mod, N, k_max)  # freed when this call returns
        else:
            if key not in self._buffers:
                if len(self._buffers) >= MAX_SHAPES:  # bounded: a run of varied sizes must
                    del self._buffers[next(iter(self._buffers))]  # not keep every shape's buffers
                self._buffers[key] = self._build(mod, N, k_max)
            p, _ = self._buffers[key]
        k_t, mask_t, force_t = controls
        p.mask_stride, p.force_stride = control_strides(mask_t, force_t, N, self.experts.shape[0])
        out = torch.empty_like(resid_mid)
        p.x, p.residual, p.out = u.data_ptr(), resid_mid.data_ptr(), out.data_ptr()
        p.k, p.force_expert = k_t.data_ptr(), force_t.data_ptr()
        p.expert_mask = 0 if mask_t is None else mask_t.data_ptr()
        p.mask_mode = getattr(mod.MaskMode, mask_mode)
        p.renormalize = bool(renormalize)
        p.usage_counts = 0 if usage is None else usage.data_ptr()
        mod.moe_layer_cpu(p)
        return out

    def _build(self, mod, N: int, k_max: int):
        E, D, F = self.experts.shape
        dt = self.router.dtype  # the model dtype (quantized experts have none)
        S = 0 if self.shared is None else self.shared.shape[2]
        ws = _ffn_workspace_bytes(dt, N, k_max, self.experts)
        if self.shared is not None:
            ws = max(ws, _ffn_workspace_bytes(dt, N, 1, self.shared))
        bufs = dict(
            router_logits=torch.empty((N, E), dtype=dt),
            topk_ids=torch.empty((N, k_max), dtype=torch.int32),
            topk_weights=torch.empty((N, k_max), dtype=torch.float32),
            expert_out=torch.empty((N, k_max, D), dtype=dt),
            shared_out=torch.empty((N, D), dtype=dt),
            shared_ids=torch.zeros(N, dtype=torch.int32),
            workspace=torch.empty(ws + 64, dtype=torch.uint8))
        p = mod.MoELayerParams()
        for name, t in bufs.items():
            setattr(p, name, t.data_ptr())
        p.workspace = (p.workspace + 63) // 64 * 64
        p.router, p.w13, p.w2 = self.router.data.data_ptr(), self.experts.w13.data.data_ptr(), self.experts.w2.data.data_ptr()
        p.fmt13, p.fmt2 = native_format(mod, self.experts.w13), native_format(mod, self.experts.w2)
        if self.shared is not None:
            p.shared_w13, p.shared_w2 = self.shared.w13.data.data_ptr(), self.shared.w2.data.data_ptr()
            p.shared_fmt13, p.shared_fmt2 = native_format(mod, self.shared.w13), native_format(mod, self.shared.w2)
        p.dtype = backends.native_dtype(mod, dt)
        p.T, p.D, p.E, p.F, p.S, p.k_max = N, D, E, F, S, k_max
        return p, bufs  # the buffers live as long as the params that point at them


@dataclass(frozen=True)
class CpuLayerWeights:
    qkv: PackedWeight | PackedQWeight     # [(H + 2 Hkv) hd, D]: q, k, v rows stacked
    o: PackedWeight | PackedQWeight       # [D, H hd]
    dense: CpuExperts | QuantExperts | None   # layer's dense MLP as one expert (F = I)
    moe: CpuMoEWeights | None

    @staticmethod
    def pack(lw: LayerWeights) -> "CpuLayerWeights":
        return CpuLayerWeights.pack_views(lw)[0]

    @staticmethod
    def pack_views(lw: LayerWeights) -> "tuple[CpuLayerWeights, LayerWeights]":
        """The packed layer and the LayerWeights to keep in its place: its linears are PackedRows
        views of the packed bytes (the norms stay tensors)."""
        qkv, (q, k, v) = _pack_linears([lw.q, lw.k, lw.v], "attention q|k|v")
        o, (o_w,) = _pack_linears([lw.o], "attention o")
        dense, moe, mlp = None, None, lw.mlp
        if isinstance(lw.mlp, DenseMLPWeights):
            dense, gu, dn = _pack_experts(lw.mlp.gate_up, lw.mlp.down, "dense MLP")
            mlp = DenseMLPWeights(gu, dn)
        else:
            moe, mlp = CpuMoEWeights.pack_views(lw.mlp)
        packed = CpuLayerWeights(qkv, o, dense, moe)
        return packed, LayerWeights(lw.input_norm, lw.post_attn_norm, q, k, v, o_w, mlp)


@dataclass(frozen=True)
class CpuModelWeights:
    layers: tuple[CpuLayerWeights, ...]
    lm_head: PackedWeight | PackedQWeight  # [V, D]
    final_norm: torch.Tensor         # [D] (the model's tensor)
    decode_layers: object            # _C.DecodeLayers, one per layer: what decode_step reads (None
                                     # when not one_call)
    # decode_step's (workspace, params) per (B, k_max, Tkv_cap): reused across steps (one forward
    # at a time).
    _workspaces: dict = field(default_factory=dict, compare=False, repr=False)
    # the team size of each decode step on a busy machine (decode_threads.py)
    threads: DecodeThreads = field(default_factory=DecodeThreads, compare=False, repr=False)

    @staticmethod
    def pack(w: ModelWeights) -> "CpuModelWeights":
        """Pack every layer. Each layer is replaced IN `w` by its PackedRows views as soon as it
        is packed, so its checkpoint-layout (or GPTQ) tensors are freed one layer at a time (peak:
        the model plus one layer's panels) and the packed bytes are the only copy. So is an
        untied lm_head; a tied one is the embedding, which stays a tensor."""
        if any(isinstance(lw.q, PackedRows) for lw in w.layers):
            raise ValueError("CpuModelWeights.pack: these weights are already packed (their linears are "
                             "PackedRows views of a CpuModelWeights); pack the loaded weights once "
                             "(Model._cpu_weights)")
        layers = []
        for i, lw in enumerate(w.layers):
            pl, w.layers[i] = CpuLayerWeights.pack_views(lw)
            layers.append(pl)
        layers = tuple(layers)
        decode_layers = backends.native_module("cpu").DecodeLayers()
        for lw, pl in zip(w.layers, layers):
            decode_layers.append(_decode_layer(lw, pl))
        # the lm_head becomes panels (quantized ones for a quantized lm_head, quant_lm_head) and the
        # model keeps a PackedRows view of them; a tied one stays the embedding (a row gather)
        lm_head, (view,) = _pack_linears([w.lm_head], "lm_head")
        if w.lm_head is not w.embed:
            w.lm_head = view
        _release_freed_memory()
        return CpuModelWeights(layers, lm_head, w.final_norm, decode_layers)

    @property
    def one_call(self) -> bool:
        """The rule for the one-call C++ paths (decode_step_cpu, moe_layer_cpu via
        CpuMoEWeights.fused, attention_block_decode_cpu): they read either kind of panel per
        weight (bf16/fp32 or quantized), so every packed model takes them once its decode layers
        are built."""
        return self.decode_layers is not None

    def decode_step(self, ids: torch.Tensor, embed: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                    cache, routing, usage: torch.Tensor | None, *, H: int, eps: float, scale: float) -> torch.Tensor:
        """A whole decode step in one C++ call (csrc/cpu/decode_step.cpp; ops.h has the sequence):
        ids: B contiguous int64 token ids, one per sequence (checked against the vocabulary
        there); embed [V, D]; rope_cos, rope_sin [n, hd] (row = position, n > every
        cache.next_pos); cache: a model.KVCache with a free column, whose column `cache.used`,
        `valid` and `next_pos` the call fills (the caller advances `used`); usage [L, E] or None.
        Returns fp32 logits [B, V], the same bits as the layer-by-layer cpu path. The caller
        (Model.forward) has checked shapes and resolved the routing controls.
        Kept lean on purpose: a step's weight stream evicts the caches, so each Python or torch
        call here runs cold (bench/README.md)."""
        if self.decode_layers is None:
            raise ValueError("decode_step needs the decode layers (not one_call): forward's general path runs it")
        mod = backends.native_module("cpu")
        B = ids.numel()
        Tkv_cap = cache.k.shape[3]
        key = (B, routing.k_max, Tkv_cap)
        st = self._workspaces.get(key)
        if st is None:
            self._workspaces.clear()  # one shape at a time: a new cache or batch replaces it
            st = self._workspaces[key] = self._new_step(mod, B, routing.k_max, cache, embed, H, eps, scale)
        ws, p = st
        logits = torch.empty((B, self.lm_head.Dout), dtype=torch.float32)
        p.ids, p.logits, p.pos = ids.data_ptr(), logits.data_ptr(), cache.used
        p.rope_cos, p.rope_sin, p.rope_len = rope_cos.data_ptr(), rope_sin.data_ptr(), rope_cos.shape[0]
        p.next_pos, p.valid = cache.next_pos.data_ptr(), cache.valid.data_ptr()
        p.k_cache, p.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
        # the C++ side refuses a cache whose size is not the model's (Model._check_cache has
        # already named the mismatch; this is the last line, e.g. for a KVCache edited in place)
        nbytes = cache.k.numel() * cache.k.element_size()
        same = cache.v.shape == cache.k.shape and cache.v.dtype == cache.k.dtype == embed.dtype
        p.cache_bytes = nbytes if same else -1
        # routing: "call" (one row per layer) or one row per sequence (Routing.for_tokens)
        p.k, p.force_expert = routing.k_dev.data_ptr(), routing.force.data_ptr()
        p.force_stride = 0 if routing.force.shape[1] == 1 else 1
        p.expert_mask = 0 if routing.mask is None else routing.mask.data_ptr()
        p.mask_stride = 0 if routing.mask is None or routing.mask.dim() == 2 else routing.mask.shape[2]
        p.mask_mode, p.renormalize = getattr(mod.MaskMode, routing.mask_mode), routing.renormalize
        p.usage_counts = 0 if usage is None else usage.data_ptr()
        self.threads.run(mod, B, lambda: mod.decode_step_cpu(p, self.decode_layers))
        return logits

    def _new_step(self, mod, B: int, k_max: int, cache, embed: torch.Tensor, H: int, eps: float, scale: float):
        """(workspace, DecodeStepParams with the fields that hold for every step of this shape)."""
        _, _, Hkv, Tkv_cap, hd = cache.k.shape
        moe = next((lc.moe for lc in self.layers if lc.moe is not None), None)
        p = mod.DecodeStepParams()
        p.dtype, p.eps, p.scale = backends.native_dtype(mod, embed.dtype), float(eps), float(scale)
        p.B, p.D, p.H, p.Hkv, p.hd = B, embed.shape[1], H, Hkv, hd
        p.E, p.k_max = (moe.experts.shape[0], k_max) if moe is not None else (0, 0)
        p.V, p.Tkv_cap, p.valid_stride, p.rope_len = self.lm_head.Dout, Tkv_cap, cache.valid.stride(0), 1
        p.embed, p.final_norm, p.lm_head = embed.data_ptr(), self.final_norm.data_ptr(), self.lm_head.data.data_ptr()
        p.lm_head_fmt = native_format(mod, self.lm_head)
        p.cache_bytes = cache.k.numel() * cache.k.element_size()
        ws = torch.empty(mod.decode_step_workspace_bytes(p, self.decode_layers) + 64, dtype=torch.uint8)
        p.workspace = (ws.data_ptr() + 63) // 64 * 64
        return ws, p


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim; elsewhere a no-op). The GPTQ
    tensors freed by packing, quantize-on-load's staging tensors and the small checkpoint-layout
    tensors (norm-sized, routers) are mostly below malloc's mmap threshold: without this they
    stay resident (tests/test_one_copy.py measures RSS)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _decode_layer(lw: LayerWeights, pl: CpuLayerWeights):
    """The _C.DecodeLayer of one layer: pointers into `lw` and `pl` (both live as long as the model)."""
    mod = backends.native_module("cpu")
    d = mod.DecodeLayer()
    d.input_norm, d.post_norm = lw.input_norm.data_ptr(), lw.post_attn_norm.data_ptr()
    d.qkv, d.o = pl.qkv.data.data_ptr(), pl.o.data.data_ptr()
    d.qkv_fmt, d.o_fmt = native_format(mod, pl.qkv), native_format(mod, pl.o)
    experts = pl.dense if pl.moe is None else pl.moe.experts
    if pl.moe is not None:
        d.router = pl.moe.router.data.data_ptr()
        if pl.moe.shared is not None:
            d.shared_w13, d.shared_w2 = pl.moe.shared.w13.data.data_ptr(), pl.moe.shared.w2.data.data_ptr()
            d.S = pl.moe.shared.shape[2]
            d.shared_fmt13, d.shared_fmt2 = native_format(mod, pl.moe.shared.w13), native_format(mod, pl.moe.shared.w2)
    d.w13, d.w2, d.F = experts.w13.data.data_ptr(), experts.w2.data.data_ptr(), experts.shape[2]
    d.fmt13, d.fmt2 = native_format(mod, experts.w13), native_format(mod, experts.w2)
    return d


def linear(x: torch.Tensor, w, packed: PackedWeight | PackedQWeight | CudaQWeight | None) -> torch.Tensor:
    """x [..., K] @ w^T: the packed mat-vec for few tokens, torch's GEMM otherwise (on w made
    dense for this call when the model holds only the panels); a quantized packed weight (the
    only copy) at every size, on the cpu or (CudaQWeight) the CUDA kernels."""
    if isinstance(packed, CudaQWeight):  # cuda / emu: the repacked weight (cuda_weights.py)
        return _on_rows(x, lambda x2: linear_q_cuda(x2, packed))
    if isinstance(packed, PackedQWeight):
        return _on_rows(x, lambda x2: linear_q_cpu(x2, packed))
    if packed is None or not use_packed(x.numel() // x.shape[-1], x.dtype):
        return x @ dense(w, x.dtype).t()
    return _on_rows(x, lambda x2: linear_cpu(x2, packed))


def _on_rows(x: torch.Tensor, fn) -> torch.Tensor:
    """fn on x as contiguous rows [n, Din] -> [n, Dout], viewed back to x's leading shape."""
    y = fn(x.reshape(-1, x.shape[-1]).contiguous())
    return y.view(*x.shape[:-1], y.shape[-1])

def ffn(x: torch.Tensor, mlp: DenseMLPWeights, packed: CpuExperts | QuantExperts | CudaQExperts | None) -> torch.Tensor:
    """A dense layer's SwiGLU MLP: one_expert on the cpu backend (packed given), the quantized CUDA
    kernels in dense mode (CudaQExperts, cuda / emu), else torch."""
    if packed is None:
        return swiglu(x, mlp.gate_up, mlp.down)
    if isinstance(packed, CudaQExperts):  # cuda / emu: dense mode, every token through expert 0
        return _on_rows(x, lambda x2: packed(x2, None))
    return one_expert(x, packed, mlp)


def one_expert(x: torch.Tensor, packed: CpuExperts | QuantExperts, mlp: DenseMLPWeights | None = None) -> torch.Tensor:
    """The cpu backend's one dense SwiGLU MLP, x [..., D] -> [..., D]: the shared experts (mlp
    None) and a dense layer's MLP (mlp: its weights, PackedRows views or tensors). Runs as one
    expert of the fused expert kernel (every token on expert 0), except a dense MLP on more
    tokens than use_packed admits, which runs torch's GEMMs on its weights made dense for the
    call. The shared experts take the packed kernel at every size, as the one-call MoE layer
    (csrc/cpu/moe_layer.cpp) runs them, so op-by-op and fused give the same bits."""
    n = x.numel() // x.shape[-1]
    if mlp is not None and not runs_packed(packed, n, x.dtype):
        gate_up, down = dense_all([mlp.gate_up, mlp.down], x.dtype)
        return swiglu(x, gate_up, down)
    x2 = x.reshape(n, x.shape[-1]).contiguous()
    if isinstance(packed, CudaQExperts):  # cuda / emu: dense mode, every token through expert 0
        return packed(x2, None).view(x.shape)
    every_token = torch.zeros((n, 1), dtype=torch.int32)
    return expert_ffn_packed(x2, every_token, packed).view(x.shape)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (ops/norm.py: fp32 statistics, rounded to dt before the multiply by w)
    in one C++ call for few tokens (a decode step runs 2 per layer; as torch ops each is ~8 launches)."""
    n = x.numel() // x.shape[-1]
    if n > SMALL_N or not x.is_contiguous():
        return rms_norm_ref(x, w, eps)
    mod = backends.native_module("cpu")
    out = torch.empty_like(x)
    p = mod.RMSNormParams()
    p.x, p.w, p.out, p.eps = x.data_ptr(), w.data_ptr(), out.data_ptr(), float(eps)
    p.dtype, p.T, p.D = backends.native_dtype(mod, x.dtype), n, x.shape[-1]
    mod.rms_norm_cpu(p)
    return out
