"""Lens taps on every available backend (docs/design.md §6, docs/lens.md): the residual and
MoE invariants, capture changes nothing bit for bit, position selection, rows traceable to
(sequence, position, step) during generate, usage counters, and empty expert views.

Tolerances (one table): the invariants compare tensors the engine rounded separately to the
model dtype, so they hold to that dtype's rounding.
"""
from __future__ import annotations

import pytest
import torch
from _lens_helpers import BACKEND_DTYPES, BACKENDS, TOL, dtype_of, load

from moe_engine import Capture, Patch, TapRequest, lens
from moe_engine.model import left_pad

PROMPTS = ("The quick brown fox", "1 + 2 = 3, and then some more words follow")

_models: dict = {}


def model_for(path, backend, dtype=None):
    dtype = dtype_of(backend) if dtype is None else dtype
    key = (str(path), backend, dtype)
    if key not in _models:
        _models[key] = load(path, backend=backend, dtype=dtype)
    return _models[key]


def batch(model, prompts=PROMPTS):
    """Left-padded prompts of different lengths: [B, Q] ids and mask."""
    enc = [model.tokenizer.encode(p) for p in prompts]
    ids, mask = left_pad(enc, model.device)
    return ids, mask, enc


# 14 tokens (<= 16) take the kernels' small-batch decode path, ~25 the grouped-GEMM path.
SIZES = {"decode": ("Hi there, few tokens",), "prefill": PROMPTS}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_invariants(tiny_fp32_dir, backend, dtype, size):
    model = model_for(tiny_fp32_dir, backend, dtype)
    c = model.config
    ids, mask, enc = batch(model, SIZES[size])
    N = int(mask.sum())
    cap = Capture(TapRequest(["*"]))
    usage = model.new_usage_counters()
    model.forward(ids, attention_mask=mask, capture=cap, usage=usage)
    tol = TOL[dtype]
    f = lambda name: cap[name].float()  # noqa: E731
    for l in range(c.num_hidden_layers):
        p = f"blocks.{l}."
        torch.testing.assert_close(f(p + "hook_resid_mid"),
                                   f(p + "hook_resid_pre") + f(p + "hook_attn_out"), **tol)
        if l not in c.moe_layers:
            assert not any(n.startswith(p + "moe.") for n in cap.keys())
            torch.testing.assert_close(f(p + "hook_resid_post"),
                                       f(p + "hook_resid_mid") + f(p + "hook_mlp_out"), **tol)
            continue
        m = p + "moe."
        k, E, D = c.num_experts_per_tok, c.n_routed_experts, c.hidden_size
        probs, eo = f(m + "hook_router_probs"), f(m + "hook_expert_out")
        ids_l, w = cap[m + "hook_topk_ids"], cap[m + "hook_topk_weights"]
        assert probs.shape == (N, E) and ids_l.shape == w.shape == (N, k)
        assert eo.shape == (N, k, D)
        # resid_post = resid_mid + routed_out + shared_out
        routed, shared = f(m + "hook_routed_out"), f(m + "hook_shared_out")
        torch.testing.assert_close(f(p + "hook_resid_post"),
                                   f(p + "hook_resid_mid") + routed + shared, **tol)
        torch.testing.assert_close(f(p + "hook_mlp_out"), routed + shared, **tol)
        # routed_out = sum_j w_j expert_out_j
        torch.testing.assert_close(f(m + "hook_routed_out"), (w.unsqueeze(-1) * eo).sum(1), **tol)
        # probabilities: rows sum to 1, sum over everything = T; the weights are the raw probs
        torch.testing.assert_close(probs.sum(-1), torch.ones(N, device=probs.device),
                                   rtol=0, atol=1e-5)
        assert abs(float(probs.sum()) - N) < 1e-3
        torch.testing.assert_close(w, probs.gather(1, ids_l.long()), rtol=0, atol=0)
        assert bool((w[:, :-1] >= w[:, 1:]).all()), "slot order must be rank order"
        # hits: k per token, and the counters count exactly the captured choices
        assert int(usage[l].sum()) == k * N
        counted = torch.bincount(ids_l.long().flatten().cpu(), minlength=E)
        assert torch.equal(usage[l].long().cpu(), counted)
    assert int(usage[0].sum()) == 0                                       # dense layer
    assert cap["logits"].shape == (N, c.vocab_size)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_capture_changes_nothing(tiny_fp32_dir, backend, dtype):
    """Bit-identical logits and usage with and without every tap captured."""
    model = model_for(tiny_fp32_dir, backend, dtype)
    ids, mask, _ = batch(model)
    u0, u1 = model.new_usage_counters(), model.new_usage_counters()
    plain = model.forward(ids, attention_mask=mask, usage=u0)
    cap = Capture(TapRequest(["*"]))
    tapped = model.forward(ids, attention_mask=mask, usage=u1, capture=cap)
    assert torch.equal(plain, tapped)
    assert torch.equal(u0, u1)
    last = model.forward(ids, attention_mask=mask, logits="last")
    last_tapped = model.forward(ids, attention_mask=mask, logits="last",
                                capture=Capture(TapRequest(["blocks.*"], positions="last")))
    assert torch.equal(last, last_tapped)


def test_positions_select_rows(tiny_fp32_dir):
    model = model_for(tiny_fp32_dir, "torch")
    ids, mask, enc = batch(model)
    lens_ = [len(e) for e in enc]
    name = "blocks.1.moe.hook_topk_ids"
    full = Capture(TapRequest([name]))
    model.forward(ids, attention_mask=mask, capture=full)
    all_rows = [(s, p, 0) for s, n in enumerate(lens_) for p in range(n)]
    assert full.rows(name).tolist() == [list(r) for r in all_rows]

    def check(positions, want):
        cap = Capture(TapRequest([name], positions=positions))
        model.forward(ids, attention_mask=mask, capture=cap)
        got = [tuple(r) for r in cap.rows(name).tolist()]
        assert got == want, positions
        idx = [all_rows.index(r) for r in want]
        assert torch.equal(cap[name], full[name][idx])

    check("last", [(s, n - 1, 0) for s, n in enumerate(lens_)])
    check(slice(1, 4), [r for r in all_rows if 1 <= r[1] < 4])
    check(slice(0, None, 3), [r for r in all_rows if r[1] % 3 == 0])
    check([0, 2], [r for r in all_rows if r[1] in (0, 2)])
    bool_mask = torch.zeros_like(mask)
    bool_mask[1, -2] = True                      # second sequence, its second-to-last token
    check(bool_mask, [(1, lens_[1] - 2, 0)])


def test_layer_filter_and_unknown_names(tiny_fp32_dir):
    model = model_for(tiny_fp32_dir, "torch")
    ids, mask, _ = batch(model)
    cap = Capture(TapRequest(["blocks.*.moe.hook_topk_ids"], layers=[2]))
    model.forward(ids, attention_mask=mask, capture=cap)
    assert list(cap.keys()) == ["blocks.2.moe.hook_topk_ids"]
    with pytest.raises(ValueError, match="matches no tap"):
        model.forward(ids, capture=Capture(TapRequest(["blocks.0.moe.hook_topk_ids"])))  # dense


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_rows_traceable(tiny_fp32_dir, backend):
    """Every captured row during generate names (sequence, position, step); decode-step rows
    equal a teacher-forced forward of the prompt plus the generated tokens (in fp32; in bf16
    the decode path rounds differently, so near-ties may pick another expert: mostly equal)."""
    model = model_for(tiny_fp32_dir, backend)
    names = ["blocks.1.moe.hook_topk_ids", "blocks.2.hook_resid_post"]
    cap = Capture(TapRequest(names))
    n_new = 3
    outs = model.generate(list(PROMPTS), max_new_tokens=n_new, capture=cap, backend=backend)
    enc = [model.tokenizer.encode(p) for p in PROMPTS]
    rows = cap.rows(names[0]).tolist()
    want = [[s, p, 0] for s, e in enumerate(enc) for p in range(len(e))]
    for step in range(1, n_new):        # the last sampled token is never fed back
        want += [[s, len(e) + step - 1, step] for s, e in enumerate(enc)]
    assert rows == want
    assert cap.rows(names[1]).tolist() == want
    for s, (e, o) in enumerate(zip(enc, outs)):
        full = e + o.token_ids[:n_new - 1]
        ref = Capture(TapRequest(names))
        model.forward(torch.tensor(full, device=model.device), capture=ref, backend=backend)
        sel = [i for i, r in enumerate(rows) if r[0] == s]
        if model.dtype == torch.float32:
            assert torch.equal(cap[names[0]][sel], ref[names[0]])
            torch.testing.assert_close(cap[names[1]][sel], ref[names[1]], **TOL["float32"])
        else:
            same = (cap[names[0]][sel] == ref[names[0]]).all(1).float().mean()
            assert same >= 0.8, f"{backend}: only {same:.0%} of rows chose the same experts"
            cos = torch.nn.functional.cosine_similarity(cap[names[1]][sel].float(),
                                                        ref[names[1]].float(), dim=-1)
            assert cos.min() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_usage_counters_accumulate_reset_and_follow_per_layer_k(tiny_fp32_dir, backend):
    model = model_for(tiny_fp32_dir, backend)
    ids, mask, _ = batch(model)
    N = int(mask.sum())
    k = model.config.num_experts_per_tok
    usage = model.new_usage_counters()
    model.forward(ids, attention_mask=mask, usage=usage)
    model.forward(ids, attention_mask=mask, usage=usage)
    assert usage.sum(1).tolist() == [0, 2 * k * N, 2 * k * N]
    usage.zero_()
    model.forward(ids, attention_mask=mask, usage=usage, topk={1: 1, 2: 3})
    assert usage.sum(1).tolist() == [0, N, 3 * N]
    assert usage.dtype == torch.int32 and usage.device == model.device


def test_expert_view_empty_and_full(tiny_fp32_dir):
    model = model_for(tiny_fp32_dir, "torch")
    ids, mask, _ = batch(model)
    names = [f"blocks.*.moe.hook_{t}" for t in ("topk_ids", "topk_weights", "expert_out")]
    cap = Capture(TapRequest(names))
    model.forward(ids, attention_mask=mask, capture=cap, expert_mask={1: [0]})
    v = lens.expert_view(cap, 1, 0)
    D = model.config.hidden_size
    assert v.rows.numel() == 0 and v.out.shape == (0, D) and v.weights.shape == (0,)
    hits = cap["blocks.1.moe.hook_topk_ids"] == 3
    v3 = lens.expert_view(cap, 1, 3)
    assert v3.rows.numel() == int(hits.sum())
    assert torch.equal(v3.out, cap["blocks.1.moe.hook_expert_out"][hits])


def test_a_plain_capture_copies_no_activation(tiny_fp32, monkeypatch):
    """Taps cost nothing unless they patch: capturing every tap adds no clone and no write-back
    to the forward (counted on torch's dispatch), padded batch or not; the captured rows are
    the ones an identity patch (which does rebuild the activations) sees, and the logits are
    the same bits."""
    from torch.overrides import TorchFunctionMode

    class Copies(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.clone, torch.clone, torch.Tensor.__setitem__, torch.Tensor.index_put_):
                self.n += 1
            return func(*args, **(kwargs or {}))

    m = tiny_fp32
    for prompts in ([[5, 9, 11, 300, 2], [17, 4]], [[5, 9, 11], [17, 4, 8]]):
        ids, mask = left_pad(prompts)
        m(ids, attention_mask=mask)  # warm: the model's routing controls are built once and kept
        counts, caps, outs = [], [], []
        for cap in (None, Capture(TapRequest(["*"])),
                    Capture(TapRequest(["*"]), patches=[Patch("*", lambda x, ctx: x)])):
            with Copies() as c:
                outs.append(m(ids, attention_mask=mask, capture=cap))
            counts.append(c.n)
            caps.append(cap)
        assert counts[1] == counts[0], f"a plain capture copied activations ({counts[1] - counts[0]} copies)"
        assert counts[2] > counts[0], "the identity patch must rebuild activations (else this test shows nothing)"
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        assert sorted(caps[1].keys()) == sorted(caps[2].keys())
        for name in caps[1].keys():
            assert torch.equal(caps[1][name], caps[2][name]), name
