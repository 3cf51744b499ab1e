"""route: router logits -> fp32 softmax -> expert mask -> top-k (runtime k) -> optional renormalise.

Shapes: T tokens, E routed experts, K active top-k (0 <= K <= k_max), k_max buffer width.

    p[t, :] = softmax(float32(router_logits[t, :]))                  over all E experts
    mask:    one [E] row for every token, or a [T, E] row per token (per-token / per-position
             interventions); likewise the forced expert: one id, or one per token
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
              force_expert: int | torch.Tensor = -1, renormalize: bool = False):
    """PyTorch reference. expert_mask: [E] (every token) or [T, E] (one row per token), nonzero =
    masked; force_expert: an int, or an int tensor [1] (every token) or [T] (one per token).
    Returns (topk_ids int32 [T, k_max], topk_weights fp32 [T, k_max], router_probs fp32 [T, E])."""
    T, E = router_logits.shape
    dev = router_logits.device
    k_max = k if k_max is None else k_max
    probs = _softmax_safe(router_logits)
    score = probs.clone()
    mask = None if expert_mask is None else expert_mask.to(dev).bool().expand(T, E)
    if mask is not None and mask_mode == "reroute":
        score = torch.where(mask, torch.full_like(score, -1.0), score)
    force = torch.as_tensor(force_expert, device=dev).long().reshape(-1).expand(T)
    forced = (torch.arange(E, device=dev) == force.clamp_min(0).unsqueeze(1)) & (force >= 0).unsqueeze(1)
    score = torch.where(forced, torch.full_like(score, 2.0), score)
    # A stable sort of -score keeps equal scores in ascending expert id: tie -> lower id.
    order = torch.sort(-score, dim=-1, stable=True).indices[:, :k]
    weights = probs.gather(1, order)
    if mask is not None and mask_mode == "zero":
        weights = torch.where(mask.gather(1, order), torch.zeros_like(weights), weights)
    if renormalize and k > 0:
        s = weights.sum(-1, keepdim=True)
        weights = torch.where(s > 0, weights / torch.where(s > 0, s, 1), weights)
    ids = torch.full((T, k_max), -1, dtype=torch.int32, device=dev)
    w = torch.zeros((T, k_max), dtype=torch.float32, device=dev)
    ids[:, :k] = order.int()
    w[:, :k] = weights
    return ids, w, probs


def validate(k: int, E: int, k_max: int, expert_mask: torch.Tensor | None, mask_mode: str,
             force_expert: int | torch.Tensor, where: str = "", row_name=None) -> None:
    """Check one layer's routing controls; messages name the value and what was expected.
    expert_mask [E] or [R, E] and force_expert an int or [R] (R rows: per token or per position);
    row_name(r) says in words which row r is (e.g. "position 5"), so an error names the row."""
    at = f" (layer {where})" if where != "" else ""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"topk{at} must be an int, got {type(k).__name__}")
    if not 0 <= k <= E:
        raise ValueError(f"topk{at} = {k} is out of range; expected 0 <= topk <= {E} (routed experts)")
    if k > k_max:
        raise ValueError(f"topk{at} = {k} exceeds the buffer width k_max = {k_max}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode = {mask_mode!r}; expected one of {MASK_MODES}")
    force = torch.as_tensor(force_expert).cpu().long().reshape(-1)
    mask = None if expert_mask is None else expert_mask.cpu().bool().reshape(-1, E)
    per_row = force.numel() > 1 or (mask is not None and mask.shape[0] > 1)

    def row(r: int) -> str:
        return "" if not per_row else f" at {row_name(r) if row_name is not None else f'row {r}'}"

    bad = ((force < -1) | (force >= E)).nonzero()
    if bad.numel():
        r = int(bad[0])
        raise ValueError(f"force_expert{at}{row(r)} = {int(force[r])}; expected -1 (none) or 0..{E - 1}")
    if k == 0 and bool((force >= 0).any()):
        r = int((force >= 0).nonzero()[0])
        raise ValueError(f"force_expert{at}{row(r)} = {int(force[r])} needs topk >= 1, got topk = 0")
    if mask is None:
        return
    R = max(mask.shape[0], force.numel())
    if mask.shape[0] not in (1, R) or force.numel() not in (1, R):
        raise ValueError(f"expert_mask{at} has {mask.shape[0]} rows but force_expert has {force.numel()}; "
                         f"expected equal counts or 1 (every row)")
    left = E - mask.sum(1)                                      # [R or 1] experts not masked
    if bool((left == 0).any()):
        r = int((left == 0).nonzero()[0])
        raise ValueError(f"expert_mask{at}{row(r)} removes every one of the {E} experts")
    if mask_mode == "reroute" and bool((left < k).any()):
        r = int((left < k).nonzero()[0])
        raise ValueError(f"topk{at} = {k} but expert_mask{row(r)} leaves only {int(left[r])} experts to reroute to")
    fr = force.expand(R)
    clash = (fr >= 0) & mask.expand(R, E).gather(1, fr.clamp_min(0).unsqueeze(1)).squeeze(1)
    if bool(clash.any()):
        r = int(clash.nonzero()[0])
        raise ValueError(f"force_expert{at}{row(r)} = {int(fr[r])} is also masked out")


def control_strides(mask: torch.Tensor | None, force: torch.Tensor, T: int, E: int) -> tuple[int, int]:
    """(mask_stride, force_stride) the kernels read the control rows with (csrc/ops.h,
    RouteParams): 0 broadcasts one [E] row / one id to every token, else one row per token."""
    if force.dtype != torch.int32 or force.dim() != 1 or force.numel() not in (1, T) or not force.is_contiguous():
        raise ValueError(f"force_expert control must be contiguous int32 [1] or [T={T}], got {force.dtype} "
                         f"{list(force.shape)}")
    force_stride = 0 if force.numel() == 1 else 1
    if mask is None:
        return 0, force_stride
    if mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"expert_mask has dtype {mask.dtype}; expected torch.bool or torch.uint8 (nonzero = masked)")
    if mask.shape == (E,) and mask.stride(0) == 1:
        return 0, force_stride
    if mask.shape == (T, E) and mask.stride(1) == 1 and (T == 1 or mask.stride(0) >= E):
        return (mask.stride(0) if T > 1 else E), force_stride
    raise ValueError(f"expert_mask must be [E={E}] or [T={T}, E={E}] with unit stride along E, got shape "
                     f"{list(mask.shape)} strides {mask.stride()}")


def route(router_logits: torch.Tensor, k: int, *, k_max: int | None = None,
          expert_mask: torch.Tensor | None = None, mask_mode: str = "reroute",
          force_expert: int | torch.Tensor = -1, renormalize: bool = False, backend: str = "auto",
          want_probs: bool = False, usage_counts: torch.Tensor | None = None,
          controls: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None):
    """Checked dispatcher. Returns (topk_ids, topk_weights, router_probs or None).

    expert_mask: bool/uint8 [E] (every token) or [T, E] (per token); force_expert: an int or an
    int tensor [T] (per token; -1 = none). `controls` = (k [1] int32, mask [E] or [T, E] bool/uint8
    or None, force [1] or [T] int32), already on the device and validated (Interventions.resolve):
    the model passes them instead of expert_mask/force_expert so no per-call host-to-device copy
    or host check is needed. `usage_counts` [E] int32 is incremented by the chosen slots when given.
    """
    backends.check(router_logits, "router_logits", dtype=(torch.float32, torch.bfloat16), contiguous=False)
    if router_logits.dim() != 2 or router_logits.stride(1) != 1:
        raise ValueError(f"router_logits must be [T, E] with unit stride along E, got shape "
                         f"{list(router_logits.shape)} strides {router_logits.stride()}")
    T, E = router_logits.shape
    k_max = k if k_max is None else k_max
    dev = router_logits.device
    if controls is None:
        if expert_mask is not None and (expert_mask.shape not in ((E,), (T, E))):
            raise ValueError(f"expert_mask has shape {list(expert_mask.shape)}; expected [E={E}] or [T={T}, E={E}]")
        if isinstance(force_expert, torch.Tensor) and force_expert.shape not in ((1,), (T,)):
            raise ValueError(f"force_expert has shape {list(force_expert.shape)}; expected an int, [1] or [T={T}]")
        validate(k, E, k_max, expert_mask, mask_mode, force_expert, row_name=lambda r: f"token {r}")
        if expert_mask is not None:
            backends.check(expert_mask, "expert_mask", device=dev, contiguous=False)
        k_t = torch.tensor([k], dtype=torch.int32, device=dev)
        mask_t = None if expert_mask is None else expert_mask.to(torch.uint8).contiguous()
        force_t = torch.as_tensor(force_expert, dtype=torch.int32, device=dev).reshape(-1).contiguous()
    else:
        if not 0 <= k <= min(E, k_max):
            raise ValueError(f"topk = {k} is out of range; expected 0 <= topk <= {min(E, k_max)}")
        k_t, mask_t, force_t = controls
        backends.check_same_device(dev, k=k_t, expert_mask=mask_t, force_expert=force_t)
    mask_stride, force_stride = control_strides(mask_t, force_t, T, E)
    backends.check(usage_counts, "usage_counts", dtype=torch.int32, shape=(E,), device=dev, optional=True)
    be = backends.resolve(backend, dev)
    if be == "torch":
        ids, w, probs = route_ref(router_logits, k, k_max=k_max, expert_mask=mask_t, mask_mode=mask_mode,
                                  force_expert=force_t, renormalize=renormalize)
        if usage_counts is not None:
            valid = ids[ids >= 0].long()
            usage_counts += torch.bincount(valid, minlength=E).to(torch.int32)
        return ids, w, (probs if want_probs else None)

    mod = backends.native_module(be)
    ids = torch.empty((T, k_max), dtype=torch.int32, device=dev)
    w = torch.empty((T, k_max), dtype=torch.float32, device=dev)
    probs = torch.empty((T, E), dtype=torch.float32, device=dev) if want_probs else None
    p = mod.RouteParams()
    p.router_logits = backends.ptr(router_logits)
    p.logits_dtype = backends.native_dtype(mod, router_logits.dtype)
    p.logits_stride = router_logits.stride(0)
    p.T, p.E, p.k_max = T, E, k_max
    p.k = backends.ptr(k_t)
    p.expert_mask, p.mask_stride = backends.ptr(mask_t), mask_stride
    p.mask_mode = getattr(mod.MaskMode, mask_mode)
    p.force_expert, p.force_stride = backends.ptr(force_t), force_stride
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
