"""No host synchronisation inside the forward's layer loop (issue: a sync-free forward on cuda
for a fixed batch shape). Model.forward validates on the host in Model._prepare, before any
launch; Model._forward (the layer loop and the head) must then read no device value. No GPU
is needed to check that: every tensor op that makes the host wait for a device (.item(),
bool(), int(), .tolist(), .nonzero(), .cpu(), boolean indexing, ...) goes through torch's
function dispatch, so a TorchFunctionMode counts them on any device. The emu backend runs the
cuda backend's code path (the CUDA kernels through the emulator, PyTorch for the rest);
torch runs the reference ops, which are not held to this.

What this cannot show: syncs that torch makes inside one op on a real GPU (an allocator that
waits, a pageable copy); the GPU suite's torch.cuda.set_sync_debug_mode covers those."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moe_engine
from moe_engine import Capture, TapRequest
from moe_engine.model import Model
from tolerances import TOL

T_ = torch.Tensor
SYNCS = {T_.item, T_.__bool__, T_.__int__, T_.__float__, T_.__index__, T_.tolist, T_.nonzero, torch.nonzero,
         T_.cpu, T_.numpy, T_.unique, torch.unique, T_.masked_select, torch.masked_select, torch.equal,
         torch.allclose}


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    parts = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class SyncCounter(TorchFunctionMode):
    """Records every tensor op that would make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in SYNCS
                or (func in (T_.__getitem__, T_.__setitem__) and _bool_index(args))
                or (func is T_.to and any(str(a) == "cpu" for a in list(args[1:]) + [kwargs.get("device")]))
                or (func in (torch.repeat_interleave, T_.repeat_interleave) and len(args) > 1
                    and isinstance(args[1], torch.Tensor) and "output_size" not in kwargs)):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("op", [lambda t: bool(t.any()), lambda t: int(t.sum()), lambda t: t.tolist(),
                                lambda t: t.nonzero(), lambda t: t[t > 0], lambda t: t.cpu(),
                                lambda t: t.max().item(), lambda t: t.to("cpu")],
                         ids=["bool", "int", "tolist", "nonzero", "bool-index", "cpu", "item", "to-cpu"])
def test_the_counter_sees_each_kind_of_sync(op):
    with SyncCounter() as c:
        op(torch.tensor([0, 1, 2]))
    assert c.calls, "a sync went uncounted"


def count_forward_syncs(monkeypatch) -> list[list[str]]:
    """Wrap Model._forward (everything after the host-side validation) in a SyncCounter."""
    seen: list[list[str]] = []
    real = Model._forward

    def counted(self, call):
        with SyncCounter() as c:
            out = real(self, call)
        seen.append(c.calls)
        return out
    monkeypatch.setattr(Model, "_forward", counted)
    return seen


@pytest.mark.parametrize("kw", [{}, {"topk": [None, 1, 0]}, {"expert_mask": {1: [0, 2]}, "mask_mode": "zero"},
                                {"expert_mask": {2: [1, 3]}, "force_experts": {1: 4}}],
                         ids=["default", "per-layer-topk", "mask-zero", "mask-force"])
def test_decode_steps_do_not_sync(emu_model, monkeypatch, kw):
    """A left-padded prompt, then decode steps of a fixed batch shape: no sync in any step
    (nor in the prefill's layer loop), and the same logits as without the counter."""
    m = emu_model
    ids, mask = moe_engine.model.left_pad([[5, 9, 11, 300, 2], [17, 4]])
    kv = m.new_cache(2, 9)
    first = m(ids, attention_mask=mask, cache=kv, logits="last", **kw)
    plain = copy.deepcopy(kv)
    seen = count_forward_syncs(monkeypatch)
    tok = first.argmax(-1, keepdim=True)
    outs = []
    for _ in range(3):
        outs.append(m(tok, cache=kv, usage=None, logits="last", **kw))
        tok = outs[-1].argmax(-1, keepdim=True)
    assert seen == [[], [], []], f"host syncs inside the decode step: {seen}"
    monkeypatch.undo()
    tok = first.argmax(-1, keepdim=True)
    for want in outs:
        got = m(tok, cache=plain, logits="last", **kw)
        assert torch.equal(got, want)
        tok = got.argmax(-1, keepdim=True)


def test_prefill_with_padding_does_not_sync(emu_model, monkeypatch):
    """A left-padded prefill: the valid-token index is made with a fixed size (no nonzero())."""
    seen = count_forward_syncs(monkeypatch)
    ids, mask = moe_engine.model.left_pad([[5, 9, 11, 300, 2], [17, 4]])
    emu_model(ids, attention_mask=mask, usage=emu_model.new_usage_counters())
    assert seen == [[]], f"host syncs inside the prefill's layer loop: {seen}"


def test_a_sync_in_the_loop_is_caught(emu_model, monkeypatch):
    """The check can fail: a capture whose positions are a list counts its rows with nonzero()."""
    seen = count_forward_syncs(monkeypatch)
    emu_model(torch.tensor([[5, 9]]), capture=Capture(TapRequest(["logits"], positions=[1])))
    assert seen and "nonzero" in seen[0]


def test_capturing_the_last_positions_does_not_sync(emu_model, monkeypatch):
    """positions="last" selects one row per sequence with a fixed size (nonzero_static)."""
    seen = count_forward_syncs(monkeypatch)
    ids, mask = moe_engine.model.left_pad([[5, 9, 11, 300, 2], [17, 4]])
    cap = Capture(TapRequest(["logits", "blocks.1.moe.hook_topk_ids"], positions="last"))
    emu_model(ids, attention_mask=mask, capture=cap)
    assert seen == [[]], f"host syncs inside the layer loop: {seen}"
    assert cap.rows("logits")[:, :2].tolist() == [[0, 4], [1, 1]]


def test_topk_zero_launches_what_any_topk_launches(emu_model, monkeypatch):
    """k = 0 is data on the device (route writes id -1 / weight 0 past K): the layer loop runs
    the same ops, kernels included, for K = 0 as for K = k_max, so the launched sequence does
    not depend on K (the host-side validation before it may differ)."""
    from moe_engine import moe
    names: list[str] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))
    real_forward, real_ffn = Model._forward, moe.expert_ffn

    def recorded(self, call):
        with Record():
            return real_forward(self, call)

    def ffn(*a, **kw):
        names.append("expert_ffn")
        return real_ffn(*a, **kw)
    monkeypatch.setattr(Model, "_forward", recorded)
    monkeypatch.setattr(moe, "expert_ffn", ffn)

    def ops(**kw):
        names.clear()
        out = emu_model(torch.tensor([[5, 9, 11]]), **kw)
        return list(names), out
    zero, out0 = ops(topk=[None, 0, 0], renormalize=False)
    two, _ = ops(topk=[None, 2, 2], renormalize=False)
    assert zero == two and zero.count("expert_ffn") == 2
    monkeypatch.undo()
    ref = moe_engine.model.Model.forward(emu_model, torch.tensor([[5, 9, 11]]), topk=[None, 0, 0], backend="torch")
    atol, rtol = TOL[("model_logits_vs_backend", torch.bfloat16)]
    torch.testing.assert_close(out0, ref, atol=atol, rtol=rtol)


def test_graph_decode_steps_do_not_sync(emu_model, monkeypatch):
    """The captured decode step (graphs.py) with a fake graph: neither its body (the in-graph
    setup, full-cache attention over Tkv_cap columns, the layer loop) nor any replay reads a
    device value, with interventions changing between replays."""
    from moe_engine.graphs import DecodeGraphs

    class FakeGraph:
        def __init__(self, device):
            self.fn = None

        def warmup(self, fn):
            fn()

        def capture(self, fn):
            self.fn = fn

        def replay(self):
            self.fn()

    seen: list[list[str]] = []
    real = Model._graph_body

    def counted_body(self, *args):
        body = real(self, *args)

        def run():
            with SyncCounter() as c:
                body()
            seen.append(c.calls)
        return run
    monkeypatch.setattr(Model, "_graph_body", counted_body)
    m = copy.copy(emu_model)
    m._graphs = DecodeGraphs(FakeGraph)
    ids, mask = moe_engine.model.left_pad([[5, 9, 11, 300, 2], [17, 4]])
    kv = m.new_cache(2, 9)
    tok = m(ids, attention_mask=mask, cache=kv, logits="last").argmax(-1, keepdim=True)
    for kw in ({}, {"topk": [None, 1, 0]}, {"expert_mask": {1: [0, 2]}}, {"force_experts": {2: 1}}):
        tok = m(tok, cache=kv, logits="last", usage=m.new_usage_counters(), **kw).argmax(-1, keepdim=True)
    assert m._graphs.captures == 1
    assert seen == [[]] * 4, f"host syncs inside the graphed step: {seen}"
