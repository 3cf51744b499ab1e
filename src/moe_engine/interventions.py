"""Interventions are data, not code (docs/design.md §5).

Per call: `topk` (int, or one per layer; 0 <= k <= E; 0 = shared experts only), `expert_mask`
(bool [L, E], bool [E] for every MoE layer, or {layer: [expert ids]}) with `mask_mode`
"reroute" (a masked expert cannot be chosen; the next-best takes its slot) or "zero" (chosen as
usual, contribution removed), `force_experts` (int or {layer: id}: that expert takes slot 0),
`renormalize` (None = the model's own `norm_topk_prob`).

Per position or per token: `expert_mask` bool [L, P, E] (row p applies to the token at position
p of every sequence, prompt and generated alike; a call reaching position >= P is refused) or
[L, B, Q, E] (one row per entry of forward's input_ids [B, Q]); `force_experts` int [L, P] or
[L, B, Q] (-1 = none). A row that leaves no expert is refused, naming the layer and the row.

`Interventions.resolve` validates everything on the host once per call and produces the small
device tensors the kernels read (k [L], mask [L, E] or [L, R, E], force [L, 1] or [L, R]), so
changing them never recompiles, reloads or breaks a captured graph.

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
    force_experts: int | Mapping[int, int] | torch.Tensor | None = None
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
        force = _force(self.force_experts, L)                      # [L, *S] int64, host
        mask = _mask(self.expert_mask, L, E)                       # [L, E] or [L, *S, E] bool, host
        rows, shape = _rows(mask, force)
        renorm = config.norm_topk_prob if self.renormalize is None else bool(self.renormalize)
        layers = config.moe_layers
        # A dense layer has no router: an intervention that names one would silently do nothing.
        dense = [l for l in range(L) if l not in set(layers)]
        if mask is not None and isinstance(self.expert_mask, torch.Tensor) and self.expert_mask.shape == (E,):
            mask[dense] = False  # a [E] mask means "every MoE layer"
        if not isinstance(self.force_experts, torch.Tensor):
            force[dense] = -1    # an int means "every MoE layer"; a dict naming a dense layer is refused below
        for name, value in (("topk", self.topk), ("force_experts", self.force_experts),
                            ("expert_mask", self.expert_mask if isinstance(self.expert_mask, Mapping) else None)):
            if isinstance(value, Mapping):
                named = [l for l in value if l in dense]
                if named:
                    raise ValueError(f"{name}: layer {named[0]} is a dense layer (no router; MoE layers are "
                                     f"{list(layers)})")
        for name, t, none in (("expert_mask", mask, False), ("force_experts", force, -1)):
            if t is not None and dense and bool((t[dense] != none).any()):
                l = next(l for l in dense if bool((t[l] != none).any()))
                raise ValueError(f"{name}: layer {l} is a dense layer (no router; MoE layers are "
                                 f"{list(layers)}): it must not mask or force anything there")
        row_name = _row_namer(rows, shape)
        for l in layers:
            validate(k[l], E, E, None if mask is None else mask[l].reshape(-1, E), self.mask_mode,
                     force[l].reshape(-1), where=l, row_name=row_name)
        k_max = max([k[l] for l in layers] + [1])
        return Routing(
            k=tuple(k), mask_mode=self.mask_mode, renormalize=renorm, k_max=k_max, rows=rows, shape=shape,
            k_dev=torch.tensor(k, dtype=torch.int32, device=device).view(L, 1),
            force=force.reshape(L, -1).to(device=device, dtype=torch.int32).contiguous(),
            mask=None if mask is None else (mask if mask.dim() == 2 else mask.reshape(L, -1, E)).to(device).contiguous(),
            masked_layers=frozenset() if mask is None else frozenset(l for l in layers if bool(mask[l].any())),
        )


@dataclass(frozen=True)
class Routing:
    """Resolved, validated routing controls for one call: each control once, on the device.

    rows says what the control rows index: "call" (mask [L, E], force [L, 1]: every token),
    "position" (row p = the token at position p of every sequence; shape (P,)), "token" (row
    b*Q + t = input_ids[b, t] of the call; shape (B, Q)), "tokens" (row i = the i-th routed
    token of this call: what `for_tokens` makes of the two before, shape (N,)). mask is [L, E]
    when only force has rows."""
    k: tuple[int, ...]
    mask_mode: str
    renormalize: bool
    k_max: int
    k_dev: torch.Tensor                # [L, 1] int32
    force: torch.Tensor                # [L, 1] or [L, R] int32, -1 = none
    mask: torch.Tensor | None          # [L, E] or [L, R, E] bool (True = masked out)
    masked_layers: frozenset = frozenset()  # layers whose mask has a True somewhere
    rows: str = "call"
    shape: tuple = ()

    def for_tokens(self, positions: torch.Tensor, flat_index: torch.Tensor, B: int, Q: int) -> "Routing":
        """The controls of the N routed tokens of a forward call, one row each: positions [N]
        (each token's position in its sequence), flat_index [N] (its index b*Q + t in input_ids
        [B, Q]). A "call" routing is returned as it is (its rows broadcast)."""
        if self.rows in ("call", "tokens"):
            return self
        if self.rows == "position":
            P = self.shape[0]
            last = int(positions.max()) if positions.numel() else -1
            if last >= P:
                raise ValueError(f"per-position interventions cover positions 0..{P - 1}, but this call "
                                 f"routes a token at position {last}")
            index = positions
        else:
            if (B, Q) != tuple(self.shape):
                raise ValueError(f"per-token interventions have shape [B={self.shape[0]}, Q={self.shape[1]}] "
                                 f"(one row per input_ids entry), but input_ids is [{B}, {Q}]")
            index = flat_index
        index = index.to(self.k_dev.device)
        force = self.force if self.force.shape[1] == 1 else self.force.index_select(1, index)
        mask = self.mask if self.mask is None or self.mask.dim() == 2 else self.mask.index_select(1, index)
        return replace(self, force=force, mask=mask, rows="tokens", shape=(int(index.numel()),))

    def controls(self, l: int):
        """(k [1], mask [E] / [N, E] or None, force [1] / [N]) of layer l, as route reads them."""
        if self.rows not in ("call", "tokens"):
            raise RuntimeError(f"per-{self.rows} routing: call for_tokens(...) for this call's tokens first")
        mask = self.mask[l] if self.mask is not None and l in self.masked_layers else None
        return self.k_dev[l], mask, self.force[l]
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
        if value.dim() not in (2, 3, 4) or value.shape[0] != L or value.shape[-1] != E:
            raise ValueError(f"expert_mask has shape {list(value.shape)}; expected [{E}], [{L}, {E}], "
                             f"[{L}, P, {E}] (per position) or [{L}, B, Q, {E}] (per token)")
        return value.cpu().clone()
    raise TypeError(f"expert_mask must be a bool tensor or a {{layer: [ids]}} dict, got {type(value).__name__}")


def _force(value, L: int) -> torch.Tensor:
    """force_experts -> int64 [L] (one id per layer) or [L, P] / [L, B, Q] (per position / token)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"force_experts has dtype {value.dtype}; expected an integer dtype (-1 = none)")
        if value.dim() not in (2, 3) or value.shape[0] != L:
            raise ValueError(f"force_experts has shape {list(value.shape)}; expected [{L}, P] (per position) "
                             f"or [{L}, B, Q] (per token)")
        return value.cpu().long().clone()
    return torch.tensor(_per_layer(value, L, -1, "force_experts"), dtype=torch.long)


def _rows(mask: torch.Tensor | None, force: torch.Tensor) -> tuple[str, tuple]:
    """What the control rows index ("call", "position", "token") and their shape; mask and force
    must agree when both have rows."""
    m = () if mask is None or mask.dim() == 2 else tuple(mask.shape[1:-1])
    f = tuple(force.shape[1:])
    if m and f and m != f:
        raise ValueError(f"expert_mask rows {list(m)} and force_experts rows {list(f)} disagree; "
                         f"expected the same positions (or tokens)")
    shape = m or f
    return {0: "call", 1: "position", 2: "token"}[len(shape)], shape


def _row_namer(rows: str, shape: tuple):
    if rows == "position":
        return lambda r: f"position {r}"
    if rows == "token":
        return lambda r: f"token (sequence {r // shape[1]}, column {r % shape[1]})"
    return None
