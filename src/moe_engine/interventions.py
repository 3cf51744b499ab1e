"""Interventions are data, not code (docs/design.md §5).

Per call: `topk` (int, or one per layer; 0 <= k <= E; 0 = shared experts only), `expert_mask`
(bool [L, E], bool [E] for every MoE layer, or {layer: [expert ids]}) with `mask_mode`
"reroute" (a masked expert cannot be chosen; the next-best takes its slot) or "zero" (chosen as
usual, contribution removed), `force_experts` (int or {layer: id}: that expert takes slot 0),
`renormalize` (None = the model's own `norm_topk_prob`).

`Interventions.resolve` validates everything on the host once per call and produces the small
device tensors the kernels read (k [L], mask [L, E], force [L]), so changing them never
recompiles, reloads or breaks a captured graph.

`intervene(...)` is a context manager (a contextvars.ContextVar, so it is per thread and per
asyncio task, never process-global) that supplies interventions to the calls inside it that name
none. Nested blocks merge field by field, the inner one winning; keyword arguments of a call
override the block field by field; an explicit `interventions=` object replaces it entirely.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace

import torch

from .config import ModelConfig
from .ops.route import MASK_MODES, validate


@dataclass(frozen=True)
class Interventions:
    topk: int | Sequence[int | None] | Mapping[int, int] | None = None
    expert_mask: torch.Tensor | Mapping[int, Sequence[int]] | None = None
    mask_mode: str = "reroute"
    force_experts: int | Mapping[int, int] | None = None
    renormalize: bool | None = None

    def resolve(self, config: ModelConfig, device: torch.device) -> "Routing":
        L, E = config.num_hidden_layers, config.n_routed_experts
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode = {self.mask_mode!r}; expected one of {MASK_MODES}")
        if not isinstance(self.mask_mode, str):
            raise TypeError(f"mask_mode must be a str, got {type(self.mask_mode).__name__}")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise TypeError(f"renormalize must be True, False or None, got {self.renormalize!r}")
        k = _per_layer(self.topk, L, config.num_experts_per_tok, "topk")
        force = _per_layer(self.force_experts, L, -1, "force_experts")
        mask = _mask(self.expert_mask, L, E)
        renorm = config.norm_topk_prob if self.renormalize is None else bool(self.renormalize)
        layers = config.moe_layers
        # A dense layer has no router: an intervention that names one would silently do nothing.
        dense = [l for l in range(L) if l not in set(layers)]
        if mask is not None and isinstance(self.expert_mask, torch.Tensor) and self.expert_mask.shape == (E,):
            mask[dense] = False  # a [E] mask means "every MoE layer"
        for name, value in (("topk", self.topk), ("force_experts", self.force_experts),
                            ("expert_mask", self.expert_mask if isinstance(self.expert_mask, Mapping) else None)):
            if isinstance(value, Mapping):
                named = [l for l in value if l in dense]
                if named:
                    raise ValueError(f"{name}: layer {named[0]} is a dense layer (no router; MoE layers are "
                                     f"{list(layers)})")
        if mask is not None and dense and bool(mask[dense].any()):
            raise ValueError(f"expert_mask: layer {next(l for l in dense if bool(mask[l].any()))} is a dense "
                             f"layer (no router; MoE layers are {list(layers)}): its row must be all False")
        for l in layers:
            validate(k[l], E, E, None if mask is None else mask[l], self.mask_mode, force[l], where=l)
        k_max = max([k[l] for l in layers] + [1])
        return Routing(
            k=tuple(k), force=tuple(force), mask=mask, mask_mode=self.mask_mode, renormalize=renorm,
            k_max=k_max,
            k_dev=torch.tensor(k, dtype=torch.int32, device=device).view(L, 1),
            force_dev=torch.tensor(force, dtype=torch.int32, device=device).view(L, 1),
            mask_dev=None if mask is None else mask.to(device=device, dtype=torch.uint8).contiguous(),
            mask_bool=None if mask is None else mask.to(device),
            masked=tuple(False if mask is None else bool(mask[l].any()) for l in range(L)),
        )


@dataclass(frozen=True)
class Routing:
    """Resolved, validated routing controls for one call (host copies + device tensors)."""
    k: tuple[int, ...]
    force: tuple[int, ...]
    mask: torch.Tensor | None          # [L, E] bool, host
    mask_mode: str
    renormalize: bool
    k_max: int
    k_dev: torch.Tensor                # [L, 1] int32
    force_dev: torch.Tensor            # [L, 1] int32
    mask_dev: torch.Tensor | None      # [L, E] uint8
    mask_bool: torch.Tensor | None = field(default=None)  # [L, E] bool on the device
    # [L] whether layer l masks any expert: decided once here, so a step reads no tensor
    masked: tuple[bool, ...] = ()

    def layer_mask(self, l: int) -> torch.Tensor | None:
        if self.mask is None or not (self.masked[l] if self.masked else bool(self.mask[l].any())):
            return None
        return self.mask_bool[l]

    def controls(self, l: int):
        mask = None if self.layer_mask(l) is None else self.mask_dev[l]
        return self.k_dev[l], mask, self.force_dev[l]


_CURRENT: ContextVar[Interventions | None] = ContextVar("moe_engine_interventions", default=None)
_FIELDS = frozenset(f.name for f in fields(Interventions))


def _merged(base: Interventions | None, kwargs: Mapping) -> Interventions:
    unknown = set(kwargs) - _FIELDS
    if unknown:
        raise TypeError(f"unknown intervention(s) {sorted(unknown)}; expected some of {sorted(_FIELDS)}")
    return Interventions(**kwargs) if base is None else replace(base, **kwargs)


@contextmanager
def intervene(**kwargs) -> Iterator[Interventions]:
    """`with intervene(topk=1, expert_mask={3: [7]}): model.forward(ids)` -- applies to the calls
    in the block (this thread / task only) that pass no `interventions=`."""
    merged = _merged(_CURRENT.get(), kwargs)
    token = _CURRENT.set(merged)
    try:
        yield merged
    finally:
        _CURRENT.reset(token)


def for_call(interventions: Interventions | None, kwargs: Mapping) -> Interventions:
    """The interventions one call runs with: an explicit object, else the enclosing intervene()
    block (if any) overridden by the call's keyword arguments."""
    if interventions is not None:
        if kwargs:
            raise ValueError("pass interventions either as `interventions=` or as keywords, not both")
        return interventions
    current = _CURRENT.get()
    if not kwargs:
        return _NONE if current is None else current
    return _merged(current, kwargs)


_NONE = Interventions()  # what a call with no interventions runs with (frozen: safe to share)


def _per_layer(value, L: int, default: int, name: str) -> list[int]:
    if value is None:
        return [default] * L
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} = {value!r}; expected an int, a sequence of {L} ints or a {{layer: int}} dict")
    if isinstance(value, int):
        return [value] * L
    def one(v, where):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}{where} = {v!r} must be an int, got {type(v).__name__}")
        return v
    if isinstance(value, Mapping):
        out = [default] * L
        for l, v in value.items():
            if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < L:
                raise ValueError(f"{name}: layer {l!r} is out of range; expected 0..{L - 1}")
            out[l] = one(v, f"[{l}]")
        return out
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != L:
            raise ValueError(f"{name} has {len(value)} entries; expected one per layer ({L})")
        return [default if v is None else one(v, f"[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{name} must be an int, a sequence or a dict, got {type(value).__name__}")


def _mask(value, L: int, E: int) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        m = torch.zeros(L, E, dtype=torch.bool)
        for l, ids in value.items():
            if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < L:
                raise ValueError(f"expert_mask: layer {l!r} is out of range; expected 0..{L - 1}")
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
                raise TypeError(f"expert_mask[{l}] must be a list of expert ids, got {type(ids).__name__}")
            for e in ids:
                if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < E:
                    raise ValueError(f"expert_mask: expert id {e!r} in layer {l} is out of range; expected 0..{E - 1}")
                m[l, e] = True
        return m
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.bool:
            raise ValueError(f"expert_mask has dtype {value.dtype}; expected torch.bool (True = masked)")
        if value.shape == (E,):
            return value.cpu().expand(L, E).clone()
        if value.shape != (L, E):
            raise ValueError(f"expert_mask has shape {list(value.shape)}; expected [{L}, {E}] or [{E}]")
        return value.cpu().clone()
    raise TypeError(f"expert_mask must be a bool tensor or a {{layer: [ids]}} dict, got {type(value).__name__}")
