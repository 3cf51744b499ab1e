"""A captured decode step: one CUDA graph per bucket, replayed for every position.

A decode step (one new token per sequence, no padding) launches the same kernels at every
position once attention runs over the whole cache (Tkv_cap columns, the causal limit a mask
made from a device column index) and the KV write goes to that device column (Model._attention,
`call.col`). So it can be captured once and replayed: the host then issues one launch per step
instead of ~10 per layer.

Buckets: one graph per key (B, k_max, ...): B is the cache's batch (the KV cache is allocated per
sequence, so a step cannot be padded into a larger batch than its cache holds; generate keeps
B fixed for the whole generation, finished rows included); k_max is padded up to the model's
`num_experts_per_tok`, so every top-k up to it (0 included: the kernels read K as data, moe.py)
shares one graph. The key also holds what changes the launched work on the host side: the
logits shape, mask_mode, renormalize, whether usage is counted, and the taps captured.

Static buffers (`_Static`): ids [B, 1], the cache column col [1], the routing controls (k [L, 1],
force [L, 1], mask [L, E]: copied in place when the call's Routing differs from the last one, so
topk / expert_mask / force_experts change between replays without recapture), usage [L, E], the
logits out [B, V] (or [B, 1, V]) and the tapped tensors. A new cache (other tensors), a changed
weight set (Model.weights replaced, or Model.invalidate_graphs after an in-place edit) or a
grown rope table drops every graph; a tap request that changes the outputs is another key.

Not graphed (the eager layer loop runs instead, Runner.graph_step and DecodeGraphs.step):
prefill, an attention_mask, per-position / per-token routing controls, patches, grad, dynamic
rope scaling beyond the context.

Two streams: each MoE layer forks the shared experts onto a side stream and joins it before
combine (moe.py, streams.py). The fork and join are event waits between the capture stream and
the side stream, which the capture records as the graph's edges, so a replay runs the shared
experts beside the router and the routed experts. The side stream is created in the eager
warm-up that precedes every capture (CudaGraph.warmup), not inside the capture.

Only `CudaGraph` and streams.py touch torch.cuda; everything else runs on any device with another
graph object of the same three methods (tests/test_graphs.py replays on emu with a fake one).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .taps import TokenIndex

# Which taps slice their tensor to the layer's K (moe._patch_cols): capturing one makes K part
# of the graph's key, since the captured view has K columns.
_K_SLICED = ("hook_topk_ids", "hook_topk_weights", "hook_expert_out")


class CudaGraph:
    """torch.cuda.CUDAGraph behind the three calls DecodeGraphs makes: the only CUDA-specific
    lines of the graph path."""

    def __init__(self, device: torch.device, pool=None):
        self.device, self.pool, self._graph = device, pool, None

    def warmup(self, fn: Callable[[], None]) -> None:
        """Run fn eagerly once on a side stream (torch's recipe: lazy library state is set up
        outside the capture)."""
        cur = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            fn()
        cur.wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> None:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            fn()
        self._graph = g

    def replay(self) -> None:
        self._graph.replay()


class TapRecorder:
    """The taps of a captured step: records each wanted tap's tensor (graph memory, rewritten by
    every replay; holding it keeps the allocator from reusing it inside the graph) and returns
    it unchanged. Quacks like the parts of taps.Capture the layer loop uses."""

    def __init__(self, names: frozenset):
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        self.values[name] = value
        return value

    def end(self) -> None:
        pass


@dataclass
class _Static:
    """One bucket's static buffers and graph."""
    ids: torch.Tensor            # [B, 1] int64
    col: torch.Tensor            # [1] int64: the cache column this step writes
    k: torch.Tensor              # [L, 1] int32
    force: torch.Tensor          # [L, 1] int32
    mask: torch.Tensor           # [L, E] bool
    usage: torch.Tensor | None   # [L, E] int32, zeroed inside the step
    out: torch.Tensor            # [B, V] or [B, 1, V] float32
    taps: TapRecorder
    graph: object = None
    routing: object = None       # the Routing last copied into k / force / mask


class DecodeGraphs:
    """A Model's captured decode steps. make_graph(device) -> an object with warmup(fn),
    capture(fn), replay() (CudaGraph on cuda)."""

    def __init__(self, make_graph: Callable[[torch.device], object]):
        self.make_graph = make_graph
        self.steps: dict[tuple, _Static] = {}
        self.captures = 0        # graphs captured so far (tests and bench read it)
        # (cache tensors, weights, rope table) the graphs were made for: held, not just their
        # ids, so a freed cache's memory cannot come back under a captured address; an old cache
        # therefore lives until the next graphed call with another one (or invalidate())
        self._bound = None

    def invalidate(self) -> None:
        """Drop every captured step (the next step captures again)."""
        self.steps.clear()
        self._bound = None

    def bucket(self, B: int, k_max: int, default_k: int) -> tuple[int, int]:
        """(B, k_max) of the graph a call runs in: k_max padded up to the model's default top-k."""
        return B, max(k_max, default_k)

    def step(self, model, runner, ids: torch.Tensor, cache, routing, usage, capture, logits: str,
             step: int) -> torch.Tensor | None:
        """One decode step through the graph of its bucket (captured on first use); None when the
        call cannot be graphed (the caller runs the eager layer loop). ids: [B, 1] (or [1])
        token ids, checked on the host where they are."""
        if routing.rows != "call" or (capture is not None and capture.patches):
            return None
        c = model.config
        ids = model._check_ids(ids)
        model._check_usage(usage)
        B = ids.shape[0]
        if max(cache.host_next_pos(), default=0) + 1 > c.max_position_embeddings and c.rope_scaling is None:
            raise ValueError(f"position {max(cache.host_next_pos())} is beyond the model's context "
                             f"(max_position_embeddings = {c.max_position_embeddings})")
        cos_table = model._rope_table(cache.capacity)[0]
        bound = (cache.k, cache.v, cache.valid, cache.next_pos, model.weights, cos_table)
        if self._bound is None or any(a is not b for a, b in zip(self._bound, bound)):
            self.invalidate()
            self._bound = bound
        names = frozenset() if capture is None else frozenset(n for n in model._tap_names if capture.wants(n))
        k_key = routing.k if any(n.endswith(_K_SLICED) for n in names) else None
        Bb, k_max = self.bucket(B, routing.k_max, c.num_experts_per_tok)
        key = (Bb, k_max, logits, routing.mask_mode, routing.renormalize, usage is not None, names, k_key)
        st = self.steps.get(key)
        fresh = st is None
        if fresh:
            st = self.steps[key] = self._new_static(model, B, logits, usage is not None, names)
        st.ids.copy_(ids, non_blocking=True)
        st.col.fill_(cache.used)
        if st.routing is not routing:
            st.k.copy_(routing.k_dev)
            st.force.copy_(routing.force)
            if routing.mask is None:
                st.mask.zero_()
            else:
                st.mask.copy_(routing.mask)
            st.routing = routing
        if fresh:
            # every MoE layer gets a mask (all False when none is asked), so masking a layer
            # later changes data, not launches; the host k is only checked (moe.py reads K on
            # the device) unless a tap slices by it (then it is part of the key)
            graph_routing = replace(routing, k_max=k_max, k_dev=st.k, force=st.force, mask=st.mask,
                                    masked_layers=frozenset(c.moe_layers),
                                    k=routing.k if k_key is not None else (k_max,) * c.num_hidden_layers)
            body = model._graph_body(runner, st, cache, graph_routing, logits)
            st.graph = self.make_graph(model.device)
            st.graph.warmup(body)     # this call's step, run eagerly
            st.graph.capture(body)    # recorded, not run
            self.captures += 1
        else:
            st.graph.replay()
        cache.used += 1
        cache.host_pos = [p + 1 for p in cache.host_next_pos()]
        if usage is not None:
            usage.add_(st.usage)
        if capture is not None:
            dev = model.device
            rows = torch.arange(B, device=dev)
            capture.begin(TokenIndex(rows, cache.next_pos - 1, torch.ones(B, dtype=torch.bool, device=dev),
                                     step, rows, B), c.num_hidden_layers, model._tap_names)
            for name, value in st.taps.values.items():
                capture(name, value)
            capture.end()
        return st.out.clone()

    def _new_static(self, model, B: int, logits: str, count_usage: bool, names: frozenset) -> _Static:
        c, dev = model.config, model.device
        L, E, V = c.num_hidden_layers, c.n_routed_experts, c.vocab_size
        return _Static(
            ids=torch.zeros((B, 1), dtype=torch.long, device=dev),
            col=torch.zeros(1, dtype=torch.long, device=dev),
            k=torch.zeros((L, 1), dtype=torch.int32, device=dev),
            force=torch.full((L, 1), -1, dtype=torch.int32, device=dev),
            mask=torch.zeros((L, E), dtype=torch.bool, device=dev),
            usage=torch.zeros((L, E), dtype=torch.int32, device=dev) if count_usage else None,
            out=torch.zeros((B, V) if logits == "last" else (B, 1, V), dtype=torch.float32, device=dev),
            taps=TapRecorder(names))
