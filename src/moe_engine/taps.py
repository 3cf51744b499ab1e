"""Lens taps (docs/design.md §6): named points of the forward pass whose values a call can
capture (or patch) without touching model code.

Names follow TransformerLens:
    blocks.{l}.hook_resid_pre  hook_attn_out  hook_resid_mid  hook_mlp_out  hook_resid_post
    blocks.{l}.moe.hook_in (u)  hook_router_logits [N,E]  hook_router_probs [N,E]
                   hook_topk_ids [N,k]  hook_topk_weights [N,k]  hook_expert_out [N,k,D]
                   hook_routed_out [N,D]  hook_shared_out [N,D]
    hook_final_norm [N,D]   logits [N,V]
Dense layers have no `moe.*` taps. N counts the captured tokens: every tap is token-major, and
row i of every tap belongs to the token described by `Capture.rows[i]` = (sequence, position,
generation step; 0 = the prompt). Expert outputs are unweighted, slot order = rank.

Nothing is captured unless asked. A request names taps (fnmatch patterns), layers and
positions ("all", "last", a slice or a list of positions, or a bool [B, Q] mask). Selecting
rows is a device-side index_select; "all" and "last" have fixed sizes (no host
synchronisation), a slice, list or mask counts its rows with one nonzero() per call. Capturing never changes the
outputs (the values are copied, never written back), so logits are bit-identical.

Patches: `Patch(name, value, positions)` replaces a tap's value at the selected tokens before
the forward pass goes on (activation patching); `value` is [n, ...] for the n selected tokens,
or broadcastable to one row. `value` may also be a function hook `fn(x, ctx) -> tensor`: it gets
the selected rows x [n, ...] and a HookContext (tap name, layer, sequence / position of each
row, generation step) and returns their replacement, which covers zero, mean and resample
ablation and steering (`x + alpha * v`). The name of a function hook may be an fnmatch pattern
("blocks.*.hook_resid_post"). Patches run on every backend: a tap that is patched makes the
model take its op-by-op path, whose tensors the kernels then read.
"""
from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

LAYER_TAPS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
MOE_TAPS = ("hook_in", "hook_router_logits", "hook_router_probs", "hook_topk_ids",
            "hook_topk_weights", "hook_expert_out", "hook_routed_out", "hook_shared_out")
MODEL_TAPS = ("hook_final_norm", "logits")


def all_tap_names(num_layers: int, moe_layers: Iterable[int]) -> list[str]:
    moe = set(moe_layers)
    names = []
    for l in range(num_layers):
        names += [f"blocks.{l}.{t}" for t in LAYER_TAPS]
        if l in moe:
            names += [f"blocks.{l}.moe.{t}" for t in MOE_TAPS]
    return names + list(MODEL_TAPS)


Positions = str | slice | Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class TapRequest:
    names: Sequence[str] = ("*",)
    layers: str | Sequence[int] | slice = "all"
    positions: Positions = "all"

    def __post_init__(self):
        names = (self.names,) if isinstance(self.names, str) else self.names  # one pattern, not its letters
        if not isinstance(names, Iterable) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"TapRequest names must be tap names or patterns (str), got {self.names!r}")
        object.__setattr__(self, "names", tuple(names))
        _check_selector("layers", self.layers, ("all",))
        _check_selector("positions", self.positions, ("all", "last"))


def _check_selector(what: str, v, words: tuple[str, ...]) -> None:
    """layers / positions: one of `words`, a slice, a list of non-negative ints (or, for
    positions, a bool [B, Q] mask)."""
    if isinstance(v, str):
        if v not in words:
            raise ValueError(f"TapRequest {what} = {v!r}; expected {' or '.join(map(repr, words))}, a slice or a list")
    elif isinstance(v, torch.Tensor):
        if what != "positions" or v.dtype != torch.bool:
            raise TypeError(f"TapRequest {what}: a tensor must be a bool [B, Q] mask of positions, got {v.dtype}")
    elif isinstance(v, slice):
        for part in (v.start, v.stop, v.step):
            if part is not None and (isinstance(part, bool) or not isinstance(part, int)):
                raise TypeError(f"TapRequest {what} slice {v} must have int bounds")
    elif isinstance(v, Iterable) and not isinstance(v, (bytes, bytearray)):
        v = list(v)
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int) or x < 0]
        if bad:
            raise ValueError(f"TapRequest {what}: {bad[0]!r} is not a non-negative int")
    else:
        raise TypeError(f"TapRequest {what} = {v!r}; expected {' or '.join(map(repr, words))}, a slice or a list of ints")


@dataclass(frozen=True)
class HookContext:
    """What a function hook knows about the rows it is given (all [n] tensors on the device)."""
    name: str
    layer: int | None          # None for model-level taps (hook_final_norm, logits)
    seq: torch.Tensor          # sequence index of each row in this call's batch
    positions: torch.Tensor    # position of each row in its sequence
    step: int                  # generation step (0 = the prompt)
    rows: torch.Tensor         # index of each row among the call's N valid tokens


@dataclass(frozen=True)
class Patch:
    name: str
    value: torch.Tensor | Callable[[torch.Tensor, HookContext], torch.Tensor]
    positions: Positions = "all"

    def matches(self, name: str) -> bool:
        # an exact name, or (function hooks) an fnmatch pattern
        return self.name == name or (callable(self.value) and fnmatch.fnmatchcase(name, self.name))


_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _layer_selected(layers, l: int | None, num_layers: int) -> bool:
    if l is None or layers == "all":
        return True
    if isinstance(layers, slice):
        return l in range(num_layers)[layers]
    return l in set(layers)


def select_rows(positions: Positions, seq: torch.Tensor, pos: torch.Tensor, last: torch.Tensor,
                valid_index: torch.Tensor, n_last: int | None = None) -> torch.Tensor:
    """Indices (into the N valid tokens of this call) of the tokens `positions` selects.

    seq, pos, last: [N] sequence index, position and is-last-of-sequence flag of each valid token;
    valid_index: [N] flat index into the [B, Q] input of each valid token. n_last: how many
    tokens `last` flags (B: every sequence of a forward call ends in a real token), so "last" is
    selected with a fixed size and no host synchronisation; None counts them (one sync). The
    other selectors keep a data-dependent count (nonzero(): one sync per call and selector)."""
    dev = seq.device
    if isinstance(positions, str):
        if positions == "all":
            return torch.arange(seq.numel(), device=dev)
        if positions == "last":
            if n_last is not None:
                return torch.nonzero_static(last, size=n_last).squeeze(1)
            return last.nonzero().squeeze(1)
        raise ValueError(f"positions = {positions!r}; expected 'all', 'last', a slice, a list or a bool mask")
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        return positions.to(dev).reshape(-1)[valid_index].nonzero().squeeze(1)
    if isinstance(positions, slice):
        lo = 0 if positions.start is None else positions.start
        hi = 2**62 if positions.stop is None else positions.stop
        st = 1 if positions.step is None else positions.step
        if lo < 0 or hi < 0 or st <= 0:
            raise ValueError(f"positions slice {positions} must have non-negative start/stop and a positive step")
        keep = (pos >= lo) & (pos < hi) & ((pos - lo) % st == 0)
        return keep.nonzero().squeeze(1)
    want = torch.as_tensor(list(positions), device=dev, dtype=pos.dtype)
    if (want < 0).any():
        raise ValueError(f"positions {list(positions)} must be non-negative")
    return torch.isin(pos, want).nonzero().squeeze(1)


@dataclass
class TokenIndex:
    """Where the valid tokens of one forward call sit: seq, pos, last, step, valid_index [N];
    n_last: how many tokens `last` flags (B), known on the host (None: unknown)."""
    seq: torch.Tensor
    pos: torch.Tensor
    last: torch.Tensor
    step: int
    valid_index: torch.Tensor
    n_last: int | None = None


class Capture:
    """Collects taps over one or more forward calls (e.g. every step of a generation).

    >>> cap = Capture(TapRequest(["blocks.*.moe.hook_topk_ids"], positions="last"))
    >>> model.forward(ids, capture=cap); cap["blocks.1.moe.hook_topk_ids"]
    """

    def __init__(self, *requests: TapRequest, patches: Sequence[Patch] = ()):
        self.requests = requests
        self.patches = tuple(patches)
        for p in self.patches:
            if not callable(p.value) and any(ch in p.name for ch in "*?["):
                raise ValueError(f"Patch {p.name!r}: a fixed value needs one exact tap name; "
                                 f"give a function hook fn(x, ctx) to patch a pattern")
        self._values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._rows: dict[str, list[torch.Tensor]] = defaultdict(list)   # this call's row indices
        self._meta: dict[str, list[torch.Tensor]] = defaultdict(list)   # (seq, pos, step) per row
        self._index: TokenIndex | None = None
        self._sel_cache: dict[int, torch.Tensor] = {}
        self._num_layers = 0
        self._known: set[str] = set()
        self._pos_max: list[torch.Tensor] = []  # each call's largest position (for messages)

    # -- used by the model ---------------------------------------------------------------
    def begin(self, index: TokenIndex, num_layers: int, known_names: Iterable[str]) -> None:
        self._index = index
        if index.pos.numel():
            self._pos_max.append(index.pos.max())  # stays on the device: no sync per call
        self._sel_cache = {}
        self._num_layers = num_layers
        if not self._known:
            self._known = set(known_names)
            for pattern in [n for r in self.requests for n in r.names] + [p.name for p in self.patches]:
                if not fnmatch.filter(self._known, pattern):
                    raise ValueError(f"tap {pattern!r} matches no tap of this model; "
                                     f"tap names look like 'blocks.1.moe.hook_topk_ids' or 'logits'")

    def wants(self, name: str) -> bool:
        return any(self._matches(r, name) for r in self.requests) or any(p.matches(name) for p in self.patches)

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Record `value` ([N, ...], one row per valid token) and apply patches; returns the
        tensor the forward pass continues with."""
        for p in self.patches:
            if p.matches(name):
                rows = self._select(p.positions, id(p))
                new = self._hook(p, name, value, rows) if callable(p.value) else p.value
                value = value.clone()
                value[rows] = new.to(device=value.device, dtype=value.dtype)
        for i, r in enumerate(self.requests):
            if self._matches(r, name):
                rows = self._select(r.positions, i)
                self._values[name].append(value.index_select(0, rows))  # a copy already
                self._rows[name].append(rows)
                break
        return value

    # -- used by the caller ------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._values:
            raise KeyError(f"tap {name!r} was not captured; captured: {sorted(self._values)[:8]}...")
        out = torch.cat(self._values[name], 0)
        if out.shape[0] == 0:
            # a request whose positions matched no token of any call: an error, not an empty
            # tensor that reads as "no activations" (e.g. positions=[99] on a 2-token prompt)
            req = next((r for r in self.requests if self._matches(r, name)), None)
            seen = int(torch.stack(self._pos_max).max()) if self._pos_max else None
            raise LookupError(f"tap {name!r}: positions {getattr(req, 'positions', '?')!r} selected no token "
                              f"in {len(self._values[name])} call(s)" +
                              (f" (positions seen: 0..{seen})" if seen is not None else ""))
        return out

    def keys(self):
        return self._values.keys()

    def items(self):
        return ((k, self[k]) for k in self._values)

    def rows(self, name: str) -> torch.Tensor:
        """[N, 3] int64 (sequence, position, generation step) of each captured row of `name`."""
        return torch.cat(self._meta[name], 0)

    def clear(self) -> None:
        self._values.clear()
        self._rows.clear()
        self._meta.clear()

    # -- internals -----------------------------------------------------------------------------

    def _matches(self, r: TapRequest, name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, n) for n in r.names)
                and _layer_selected(r.layers, _layer_of(name), self._num_layers))

    def _select(self, positions, key) -> torch.Tensor:
        if key not in self._sel_cache:
            ix = self._index
            self._sel_cache[key] = select_rows(positions, ix.seq, ix.pos, ix.last, ix.valid_index, ix.n_last)
        return self._sel_cache[key]

    def _hook(self, p: Patch, name: str, value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ix = self._index
        ctx = HookContext(name, _layer_of(name), ix.seq[rows], ix.pos[rows], ix.step, rows)
        x = value.index_select(0, rows)
        new = p.value(x, ctx)
        if not isinstance(new, torch.Tensor):
            raise TypeError(f"hook on {name!r} returned {type(new).__name__}; expected a tensor "
                            f"of shape {list(x.shape)}")
        try:
            fits = torch.broadcast_shapes(new.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"hook on {name!r} returned shape {list(new.shape)}; expected "
                             f"{list(x.shape)} (or broadcastable to it)")
        return new

    def end(self) -> None:
        """Turn this call's row indices into (sequence, position, step) triples."""
        ix = self._index
        for name, rows_list in self._rows.items():
            for rows in rows_list:
                self._meta[name].append(torch.stack(
                    [ix.seq[rows], ix.pos[rows], torch.full_like(rows, ix.step)], 1))
        self._rows.clear()
        self._index = None
