"""Attribution of a model output to each routed expert's output, per (MoE layer, token, slot).

    att = lens.attribute_experts(model, ids, target=token_id)            # gradient x activation
    att = lens.attribute_experts(model, ids, target="loss", method="ablation")
    att.scores[i]      # [N, K] for MoE layer att.layers[i]; att.ids / att.weights alike
    att.per_expert()   # [len(layers), E] summed over tokens

The target is a scalar function of the float32 logits [B, Q, V]: an int t means the logit of
token t at each sequence's last position (summed over sequences), "loss" the mean next-token
NLL, or any callable(logits) -> scalar tensor.

method="grad": one forward pass with forward(grad=True) on the torch backend (the kernels have
no backward), a function hook making each hook_expert_out a leaf; score = sum_D dF/dE * E, the
first-order effect of removing the expert's weighted contribution w E (dF/dE = w dF/d(wE)).
method="ablation": one forward pass per (layer, token, slot), on the model's own backend, with a
hook scaling that one expert output by `scale`; score = (F(model) - F(ablated)) / (1 - scale).
scale = 0 is plain zero-ablation; scale -> 1 tends to the gradient score (the cross-check in the
tests). Cost: (MoE layers x tokens x k) forward passes, so restrict `layers` on big inputs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..model import Model
from ..taps import Capture, Patch, TapRequest

METHODS = ("grad", "ablation")


@dataclass
class ExpertAttribution:
    method: str
    layers: list[int]                 # MoE layers, in the order of the lists below
    ids: list[torch.Tensor]           # [N, K] int expert ids per layer (rank order)
    weights: list[torch.Tensor]       # [N, K] float32 routing weights per layer
    scores: list[torch.Tensor]        # [N, K] float32 attribution per layer
    rows: torch.Tensor                # [N, 3] (sequence, position, step) of each token
    target: float                     # F on the unmodified model

    def per_expert(self, num_experts: int | None = None) -> torch.Tensor:
        """[len(layers), E] scores summed over tokens per expert id."""
        E = num_experts or (max((int(i.max()) for i in self.ids if i.numel()), default=-1) + 1)
        out = torch.zeros((len(self.layers), E), dtype=torch.float32)
        for i, (ids, s) in enumerate(zip(self.ids, self.scores)):
            out[i].index_add_(0, ids.reshape(-1).long().cpu(), s.reshape(-1).float().cpu())
        return out


def _target_fn(target, input_ids: torch.Tensor, attention_mask) -> Callable:
    if callable(target):
        return target
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise TypeError(f"target must be a token id, 'loss' or a callable, got {target!r}")
    if isinstance(target, int):
        if target < 0:
            raise ValueError(f"target token id {target} is negative")
        return lambda logits: logits[:, -1, target].sum()
    if target != "loss":
        raise ValueError(f"target = {target!r}; expected a token id, 'loss' or a callable")
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    mask = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.bool().reshape(ids.shape))

    def loss(logits):
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1).to(lp.device)).squeeze(-1)
        m = (mask[:, 1:] & mask[:, :-1]).to(nll.device)
        return (nll * m).sum() / m.sum().clamp_min(1)
    return loss


def attribute_experts(model: Model, input_ids, *, target, method: str = "grad",
                      layers: Sequence[int] | None = None, scale: float = 0.0,
                      attention_mask: torch.Tensor | None = None,
                      **intervention_kwargs) -> ExpertAttribution:
    if method not in METHODS:
        raise ValueError(f"method = {method!r}; expected one of {METHODS}")
    if not 0.0 <= scale < 1.0:
        raise ValueError(f"scale = {scale}; expected 0 <= scale < 1")
    moe = list(model.config.moe_layers)
    layers = moe if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if l not in moe]
    if bad:
        raise ValueError(f"layers {bad} are not MoE layers; expected some of {moe}")
    ids = torch.as_tensor(input_ids, device=model.device)
    F = _target_fn(target, ids, attention_mask)
    routing = [f"blocks.{l}.moe.{t}" for l in layers for t in ("hook_topk_ids", "hook_topk_weights")]
    kw = dict(attention_mask=attention_mask, **intervention_kwargs)

    if method == "grad":
        leaves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def make_leaf(x, ctx):
            # E + delta with delta = 0 a leaf: delta's gradient is the total derivative of F by
            # E, including the paths through later layers' experts (a detached E would cut them)
            delta = torch.zeros(x.shape, dtype=torch.float32, device=x.device, requires_grad=True)
            leaves[ctx.name] = (x.detach().float(), delta)
            return x.float() + delta

        patches = [Patch(f"blocks.{l}.moe.hook_expert_out", make_leaf) for l in layers]
        cap = Capture(TapRequest(routing), patches=patches)
        logits = model.forward(ids, capture=cap, grad=True, backend="torch", **kw)
        value = F(logits)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("the target must give a scalar tensor")
        value.backward()
        scores = []
        for l in layers:
            v, delta = leaves[f"blocks.{l}.moe.hook_expert_out"]
            g = torch.zeros_like(v) if delta.grad is None else delta.grad
            scores.append((g * v).sum(-1))
        base = float(value.detach())
    else:
        cap = Capture(TapRequest(routing))
        with torch.no_grad():
            base = float(F(model.forward(ids, capture=cap, **kw)))
            scores = []
            for l in layers:
                N, K = cap[f"blocks.{l}.moe.hook_topk_ids"].shape
                s = torch.zeros((N, K), dtype=torch.float32)
                for r in range(N):
                    for j in range(K):
                        def scaled(x, ctx, r=r, j=j):
                            x = x.clone()
                            x[r, j] *= scale
                            return x
                        c = Capture(patches=[Patch(f"blocks.{l}.moe.hook_expert_out", scaled)])
                        s[r, j] = (base - float(F(model.forward(ids, capture=c, **kw)))) / (1 - scale)
                scores.append(s)
    first = f"blocks.{layers[0]}.moe.hook_topk_ids" if layers else None
    return ExpertAttribution(
        method, layers,
        [cap[f"blocks.{l}.moe.hook_topk_ids"].cpu() for l in layers],
        [cap[f"blocks.{l}.moe.hook_topk_weights"].detach().float().cpu() for l in layers],
        [s.float().cpu() for s in scores],
        cap.rows(first).cpu() if first else torch.zeros((0, 3), dtype=torch.int64), base)
