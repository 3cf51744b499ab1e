"""Function hooks on taps (every backend), forward(grad=True) (torch backend; a clear error on
the kernel backends), and lens.attribute_experts: gradient x activation cross-checked against
finite ablation, and zero-ablation against a closed form on the analytic checkpoint."""
from __future__ import annotations

import pytest
import torch
from _lens_helpers import BACKENDS, Analytic, analytic_dir, dtype_of, load  # noqa: F401
from tolerances import TOL

from moe_engine import Capture, HookContext, Patch, TapRequest, lens

A = Analytic


def _tol(backend, name="tap_invariant"):
    atol, rtol = TOL[name, getattr(torch, dtype_of(backend))]
    return dict(atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_hook_resample_equals_patch(tiny_fp32_dir, backend):
    """Resample ablation: a hook returning another prompt's activations gives exactly what a
    fixed-value Patch of those activations gives; the hook sees the right context."""
    model = load(tiny_fp32_dir, backend)
    a = torch.tensor(model.tokenizer.encode("the first prompt of five"))
    b = torch.tensor(model.tokenizer.encode("a second prompt, same length?")[: a.numel()])
    name = "blocks.1.hook_resid_mid"
    src = Capture(TapRequest([name], positions=[1, 3]))
    model.forward(b, capture=src)
    other = src[name]
    seen: list[HookContext] = []

    def resample(x, ctx):
        seen.append(ctx)
        return other
    hooked = model.forward(a, capture=Capture(patches=[Patch(name, resample, positions=[1, 3])]),
                           step=7)
    fixed = model.forward(a, capture=Capture(patches=[Patch(name, other, positions=[1, 3])]))
    assert torch.equal(hooked, fixed)
    assert not torch.equal(hooked, model.forward(a))
    (ctx,) = seen
    assert (ctx.name, ctx.layer, ctx.step) == (name, 1, 7)
    assert ctx.positions.tolist() == [1, 3] and ctx.seq.tolist() == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_hook_steering_every_layer_pattern(tiny_fp32_dir, backend):
    """Steering with a pattern: x + v on the last layer's output moves the logits exactly as
    decoding (resid_post + v) through the final norm and lm_head predicts."""
    model = load(tiny_fp32_dir, backend)
    L = model.config.num_hidden_layers
    ids = torch.tensor(model.tokenizer.encode("steer this sentence"))
    v = torch.zeros(model.config.hidden_size)
    v[:4] = 3.0
    calls = []

    def steer(x, ctx):
        calls.append(ctx.layer)
        return x + v.to(x.dtype) if ctx.layer == L - 1 else x
    cap = Capture(TapRequest([f"blocks.{L - 1}.hook_resid_post"]))
    model.forward(ids, capture=cap)
    out = model.forward(ids, capture=Capture(patches=[Patch("blocks.*.hook_resid_post", steer)]))
    assert calls == list(range(L))
    want = lens.logit_lens(model, cap[f"blocks.{L - 1}.hook_resid_post"].float() + v, top=0,
                           full=True).logprobs
    V = want.shape[-1]
    torch.testing.assert_close(torch.log_softmax(out[0, :, :V], -1), want,
                               **_tol(backend, "model_logits_vs_backend"))


def test_function_hook_errors(tiny_fp32_dir):
    model = load(tiny_fp32_dir)
    ids = torch.tensor([1, 2, 3])
    bad = Capture(patches=[Patch("blocks.1.hook_resid_mid", lambda x, ctx: x[:1, :2])])
    with pytest.raises(ValueError, match="returned shape"):
        model.forward(ids, capture=bad)
    with pytest.raises(ValueError, match="exact tap name"):
        Capture(patches=[Patch("blocks.*.hook_resid_mid", torch.zeros(1))])
    with pytest.raises(TypeError, match="returned int"):
        model.forward(ids, capture=Capture(patches=[Patch("blocks.1.hook_resid_mid",
                                                          lambda x, ctx: 0)]))


def test_forward_grad(tiny_fp32_dir):
    """grad=True keeps the graph on the torch backend (gradients reach a hooked leaf); every
    kernel backend refuses with an error naming the fallback."""
    model = load(tiny_fp32_dir)
    ids = torch.tensor([5, 6, 7, 8])
    leaf = {}

    def mk(x, ctx):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]
    out = model.forward(ids, grad=True, capture=Capture(patches=[Patch("blocks.0.hook_resid_mid", mk)]))
    out[0, -1, 3].backward()
    assert leaf["x"].grad is not None and leaf["x"].grad.abs().sum() > 0
    assert not model.forward(ids).requires_grad                      # default: no graph
    from moe_engine.ops import available_backends
    for be in available_backends():
        if be == "torch":
            continue
        m = load(tiny_fp32_dir, be)
        with pytest.raises(ValueError, match="backend='torch'"):
            m.forward(ids.to(m.device), grad=True)


def test_attribute_experts_grad_matches_ablation(tiny_fp32_dir):
    """Gradient x activation is the first-order ablation effect: scaling one expert output by
    1 - eps changes the target by eps * score (to O(eps)), for every (layer, token, slot)."""
    model = load(tiny_fp32_dir)
    ids = torch.tensor(model.tokenizer.encode("attribute me")[:4])
    for target in (17, "loss"):
        g = lens.attribute_experts(model, ids, target=target)
        f = lens.attribute_experts(model, ids, target=target, method="ablation", scale=1 - 1e-3)
        assert g.layers == f.layers == list(model.config.moe_layers)
        assert g.target == pytest.approx(f.target, rel=1e-5, abs=1e-5)
        for a, b, i, j in zip(g.scores, f.scores, g.ids, f.ids):
            assert torch.equal(i, j)
            scale = float(a.abs().max())
            torch.testing.assert_close(b, a, atol=2e-2 * scale + 1e-4, rtol=0)
    pe = g.per_expert(model.config.n_routed_experts)
    assert pe.shape == (len(g.layers), model.config.n_routed_experts)
    torch.testing.assert_close(pe.sum(1), torch.stack([s.sum() for s in g.scores]))


def test_attribute_experts_ablation_known_answer(analytic_dir):
    """Analytic model: positions do not interact, so only the last token's experts move the
    last token's logit; removing expert j there removes p_j M e_{1+j} from the residual."""
    model = load(analytic_dir)
    V = model.config.vocab_size
    for j in range(3):
        t = A.T_EXPERT + j
        att = lens.attribute_experts(model, [1, 2, 3], target=t, method="ablation")
        (s,) = att.scores
        assert att.ids[0][-1].tolist() == [0, 1, 2]
        assert s[:-1].abs().max() == 0
        h = A.hidden(3)
        h_abl = h.clone()
        h_abl[1 + j] -= float(A.probs()[j]) * A.M
        want = (A.logits(h, V)[t] - A.logits(h_abl, V)[t]).item()
        assert s[-1, j].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="not MoE layers"):
        lens.attribute_experts(model, [1, 2], target=3, layers=[0])
    with pytest.raises(ValueError, match="method"):
        lens.attribute_experts(model, [1, 2], target=3, method="shapley")
