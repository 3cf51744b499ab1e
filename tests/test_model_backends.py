"""The whole model on every compiled backend against the torch reference backend: cpu (packed
mat-vecs, fused MoE layer call; fp32 and bf16) and emu (the CUDA kernels run on the CPU through
csrc/emu; bf16, the kernels' only dtype), through prefill and KV-cache decode with
interventions. Plus, for cpu, the fused layer call against the op-by-op path (same bits) and 1 vs
2 threads. Tolerances: tests/tolerances.py ("model_logits_vs_backend").

On emu this proves the kernels compute the model; it cannot show GPU timing or the tensor
cores' own accumulation order (the emulator sums mma products exactly, then rounds once)."""
import copy

import pytest
import torch

import moe_engine
import moe_engine.runner as runner_mod
from moe_engine import Capture, TapRequest
from moe_engine.cpu_weights import MAX_KEPT_TOKENS, CpuModelWeights
from moe_engine.interventions import Interventions
from moe_engine.moe import moe_layer
from moe_engine.ops import available_backends

from tolerances import assert_close

IDS = [[1, 5, 9, 200, 3, 77, 301, 42, 8], [7, 7, 7, 100, 250, 499, 2, 3, 4]]


CASES = [c for c in [("cpu", "float32"), ("cpu", "bfloat16"), ("emu", "bfloat16")]
         if c[0] in available_backends()]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def pair(request, tiny_dir):
    be, dt = request.param
    return (moe_engine.load(tiny_dir, dtype=dt, backend="torch", progress=False),
            moe_engine.load(tiny_dir, dtype=dt, backend=be, progress=False), getattr(torch, dt))


@pytest.fixture
def cpu_pair(pair):
    if pair[1].backend != "cpu":
        pytest.skip("cpu backend only")
    return pair


def routed(model, ids, cache=None, **kw):
    """(logits [B, Q, V], flipped-so-far mask helper input: topk ids per MoE layer [L', B*Q, k])."""
    cap = Capture(TapRequest(["blocks.*.moe.hook_topk_ids"]))
    out = model(ids, cache=cache, capture=cap, **kw)
    names = sorted(cap.keys())
    return out, [cap[n] for n in names]


def chose_other(a, b):
    """[N] bool: token n chose another set of experts (the order within top-k follows the
    weights, so a near-tie between two chosen experts reorders them without changing the set)."""
    return (a.sort(-1).values != b.sort(-1).values).any(-1)


def compare(mt, mc, ids, dt, case, ct=None, cc=None, **kw):
    """Logits of the two backends must agree on every token whose routing agrees in every layer,
    and on no token after a disagreement in its sequence (attention carries it forward). In
    bf16 the router logits differ by an ulp now and then (another summation order), so a
    near-tie may pick another expert (tests/tolerances.py); fp32 must agree on every token."""
    lt, rt = routed(mt, ids, ct, **kw)
    lc, rc = routed(mc, ids, cc, **kw)
    B, Q = ids.shape
    flip = torch.zeros(B * Q, dtype=torch.bool)
    for a, b in zip(rt, rc):
        flip |= chose_other(a, b)
    flip = flip.view(B, Q).cummax(1).values
    if dt == torch.float32:
        assert not flip.any(), f"routing differs in fp32 [{case}]"
    assert flip.float().mean() <= 0.25, f"routing differs on {int(flip.sum())} of {B * Q} tokens [{case}]"
    ok = ~flip
    assert_close(lc[ok], lt[ok], "model_logits_vs_backend", dt, case)
    return lt, flip


@pytest.mark.parametrize("kw", [{}, {"topk": 1}, {"topk": 0}, {"topk": 8},
                                {"expert_mask": {1: [0, 3]}, "mask_mode": "zero", "renormalize": True},
                                {"expert_mask": {2: [1]}, "force_experts": {1: 5}}])
def test_model_matches_torch(pair, kw):
    mt, mc, dt = pair
    ids = torch.tensor(IDS)
    # prefill into a cache, then decode: a step at a time through the KV cache (the packed mat-vec path, N <= SMALL_N)
    ct, cc = mt.new_cache(2, 12), mc.new_cache(2, 12)
    _, flip = compare(mt, mc, ids, dt, f"prefill {kw}", ct, cc, **kw)
    gone = flip[:, -1]
    tok = torch.tensor([[11], [12]])
    for step in range(2):
        lt, f = compare_step(mt, mc, tok, dt, gone, f"decode step {step} {kw}", ct, cc, **kw)
        gone |= f
        tok = lt[:, -1].argmax(-1, keepdim=True)


def compare_step(mt, mc, tok, dt, gone, case, ct, cc, **kw):
    lt, rt = routed(mt, tok, ct, **kw)
    lc, rc = routed(mc, tok, cc, **kw)
    flip = gone.clone()
    for a, b in zip(rt, rc):
        flip |= chose_other(a, b)
    if dt == torch.float32:
        assert not flip.any(), f"routing differs in fp32 [{case}]"
    assert_close(lc[~flip], lt[~flip], "model_logits_vs_backend", dt, case)
    return lt, flip


def test_fused_layer_is_bit_identical_to_op_by_op(cpu_pair):
    _, mc, dt = cpu_pair
    c = mc.config
    l = c.moe_layers[0]
    packed = mc._cpu_weights().layers[l].moe
    for N, kw in [(1, {}), (5, {"topk": 1}), (33, {"expert_mask": {l: [2]}, "mask_mode": "zero"}),
                  (MAX_KEPT_TOKENS + 7, {"force_experts": {l: 1}})]:
        kept = list(packed._buffers)
        routing = Interventions(**kw).resolve(c, mc.device)
        u, r = torch.randn(N, c.hidden_size).to(dt), torch.randn(N, c.hidden_size).to(dt)
        usage = [torch.zeros(c.n_routed_experts, dtype=torch.int32) for _ in range(2)]
        a = moe_layer(u, r, mc.weights.layers[l].mlp, routing, l, backend="cpu", cpu=packed, usage=usage[0],
                      fused=True)
        b = moe_layer(u, r, mc.weights.layers[l].mlp, routing, l, backend="cpu", cpu=packed, usage=usage[1],
                      fused=False)
        assert torch.equal(a, b), f"fused vs op-by-op N={N} {kw}"
        assert torch.equal(usage[0], usage[1]), f"usage counters N={N} {kw}"
        if N > MAX_KEPT_TOKENS:  # a large call's buffers are freed with it, never kept (memory)
            assert list(packed._buffers) == kept, f"N={N} kept its fused-layer buffers"


@pytest.mark.parametrize("kw", [{}, {"topk": [None, 1, 0]}, {"topk": 3, "force_experts": {2: 5}},
                                {"expert_mask": {1: [0, 2]}, "mask_mode": "zero", "renormalize": True},
                                {"expert_mask": {2: [1, 3, 4]}}, "per-position"],
                         ids=["default", "per-layer-topk", "force", "mask-zero", "mask-reroute", "per-position"])
def test_decode_step_is_bit_identical_to_the_layer_loop(cpu_pair, monkeypatch, kw):
    """The cpu backend's one-call decode step (csrc/cpu/decode_step.cpp) against Model.forward's
    layer loop (what it runs when the step cannot be fused): logits, usage counters and the KV
    cache, over a left-padded batch, several steps, with interventions. "per-position": a mask
    [L, P, E] and forced ids [L, P] with a row per position, so the step reads one row per
    sequence (the two sequences sit at different positions)."""
    import moe_engine.model as model_mod
    _, mc, _ = cpu_pair
    if kw == "per-position":
        c = mc.config
        L, E, P = c.num_hidden_layers, c.n_routed_experts, 9
        g = torch.Generator().manual_seed(7)
        m = torch.zeros(L, P, E, dtype=torch.bool)
        f = torch.full((L, P), -1)
        for l in c.moe_layers:
            m[l] = torch.rand(P, E, generator=g) < 0.3
            m[l, :, :c.num_experts_per_tok] = False          # each row leaves >= k experts
            f[l, ::2] = l % c.num_experts_per_tok            # an unmasked expert, every other position
        kw = {"expert_mask": m, "force_experts": f}
    ids, mask = model_mod.left_pad([[5, 9, 11, 300, 2], [17, 4]])
    prefilled, usage0 = mc.new_cache(2, 9), mc.new_usage_counters()
    first = mc(ids, attention_mask=mask, cache=prefilled, usage=usage0, logits="last", **kw).argmax(-1, keepdim=True)
    calls = []
    real = CpuModelWeights.decode_step
    monkeypatch.setattr(CpuModelWeights, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for fused in (True, False):
        # DECODE_STEP_MAX_B = 0 turns the one-call step off and nothing else (runner.py)
        monkeypatch.setattr(runner_mod, "DECODE_STEP_MAX_B", runner_mod.DECODE_STEP_MAX_B if fused else 0)
        cache, usage, tok = copy.deepcopy(prefilled), usage0.clone(), first
        steps = []
        for i in range(4):
            lg = mc(tok, cache=cache, usage=usage, **(dict(logits="last") if i % 2 else {}), **kw)
            steps.append(lg.reshape(2, -1))
            tok = lg.reshape(2, -1).argmax(-1, keepdim=True)
        runs.append((torch.stack(steps), usage, cache.k[:, :, :, :cache.used], cache.v[:, :, :, :cache.used]))
    assert len(calls) == 4, "the fused run must take the one-call step at every step, the other never"
    for name, a, b in zip(("logits", "usage", "k cache", "v cache"), *runs):
        assert torch.equal(a, b), f"decode step vs layer loop: {name} differ ({kw})"


def test_decode_step_rejects_a_bad_token_before_writing(cpu_pair):
    _, mc, _ = cpu_pair
    V = mc.config.vocab_size
    cache = mc.new_cache(2, 6)
    mc(torch.tensor([[3, 4], [5, 6]]), cache=cache)
    before = copy.deepcopy(cache)
    for bad in (V, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            mc(torch.tensor([[7], [bad]]), cache=cache)
    assert cache.used == before.used and torch.equal(cache.next_pos, before.next_pos)
    assert torch.equal(cache.valid, before.valid)
    # int32, [B] (B = 1) and non-contiguous ids are the same tokens
    outs = []
    for ids in (torch.tensor([[7], [9]]), torch.tensor([[7], [9]], dtype=torch.int32),
                torch.tensor([[7, 0], [9, 0]])[:, :1]):
        c2 = copy.deepcopy(before)
        outs.append(mc(ids, cache=c2, logits="last"))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    one = copy.deepcopy(mc.new_cache(1, 4))
    mc(torch.tensor([[3, 4]]), cache=one)
    c3 = copy.deepcopy(one)
    assert torch.equal(mc(torch.tensor([7]), cache=one), mc(torch.tensor([[7]]), cache=c3))


@pytest.mark.parametrize("rope", [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_decode_step_with_rope_scaling_matches_the_layer_loop(tmp_path, monkeypatch, rope):
    """Scaled rope through the one-call step (rows of the rope table) and the general path;
    dynamic scaling beyond the context (max_position_embeddings = 8 here) leaves the step to
    the general path, whose per-call base it needs."""
    from moe_engine.synthetic import make_checkpoint
    if "cpu" not in available_backends():
        pytest.skip("cpu backend not built")
    ckpt = make_checkpoint(tmp_path, "tiny", dtype="float32",
                           overrides={"rope_scaling": rope, "max_position_embeddings": 8})
    m = moe_engine.load(ckpt, dtype="float32", backend="cpu", progress=False)
    ids = torch.tensor([[5, 9, 11, 300, 2]])
    prefilled = m.new_cache(1, 12)
    first = m(ids, cache=prefilled, logits="last").argmax(-1, keepdim=True)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(runner_mod, "DECODE_STEP_MAX_B", runner_mod.DECODE_STEP_MAX_B if fused else 0)
        cache, tok, steps = copy.deepcopy(prefilled), first, []
        for _ in range(6):  # positions 5..10: crosses the context
            steps.append(m(tok, cache=cache, logits="last"))
            tok = steps[-1].argmax(-1, keepdim=True)
        runs.append(torch.stack(steps))
    assert torch.equal(runs[0], runs[1])


def test_taps_do_not_change_outputs(pair):
    _, mc, _ = pair
    ids = torch.tensor(IDS)
    plain = mc(ids)
    cap = Capture(TapRequest(["blocks.*.moe.hook_expert_out", "blocks.*.moe.hook_topk_ids"]))
    assert torch.equal(mc(ids, capture=cap), plain), f"capturing taps changed the {mc.backend} logits"


def test_cpu_model_threads_1_and_2_identical(cpu_pair):
    _, mc, _ = cpu_pair
    ids = torch.tensor(IDS)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            cache = mc.new_cache(2, 11)
            outs.append((mc(ids, cache=cache), mc(torch.tensor([[3], [4]]), cache=cache)))
    finally:
        torch.set_num_threads(old)
    # torch's own GEMMs (prefill attention) may split work by thread count; the cpu kernels do
    # not, and the decode step runs only cpu kernels + elementwise torch ops.
    assert torch.equal(outs[0][1], outs[1][1]), "decode logits differ between 1 and 2 threads"
