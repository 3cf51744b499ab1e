"""The MoE layer (docs/design.md §3), the same sequence of ops on every backend:

    router GEMM -> route -> expert_ffn -> shared experts -> combine (+ residual)

On cuda the shared experts run on a side stream, forked once hook_in is taken and joined before
combine, so they overlap the router and the routed experts (streams.py; graphs.py captures both
branches). Every other backend runs the same code in program order.

Shape legend: N tokens, D hidden, E routed experts, K top-k of this layer (runtime), k_max
buffer width of this call, F expert width, S shared width.

    router_logits = u W_g^T                         [N, E]   (model dtype; torch GEMM)
    topk_ids, topk_weights, router_probs = route(router_logits, K, mask, force, renormalize)
    expert_out[t, j] = FFN_{topk_ids[t, j]}(u[t])   [N, k_max, D]  unweighted (the lens tap)
    shared_out = FFN_shared(u)                      [N, D]   one dense SwiGLU (torch: GEMMs;
                              cpu: cpu_weights.one_expert, the expert kernel with E = 1;
                              cuda/emu: shared_expert.cu, or on a quantized model the
                              quantized expert kernels, E = 1)
    resid_post = combine(expert_out, topk_weights, shared_out, residual=resid_mid)

Taps written here: blocks.{l}.moe.hook_in, hook_router_logits, hook_router_probs,
hook_topk_ids, hook_topk_weights, hook_expert_out, hook_routed_out, hook_shared_out and
blocks.{l}.hook_mlp_out (= routed_out + shared_out, rounded to the model dtype).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .interventions import Routing
from .loader import MoEWeights
from .cpu_weights import CpuMoEWeights, expert_ffn_packed, one_expert
from .cuda_weights import CudaMoEWeights
from .ops.combine import combine
from .ops.expert_ffn import expert_ffn, shared_expert_cuda, swiglu
from .ops.packed import linear_cpu
from .ops.route import route
from .streams import fork


def moe_layer(u: torch.Tensor, resid_mid: torch.Tensor, w: MoEWeights, routing: Routing, l: int, *,
              backend: str, tap: Callable | None = None, wants: Callable | None = None,
              usage: torch.Tensor | None = None, cpu: CpuMoEWeights | None = None,
              quant: CudaMoEWeights | None = None, fused: bool = False) -> torch.Tensor:
    """u = RMSNorm_post(resid_mid) [N, D]; returns resid_post [N, D]. routing: broadcast ("call")
    or one control row per token of u (Routing.for_tokens).
    cpu: the packed weights backend="cpu" streams (required for that backend). quant: backend
    "cuda" / "emu" on a quantized model: the experts repacked for the quantized kernels
    (cuda_weights.py; a part it holds as None runs from w). fused: run the layer as one C++ call
    (cpu backend, no taps; same bits as op by op); the caller asks runner.Runner.fused_moe, which
    owns that rule."""
    if (backend == "cpu") != (cpu is not None):
        raise ValueError(f"moe_layer: packed cpu weights go with backend 'cpu' only (backend={backend!r})")
    if quant is not None and backend not in ("cuda", "emu"):
        raise ValueError(f"moe_layer: repacked quantized weights go with backend 'cuda' or 'emu' only "
                         f"(backend={backend!r})")
    qexperts = None if quant is None else quant.experts
    qshared = None if quant is None else quant.shared
    if fused and (cpu is None or tap is not None):
        raise ValueError("moe_layer: fused=True needs the cpu backend's packed weights and no taps "
                         "(runner.Runner.fused_moe)")
    pre = f"blocks.{l}.moe."
    want = (lambda name: False) if wants is None else wants
    t = (lambda name, v: v) if tap is None else tap
    k = routing.k[l]
    if u.shape[0] == 0:
        return resid_mid
    if fused:
        return cpu.fused(u, resid_mid, k, routing.k_max, routing.controls(l), routing.mask_mode,
                         routing.renormalize, usage)
    u = t(pre + "hook_in", u)
    # The shared experts need only u: on cuda they run on a side stream beside the router and the
    # routed experts, joined before combine (streams.py; a no-op order on the other backends).
    branch = fork(backend, u.device, enabled=w.shared is not None)
    shared = None
    with branch:
        if w.shared is not None:
            if qshared is not None:  # the quantized kernels in dense mode
                shared = qshared(u, None).view(u.shape)
            elif backend in ("cuda", "emu"):
                shared = shared_expert_cuda(u, w.shared.gate_up, w.shared.down, backend=backend)
            elif cpu is None:
                shared = swiglu(u, w.shared.gate_up, w.shared.down)
            else:
                shared = one_expert(u, cpu.shared)
    # cpu: the router and shared MLP always run on the packed kernels (any N), so the fused call
    # and this op-by-op path give the same bits.
    router_logits = u @ w.router.t() if cpu is None else linear_cpu(u, cpu.router)
    logits = t(pre + "hook_router_logits", router_logits)
    ids, weights, probs = route(
        logits, k, k_max=routing.k_max, mask_mode=routing.mask_mode, renormalize=routing.renormalize,
        backend=backend, want_probs=want(pre + "hook_router_probs"), usage_counts=usage,
        controls=routing.controls(l))
    if probs is not None:
        t(pre + "hook_router_probs", probs)
    if want(pre + "hook_topk_ids"):
        ids = _patch_cols(t, pre + "hook_topk_ids", ids, k)
    if want(pre + "hook_topk_weights"):
        weights = _patch_cols(t, pre + "hook_topk_weights", weights, k)
    # cuda / emu: K is data on the device (route reads routing.k_dev and writes id -1, weight 0
    # past K, which expert_ffn and combine skip), so K = 0 launches the same kernels as any K and
    # a captured decode step (graphs.py) replays for every K <= k_max. The host k decides only on
    # the other backends, where skipping the expert call saves its work.
    on_device = backend in ("cuda", "emu") and w.ep is None
    if k > 0 and w.ep is not None:  # expert parallelism: this rank's experts + the exchange
        expert_out = w.ep.expert_ffn(u, ids, w, cpu, backend=backend)   # (distributed.py)
    elif k > 0 and cpu is not None:  # the packed experts (w holds only views of them)
        expert_out = expert_ffn_packed(u, ids, cpu.experts)
    elif qexperts is not None and (k > 0 or on_device):  # moe_decode_q / align + expert_gemm_q
        expert_out = qexperts(u, ids)
    elif k > 0 or on_device:
        expert_out = expert_ffn(u, ids, w.experts_gate_up, w.experts_down, backend=backend)
    else:  # shared experts only: nothing routed
        expert_out = torch.zeros((u.shape[0], routing.k_max, u.shape[1]), dtype=u.dtype, device=u.device)
    if want(pre + "hook_expert_out"):
        expert_out = _patch_cols(t, pre + "hook_expert_out", expert_out, k)
    branch.join()
    shared_out = None if shared is None else t(pre + "hook_shared_out", shared)
    want_routed = want(pre + "hook_routed_out") or want(f"blocks.{l}.hook_mlp_out")
    out, routed = combine(expert_out, weights, ids, shared_out, resid_mid, backend=backend,
                          want_routed=want_routed)
    if want_routed:
        t(pre + "hook_routed_out", routed)
        mlp = routed if shared_out is None else (routed.float() + shared_out.float()).to(routed.dtype)
        mlp_p = t(f"blocks.{l}.hook_mlp_out", mlp)
        if mlp_p is not mlp:  # patched: the layer output follows the patched MLP output
            out = resid_mid + mlp_p
    return out


def _patch_cols(tap, name, buf, k):
    """Tap the first k slots of a [N, k_max, ...] buffer; a patch writes back into the buffer."""
    view = buf[:, :k]
    new = tap(name, view)
    if new is not view:
        buf = buf.clone()
        buf[:, :k] = new
    return buf
