"""route: router logits -> fp32 softmax -> expert mask -> top-k (runtime k) -> optional renormalise.

Shapes: T tokens, E routed experts, K active top-k (0 <= K <= k_max), k_max buffer width.

    p[t, :] = softmax(float32(router_logits[t, :]))                  over all E experts
    reroute: a masked expert cannot be chosen; the next-best takes its slot
    zero:    experts are chosen as usual; a masked one keeps its slot with weight 0
    force:   the forced expert takes slot 0 (with its own probability); the rest by rank
    slots:   weight descending, ties -> lower expert id; slots j >= K hold id -1, weight 0
    renormalise: w /= sum(w) over the kept slots when the sum is > 0

Weights are raw softmax probabilities (the model's `norm_topk_prob = false`) unless
renormalised. Non-finite logits: NaN counts as -inf; +inf experts share the mass equally; a row
with no finite mass gets all-zero probabilities and the lowest ids (never a duplicate id).

Kernels: csrc/cuda/route.cu (cuda, emu), csrc/cpu/route.cpp (cpu).
Tests: tests/test_ops.py.
"""
from __future__ import annotations

import torch

from . import backend as backends

MASK_MODES = ("reroute", "zero")


def _softmax_safe(logits: torch.Tensor) -> torch.Tensor:
    # nan_to_num alone would also turn +-inf into +-FLT_MAX (a -inf row would become uniform).
    x = torch.nan_to_num(logits.float(), nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    posinf = torch.isposinf(x)
    row_has_inf = posinf.any(-1, keepdim=True)
    p = torch.softmax(x, dim=-1)
    p = torch.where(row_has_inf, posinf.float() / posinf.sum(-1, keepdim=True).clamp_min(1), p)
    return torch.nan_to_num(p, nan=0.0)  # rows of only -inf


def route_ref(router_logits: torch.Tensor, k: int, *, k_max: int | None = None,
              expert_mask: torch.Tensor | None = None, mask_mode: str = "reroute",
              force_expert: int = -1, renormalize: bool = False):
    """PyTorch reference. Returns (topk_ids int32 [T, k_max], topk_weights fp32 [T, k_max],
    router_probs fp32 [T, E])."""
    T, E = router_logits.shape
    k_max = k if k_max is None else k_max
    probs = _softmax_safe(router_logits)
    score = probs.clone()
    if expert_mask is not None and mask_mode == "reroute":
        score[:, expert_mask.bool()] = -1.0
    if force_expert >= 0:
        score[:, force_expert] = 2.0
    # A stable sort of -score keeps equal scores in ascending expert id: tie -> lower id.
    order = torch.sort(-score, dim=-1, stable=True).indices[:, :k]
    weights = probs.gather(1, order)
    if expert_mask is not None and mask_mode == "zero":
        weights = torch.where(expert_mask.bool()[order], torch.zeros_like(weights), weights)
    if renormalize and k > 0:
        s = weights.sum(-1, keepdim=True)
        weights = torch.where(s > 0, weights / torch.where(s > 0, s, 1), weights)
    ids = torch.full((T, k_max), -1, dtype=torch.int32, device=router_logits.device)
    w = torch.zeros((T, k_max), dtype=torch.float32, device=router_logits.device)
    ids[:, :k] = order.int()
    w[:, :k] = weights
    return ids, w, probs


def validate(k: int, E: int, k_max: int, expert_mask: torch.Tensor | None, mask_mode: str,
             force_expert: int, where: str = "") -> None:
    """Check one layer's routing controls; messages name the value and what was expected."""
    at = f" (layer {where})" if where != "" else ""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"topk{at} must be an int, got {type(k).__name__}")
    if not 0 <= k <= E:
        raise ValueError(f"topk{at} = {k} is out of range; expected 0 <= topk <= {E} (routed experts)")
    if k > k_max:
        raise ValueError(f"topk{at} = {k} exceeds the buffer width k_max = {k_max}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode = {mask_mode!r}; expected one of {MASK_MODES}")
    if not -1 <= force_expert < E:
        raise ValueError(f"force_expert{at} = {force_expert}; expected -1 (none) or 0..{E - 1}")
    if expert_mask is not None:
        n_masked = int(expert_mask.sum())
        if n_masked == E:
            raise ValueError(f"expert_mask{at} removes every one of the {E} experts")
        if mask_mode == "reroute" and k > E - n_masked:
            raise ValueError(
                f"topk{at} = {k} but expert_mask leaves only {E - n_masked} experts to reroute to")
        if force_expert >= 0 and bool(expert_mask[force_expert]):
            raise ValueError(f"force_expert{at} = {force_expert} is also masked out")
    if force_expert >= 0 and k == 0:
        raise ValueError(f"force_expert{at} = {force_expert} needs topk >= 1, got topk = 0")


def route(router_logits: torch.Tensor, k: int, *, k_max: int | None = None,
          expert_mask: torch.Tensor | None = None, mask_mode: str = "reroute",
          force_expert: int = -1, renormalize: bool = False, backend: str = "auto",
          want_probs: bool = False, usage_counts: torch.Tensor | None = None,
          controls: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None):
    """Checked dispatcher. Returns (topk_ids, topk_weights, router_probs or None).

    `controls` = (k [1] int32, mask [E] uint8 or None, force [1] int32) already on the device;
    the model passes them so no per-call host-to-device copy is needed. `usage_counts` [E]
    int32 is incremented by the chosen slots when given.
    """
    backends.check(router_logits, "router_logits", dtype=(torch.float32, torch.bfloat16), contiguous=False)
    if router_logits.dim() != 2 or router_logits.stride(1) != 1:
        raise ValueError(f"router_logits must be [T, E] with unit stride along E, got shape "
                         f"{list(router_logits.shape)} strides {router_logits.stride()}")
    T, E = router_logits.shape
    k_max = k if k_max is None else k_max
    dev = router_logits.device
    if controls is None:
        validate(k, E, k_max, expert_mask, mask_mode, force_expert)
    elif not 0 <= k <= min(E, k_max):
        raise ValueError(f"topk = {k} is out of range; expected 0 <= topk <= {min(E, k_max)}")
    if expert_mask is not None:
        backends.check(expert_mask, "expert_mask", shape=(E,), device=dev)
    backends.check(usage_counts, "usage_counts", dtype=torch.int32, shape=(E,), device=dev, optional=True)
    be = backends.resolve(backend, dev)
    if be == "torch":
        ids, w, probs = route_ref(router_logits, k, k_max=k_max, expert_mask=expert_mask,
                                  mask_mode=mask_mode, force_expert=force_expert,
                                  renormalize=renormalize)
        if usage_counts is not None:
            valid = ids[ids >= 0].long()
            usage_counts += torch.bincount(valid, minlength=E).to(torch.int32)
        return ids, w, (probs if want_probs else None)

    mod = backends.native_module(be)
    if controls is None:
        k_t = torch.tensor([k], dtype=torch.int32, device=dev)
        mask_t = None if expert_mask is None else expert_mask.to(torch.uint8).contiguous()
        force_t = torch.tensor([force_expert], dtype=torch.int32, device=dev)
    else:
        k_t, mask_t, force_t = controls
        backends.check_same_device(dev, k=k_t, expert_mask=mask_t, force_expert=force_t)
    ids = torch.empty((T, k_max), dtype=torch.int32, device=dev)
    w = torch.empty((T, k_max), dtype=torch.float32, device=dev)
    probs = torch.empty((T, E), dtype=torch.float32, device=dev) if want_probs else None
    p = mod.RouteParams()
    p.router_logits = backends.ptr(router_logits)
    p.logits_dtype = backends.native_dtype(mod, router_logits.dtype)
    p.logits_stride = router_logits.stride(0)
    p.T, p.E, p.k_max = T, E, k_max
    p.k = backends.ptr(k_t)
    p.expert_mask = backends.ptr(mask_t)
    p.mask_mode = getattr(mod.MaskMode, mask_mode)
    p.force_expert = backends.ptr(force_t)
    p.renormalize = bool(renormalize)
    p.topk_ids, p.topk_weights = backends.ptr(ids), backends.ptr(w)
    p.router_probs = backends.ptr(probs)
    p.usage_counts = backends.ptr(usage_counts)
    if T > 0:
        if be == "cpu":
            mod.route_cpu(p)
        else:
            mod.route_cuda(p, backends.stream_of(be, dev), backends.device_of(be, dev))
    return ids, w, probs
