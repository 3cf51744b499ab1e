"""Which path a forward call takes: the one rule, in one place (docs/design.md §2).

Model.forward asks a Runner; nothing else decides between the paths. n is the token count of
one product (B x Q for attention and dense GEMMs, the valid tokens N for the MoE layer).

    backend    when                                                path
    ---------  --------------------------------------------------  ----------------------------------
    cpu        one_call, T = 1, B <= DECODE_STEP_MAX_B, no         decode_step: the whole step in one
               attention_mask, no capture, a cache with a free     C++ call (CpuModelWeights.decode_step)
               column, ids an int tensor on the model's device,
               rope rows precomputed for the position
    cpu        one_call, no capture                                fused_moe: each MoE layer in one C++
                                                                   call (CpuMoEWeights.fused)
    cpu        one_call, T = 1                                     fused_attention: the attention block
                                                                   in one C++ call
    cpu        any n: quantized weights, or use_packed(n)          packed kernels (ops/packed.py,
               (n <= SMALL_N, or bf16 without AVX-512 BF16)        ops/quant.py), else torch's GEMM
                                                                   on weights unpacked for the call
    cuda       CUDA graphs on (Model(cuda_graph=...)), T = 1, no   graph_step: the decode step replays
               attention_mask, a cache with a free column, rope    a captured graph (graphs.py); it
               rows precomputed for the position; "call" routing,  falls back to the rows below for
               no patch, no grad                                   per-position/token controls, patches
    cuda, emu  quantized bf16 model (cuda_weights.py, repacked     routed experts: moe_decode_q,
               at load): MoE layer, N <= DECODE_MAX_T (else        else align + expert_gemm_q; shared
               align + GEMM); every quantized linear whose         experts and dense MLP: the same in
               sizes are multiples of 8                            dense mode; q|k|v, o: linear_q_cuda
    cuda, emu  MoE layer, N <= DECODE_MAX_T (else align + GEMM)    moe_decode (csrc/cuda)
    cuda, emu  attention, norms, dense GEMMs                       PyTorch (quantized weights that the
                                                                   row above does not take: dequantized
                                                                   per call)
    torch      everything; weights held as quantized tensors or    PyTorch reference ops
               cpu panels made dense per call

one_call = CpuModelWeights.one_call (which models the one-call C++ paths read). Every path gives
the same bits as the op-by-op cpu path it replaces (tests/test_model_backends.py); each row
below the first is what runs when the rows above do not apply.
"""
from __future__ import annotations

import torch

from .ops import backend as backends

# Up to this many tokens the packed mat-vec beats torch's GEMM on the dense weights (measured
# by bench/kernels.py, section "dense"); above it torch's blocked GEMM wins, except in bf16 on
# CPUs without AVX-512 BF16: there torch has no fast bf16 GEMM (its AVX2 fallback runs several
# times slower than the panel kernel; bench/README.md), so the packed kernels take every size.
SMALL_N = 16
# The one-call decode step runs its GEMMs as packed mat-vecs: it serves the batches they serve.
DECODE_STEP_MAX_B = SMALL_N
# csrc/cuda/moe_decode.cu: up to here a mat-vec per (token, expert) beats the grouped GEMM.
DECODE_MAX_T = 16


def use_packed(n: int, dtype: torch.dtype) -> bool:
    """Whether an n-token product with dense packed weights runs on the packed kernels (else torch)."""
    return n <= SMALL_N or (dtype == torch.bfloat16 and backends.native_module("cpu").cpu_isa != "avx512")


def runs_packed(packed, n: int, dtype: torch.dtype) -> bool:
    """Whether an n-token product with these packed weights runs on the packed kernels: always
    for quantized ones (there is no dense copy to hand to torch), else use_packed."""
    from .cpu_weights import QuantExperts
    from .ops.quant import CudaQExperts, CudaQWeight, PackedQWeight
    if packed is None:  # cuda / emu: a part the quantized kernels do not hold (torch's GEMM)
        return False
    return isinstance(packed, (PackedQWeight, QuantExperts, CudaQWeight, CudaQExperts)) or use_packed(n, dtype)


class Runner:
    """The path rule for calls on one backend (the table above). `packed` is the model's
    CpuModelWeights for backend "cpu", else None; `quant` the model's cuda_weights.CudaModelWeights
    for backend "cuda" / "emu" when it has quantized weights the kernels take, else None. Cheap:
    one per (model, backend)."""

    def __init__(self, backend: str, packed=None, quant=None):
        if (backend == "cpu") != (packed is not None):
            raise ValueError(f"Runner: packed cpu weights go with backend 'cpu' only (backend={backend!r})")
        if quant is not None and backend not in ("cuda", "emu"):
            raise ValueError(f"Runner: repacked quantized weights go with backend 'cuda' or 'emu' only "
                             f"(backend={backend!r})")
        self.backend = backend
        self.packed = packed
        self.quant = quant
        # CpuModelWeights.one_call is the single rule for which models the one-call paths read
        self.one_call = packed is not None and packed.one_call
        if packed is not None:  # the model's RMSNorm: one C++ call for few tokens
            from .cpu_weights import rms_norm
        else:
            from .ops.norm import rms_norm_ref as rms_norm
        self.rms_norm = rms_norm

    def __repr__(self) -> str:
        return f"Runner({self.backend!r}, one_call={self.one_call})"

    def decode_step(self, ids, cache, config, device, *, attention_mask=None, capture=None) -> bool:
        """Whether this call runs as one C++ decode step (the table's first row). Anything
        unusual (wrong dtype, shape or device, no free column) answers False: the layer loop
        then runs and raises whatever is wrong."""
        if not self.one_call or attention_mask is not None or capture is not None or cache is None:
            return False
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.device != device:
            return False
        shape = ids.shape
        if not ((len(shape) == 2 and shape[1] == 1) or (len(shape) == 1 and shape[0] == 1)):
            return False
        B = shape[0]
        if not 0 < B <= DECODE_STEP_MAX_B or cache.k.shape[1] != B or cache.used + 1 > cache.capacity:
            return False
        rs = config.rope_scaling
        # beyond the context (an error) or dynamic scaling (per call): the layer loop's _rope
        return cache.used + 1 <= config.max_position_embeddings or (rs is not None and rs.type != "dynamic")

    def graph_step(self, ids, cache, config, *, attention_mask=None) -> bool:
        """Whether a call can be a captured decode step (the cuda graph row, before the model's
        graphs look at its routing and capture): one token per sequence of the cache's batch, no
        attention_mask, a free cache column, rope rows that do not depend on the call. The
        model asks only when it holds graphs (on for cuda; tests give emu a fake graph)."""
        if self.backend not in ("cuda", "emu") or attention_mask is not None or cache is None:
            return False
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            return False
        shape = ids.shape
        if not ((len(shape) == 2 and shape[1] == 1) or (len(shape) == 1 and shape[0] == 1)):
            return False
        if cache.k.shape[1] != shape[0] or cache.used + 1 > cache.capacity:
            return False
        rs = config.rope_scaling
        return cache.capacity <= config.max_position_embeddings or (rs is not None and rs.type != "dynamic")

    def fused_moe(self, capture) -> bool:
        """Whether an MoE layer runs as one C++ call: its taps need the op-by-op tensors."""
        return self.one_call and capture is None

    def fused_attention(self, T: int) -> bool:
        """Whether a T-token attention block runs as one C++ call (decode only)."""
        return self.one_call and T == 1

    def layer(self, l: int, lw, dtype: torch.dtype):
        """(weights, packed weights or None) of layer l as this backend reads them: the cpu
        backend's packed weights (with `lw`, whose linears are views of them), the cuda / emu
        backends' repacked quantized parts (cuda_weights.CudaLayerWeights; the rest made dense
        for this call), or (every other backend) tensors made for this call only from
        quantized weights or cpu panels."""
        if self.packed is not None:
            return lw, self.packed.layers[l]
        if self.quant is not None:
            return self.quant.layer(l, lw, dtype)
        from .loader import dequantized_layer
        return dequantized_layer(lw, dtype), None

    def head(self, lm_head, dtype: torch.dtype):
        """(lm_head weight, packed lm_head or None) as this backend reads them, like `layer`: a
        quantized lm_head (quant_lm_head) runs on the cpu backend's packed copy, elsewhere on a
        dequantized view made for this call only."""
        if self.packed is not None:
            return lm_head, self.packed.lm_head
        return (lm_head if isinstance(lm_head, torch.Tensor) else lm_head.dequantize(dtype)), None
