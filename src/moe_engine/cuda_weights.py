"""A quantized model's weights on the cuda and emu backends: every quantized linear repacked once,
at load, into the CUDA kernels' qrow layout (ops/quant.py repack_quantized_cuda; layout and bytes:
csrc/cuda/moe_decode_q.cu), on the model's device. No bf16 copy of a quantized weight is made.

Shape legend: E routed experts, D hidden, F expert width, S shared width, I dense MLP width,
H heads, Hkv key/value heads, hd head dim.

    part of a layer          repacked as                     runs on (runner.py's table)
    routed experts           CudaQExperts [E, 2F, D] / [E, D, F]   moe_decode_q (N <= DECODE_MAX_T),
                                                             else align + expert_gemm_q
    shared experts           CudaQExperts, E = 1 (F = S)     the same kernels in dense mode
    dense MLP                CudaQExperts, E = 1 (F = I)     the same kernels in dense mode
    q|k|v                    CudaQWeight [(H + 2 Hkv) hd, D]  linear_q_cuda (expert_gemm_q's down
    o                        CudaQWeight [D, H hd]             launch in dense mode)

A part stays a QuantizedWeight, dequantized per call as on the torch backend (Runner.layer), when
the kernels cannot take it: a float32 model (they take bf16 activations: nothing is repacked),
sizes that are not multiples of 8 (their 16-byte loads), the routed experts of an expert-parallel
shard (distributed.py exchanges rows for the bf16 expert kernels), and a part that is already the
cpu backend's packed copy (cpu_weights.PackedRows). The router, norms, embedding and lm_head are
never quantized. The model keeps its QuantizedWeights too (the torch backend on the same model
reads them), so a quantized weight is held twice in quantized form on this path.
Test: tests/test_quant_model.py (the tiny model on emu against the cpu backend's quantized model).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .loader import DenseMLPWeights, LayerWeights, ModelWeights, dequantized_layer
from .ops.quant import CudaQExperts, CudaQWeight, repack_quantized_cuda
from .quant import QuantizedWeight


def _fits(qw) -> bool:
    """Whether the kernels take this weight: a QuantizedWeight with Dout and Din multiples of 8."""
    return isinstance(qw, QuantizedWeight) and qw.Dout % 8 == 0 and qw.Din % 8 == 0


def _repack(qw: QuantizedWeight, backend: str) -> CudaQWeight:
    return repack_quantized_cuda(qw.qweight, qw.scales, qw.kernel_qzeros(), qw.bits, qw.group_size, qw.sym,
                                 backend=backend)


def _linear(ws: list, backend: str, held: list) -> CudaQWeight | None:
    """The parts stacked along Dout as one repacked weight, or None when the kernels do not take all
    of them (then each stays as it is)."""
    if not all(_fits(w) for w in ws):
        return None
    held.extend(ws)
    return _repack(QuantizedWeight.cat_rows(ws) if len(ws) > 1 else ws[0], backend)


def _experts(gate_up, down, backend: str, held: list) -> CudaQExperts | None:
    """SwiGLU weights ([E, 2F, D] / [E, D, F], or [2F, D] / [D, F] as a stack of one) repacked,
    or None when the kernels do not take both."""
    if not (_fits(gate_up) and _fits(down)):
        return None
    held.extend((gate_up, down))
    return CudaQExperts(_repack(gate_up, backend), _repack(down, backend))


@dataclass(frozen=True)
class CudaMoEWeights:
    experts: CudaQExperts | None     # routed experts; None: not repacked
    shared: CudaQExperts | None      # the shared MLP as one expert; None: none, or not repacked


@dataclass(frozen=True)
class CudaLayerWeights:
    """One layer's repacked parts (None: the part runs as on an unquantized model) and the
    QuantizedWeights they replace (`held`: never dequantized on this path)."""
    qkv: CudaQWeight | None
    o: CudaQWeight | None
    dense: CudaQExperts | None
    moe: CudaMoEWeights | None
    held: tuple = field(repr=False, compare=False)

    @staticmethod
    def repack(lw: LayerWeights, backend: str) -> "CudaLayerWeights":
        held: list = []
        qkv = _linear([lw.q, lw.k, lw.v], backend, held)
        o = _linear([lw.o], backend, held)
        dense, moe, m = None, None, lw.mlp
        if isinstance(m, DenseMLPWeights):
            dense = _experts(m.gate_up, m.down, backend, held)
        else:
            experts = None if m.ep is not None else _experts(m.experts_gate_up, m.experts_down, backend, held)
            shared = None if m.shared is None else _experts(m.shared.gate_up, m.shared.down, backend, held)
            moe = CudaMoEWeights(experts, shared)
        return CudaLayerWeights(qkv, o, dense, moe, tuple(held))

    def holds(self, w) -> bool:
        """Whether w is one of the QuantizedWeights this layer repacked."""
        return any(w is h for h in self.held)


@dataclass(frozen=True)
class CudaModelWeights:
    layers: tuple[CudaLayerWeights, ...]

    @staticmethod
    def repack(w: ModelWeights, backend: str) -> "CudaModelWeights | None":
        """Every layer repacked for `backend` ("cuda" or "emu"); None when nothing would be (an
        unquantized or a float32 model)."""
        if backend not in ("cuda", "emu"):
            raise ValueError(f"CudaModelWeights.repack: backend must be 'cuda' or 'emu', got {backend!r}")
        if w.embed.dtype != torch.bfloat16:
            return None
        layers = tuple(CudaLayerWeights.repack(lw, backend) for lw in w.layers)
        return CudaModelWeights(layers) if any(cl.held for cl in layers) else None

    def layer(self, l: int, lw: LayerWeights, dtype: torch.dtype) -> tuple[LayerWeights, CudaLayerWeights]:
        """(weights, repacked parts) of layer l for one call: the parts the kernels hold stay
        QuantizedWeights (unread), any other quantized part is dequantized for this call only."""
        cl = self.layers[l]
        return dequantized_layer(lw, dtype, keep=cl.holds), cl


__all__ = ["CudaLayerWeights", "CudaModelWeights", "CudaMoEWeights"]
