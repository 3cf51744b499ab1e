"""The captured decode step (src/moe_engine/graphs.py) on emu with a fake graph.

There is no torch CUDA graph on a CPU, so FakeGraph stands in for graphs.CudaGraph: warmup runs
the step, capture records the callable without running it, replay calls it again on the same
static buffers. Everything else is the cuda path: the bucket choice, the static buffers, the
invalidation rules, the routing controls copied in place, the full-cache attention and the taps
read back from the recorded tensors.

What this cannot show: that the step really captures on a GPU (a kernel launcher that syncs,
allocates pinned memory or calls a non-capturable API would fail only there), that a replay
reads the updated controls (here the body re-runs Python; on a GPU only the recorded kernels
run, so a host value read at capture time would stay frozen: the body is written to read none,
and tests/test_sync_free.py checks it reads no device value), and the speed."""
from __future__ import annotations

import copy

import pytest
import torch

import moe_engine
from moe_engine import Capture, Patch, TapRequest
from moe_engine.graphs import DecodeGraphs
from moe_engine.model import left_pad
from moe_engine.ops import available_backends
from tolerances import TOL


class FakeGraph:
    """graphs.CudaGraph's three calls without CUDA."""

    def __init__(self, device):
        self.fn, self.replays = None, 0

    def warmup(self, fn):
        fn()

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        self.replays += 1
        self.fn()


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    """(graphed, eager) emu models of the tiny checkpoint (8 experts, top-2)."""
    if "emu" not in available_backends():
        pytest.skip("emu backend not built")
    g = moe_engine.load(tiny_ckpt, dtype="bfloat16", backend="emu", progress=False)
    e = moe_engine.load(tiny_ckpt, dtype="bfloat16", backend="emu", progress=False)
    return g, e


@pytest.fixture
def graphed(models):
    g, e = models
    g._graphs = DecodeGraphs(FakeGraph)
    return g, e


PROMPTS = [[5, 9, 11, 300, 2], [17, 4]]


def _prefill(m, steps: int):
    ids, mask = left_pad(PROMPTS)
    kv = m.new_cache(len(PROMPTS), ids.shape[1] + steps)
    first = m(ids, attention_mask=mask, cache=kv, logits="last")
    return kv, first.argmax(-1, keepdim=True)


def _close(got, want):
    atol, rtol = TOL[("model_logits_vs_backend", torch.bfloat16)]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def _decode_both(g, e, per_step_kw, usage=False):
    """Greedy decode with the graphed model and the eager one from the same prefill; each step
    may carry its own interventions. Returns (graph logits, eager logits) per step, and checks
    the tokens are the same."""
    kv, tok = _prefill(g, len(per_step_kw))
    kv_e = copy.deepcopy(kv)
    tok_e = tok.clone()
    ug, ue = (g.new_usage_counters(), e.new_usage_counters()) if usage else (None, None)
    out = []
    for kw in per_step_kw:
        lg = g(tok, cache=kv, logits="last", usage=ug, **kw)
        le = e(tok_e, cache=kv_e, logits="last", usage=ue, **kw)
        assert torch.equal(lg.argmax(-1), le.argmax(-1)), f"tokens differ at {kw}"
        out.append((lg, le))
        tok, tok_e = lg.argmax(-1, keepdim=True), le.argmax(-1, keepdim=True)
    assert kv.used == kv_e.used and kv.host_pos == kv_e.host_pos
    assert torch.equal(kv.next_pos, kv_e.next_pos) and torch.equal(kv.valid, kv_e.valid)
    if usage:
        assert torch.equal(ug, ue)
    return out


def test_graph_steps_match_the_eager_path(graphed):
    """Full-cache masked attention + replays give the eager (sliced-cache) tokens; logits to
    tolerances.py's model_logits_vs_backend (bf16): SDPA sums over Tkv_cap columns, the masked
    ones exactly zero, so only the summation blocking may differ."""
    g, e = graphed
    steps = _decode_both(g, e, [{}] * 5, usage=True)
    for lg, le in steps:
        _close(lg, le)
    st = next(iter(g._graphs.steps.values()))
    assert g._graphs.captures == 1 and st.graph.replays == 4


def test_one_graph_per_bucket_and_static_buffers_reused(graphed):
    """topk up to the model's default (2) shares the (B, 2) graph; topk = 3 is bucket (B, 3).
    The static buffers keep their addresses across replays; the returned logits are a copy."""
    g, e = graphed
    kv, tok = _prefill(g, 6)
    seen_ptrs, outs = set(), []
    for topk in (None, 1, 0, 2):
        outs.append(g(tok, cache=kv, logits="last", topk=[None, topk, topk]))
        assert len(g._graphs.steps) == 1
        st = next(iter(g._graphs.steps.values()))
        seen_ptrs.add((st.out.data_ptr(), st.ids.data_ptr(), st.k.data_ptr(), st.col.data_ptr()))
        assert outs[-1].data_ptr() != st.out.data_ptr()
        tok = outs[-1].argmax(-1, keepdim=True)
    assert len(seen_ptrs) == 1 and g._graphs.captures == 1 and len(g._graphs.steps) == 1
    g(tok, cache=kv, logits="last", topk=3)
    assert g._graphs.captures == 2 and (2, 3) == next(reversed(g._graphs.steps))[:2]
    assert g._graphs.bucket(2, 1, 2) == (2, 2) and g._graphs.bucket(3, 5, 2) == (3, 5)


def test_interventions_change_between_replays_without_recapture(graphed):
    """Per-layer top-k (0 included), masks in both modes' key and forced experts change from
    step to step: one capture per mask_mode, the eager tokens every step."""
    g, e = graphed
    schedule = [{}, {"topk": [None, 1, 0]}, {"expert_mask": {1: [0, 2]}}, {"force_experts": {2: 5}},
                {"expert_mask": {2: [1, 3]}, "force_experts": {1: 4}}, {"topk": [None, 0, 1]}, {}]
    for lg, le in _decode_both(g, e, schedule):
        _close(lg, le)
    assert g._graphs.captures == 1
    zero = {"expert_mask": {1: [0]}, "mask_mode": "zero"}
    for lg, le in _decode_both(g, e, [{}, zero, {}, zero]):
        _close(lg, le)
    assert g._graphs.captures == 3  # the second decode's new cache, then mask_mode="zero" (its own key)


def test_new_cache_weights_or_taps_recapture(graphed):
    g, e = graphed
    kv, tok = _prefill(g, 8)
    g(tok, cache=kv, logits="last")
    g(tok, cache=kv, logits="last")
    assert g._graphs.captures == 1
    kv2, tok2 = _prefill(g, 3)                  # a new cache: every graph dropped
    g(tok2, cache=kv2, logits="last")
    assert g._graphs.captures == 2 and len(g._graphs.steps) == 1
    g(tok, cache=kv, logits="last")             # back to the first cache: captured again
    assert g._graphs.captures == 3
    g.invalidate_graphs()                       # weights edited in place
    g(tok, cache=kv, logits="last")
    assert g._graphs.captures == 4
    w = g.weights
    g.weights = copy.copy(w)                    # another weight set
    try:
        g(tok, cache=kv, logits="last")
        assert g._graphs.captures == 5
    finally:
        g.weights = w
    cap = Capture(TapRequest(["blocks.1.moe.hook_router_logits"]))
    g(tok, cache=kv, logits="last", capture=cap)   # a tap request changes the outputs: a new key
    g(tok, cache=kv, logits="last", capture=cap)   # ... captured once
    assert g._graphs.captures == 6  # the weights came back: dropped again, then the tap key once


def test_taps_from_the_graph_equal_the_eager_ones(graphed):
    """Taps read from the recorded graph tensors after each replay: the eager values, the same
    (sequence, position, step) rows, positions="last" included."""
    g, e = graphed
    names = ["blocks.1.moe.hook_topk_ids", "blocks.2.moe.hook_expert_out", "blocks.*.hook_resid_post"]
    caps = [Capture(TapRequest(names, positions="last")) for _ in range(2)]
    kv, tok = _prefill(g, 3)
    kv_e = copy.deepcopy(kv)
    tok_e = tok.clone()
    for step in (1, 2, 3):
        tok = g(tok, cache=kv, logits="last", capture=caps[0], step=step, topk=[None, 1, 2]).argmax(-1, keepdim=True)
        tok_e = e(tok_e, cache=kv_e, logits="last", capture=caps[1], step=step, topk=[None, 1, 2]).argmax(-1, keepdim=True)
    assert g._graphs.captures == 1
    got, want = caps
    assert sorted(got.keys()) == sorted(want.keys())
    for name in want.keys():
        assert torch.equal(got.rows(name), want.rows(name)), name
        if "topk_ids" in name:
            assert torch.equal(got[name], want[name])
        else:
            _close(got[name].float(), want[name].float())


def test_calls_the_graph_cannot_take_run_eagerly(graphed):
    """Per-position controls, patches and an attention_mask take the eager loop (no capture);
    graphed and eager steps mix on one cache (the host bookkeeping agrees)."""
    g, e = graphed
    per_pos = torch.full((3, 16), -1, dtype=torch.long)
    per_pos[1] = 3
    patch = Capture(patches=[Patch("blocks.1.moe.hook_in", lambda x, ctx: x * 0.5)])
    kv, tok = _prefill(g, 4)
    for kw in ({"force_experts": per_pos}, {"capture": patch},
               {"attention_mask": torch.ones(2, 1, dtype=torch.bool)}):
        assert torch.equal(g(tok, cache=copy.deepcopy(kv), logits="last", **kw),
                           e(tok, cache=copy.deepcopy(kv), logits="last", **kw)), kw
    assert g._graphs.captures == 0
    steps = _decode_both(g, e, [{}, {"force_experts": per_pos}, {"capture": patch}, {}])
    for lg, le in steps:
        _close(lg, le)
    assert g._graphs.captures == 1 and next(iter(g._graphs.steps.values())).graph.replays == 1


def test_cuda_graph_option(tiny_ckpt):
    """cuda_graph=True asks for the cuda backend; False / None elsewhere load without graphs."""
    if "emu" not in available_backends():
        pytest.skip("emu backend not built")
    with pytest.raises(ValueError, match="cuda_graph=True needs the cuda backend"):
        moe_engine.load(tiny_ckpt, backend="emu", cuda_graph=True, progress=False)
    with pytest.raises(TypeError, match="cuda_graph must be"):
        moe_engine.load(tiny_ckpt, backend="emu", cuda_graph="yes", progress=False)
    assert moe_engine.load(tiny_ckpt, backend="emu", cuda_graph=False, progress=False)._graphs is None
    assert moe_engine.load(tiny_ckpt, backend="emu", progress=False)._graphs is None


def test_no_cuda_graph_flag_reaches_load(tiny_ckpt, monkeypatch, capsys):
    """generate's --no-cuda-graph loads with cuda_graph=False (None without it: on for cuda);
    the lens CLI parses the same flag."""
    from moe_engine.generate import main
    from moe_engine.lens.__main__ import build_parser
    from moe_engine.model import Model
    seen = []
    real = Model.load.__func__

    def load(cls, *a, **kw):
        seen.append(kw.get("cuda_graph", "missing"))
        return real(cls, *a, **kw)
    monkeypatch.setattr(Model, "load", classmethod(load))
    argv = ["--model", str(tiny_ckpt), "--backend", "torch", "--max-new-tokens", "2", "--prompt", "hi"]
    assert main(argv + ["--no-cuda-graph"]) == 0 and main(argv) == 0
    assert seen == [False, None]
    capsys.readouterr()
    assert build_parser().parse_args(["routing", "--out", "x", "--no-cuda-graph"]).no_cuda_graph is True
