"""The runtime on the torch (reference) backend against the independent oracle in oracle.py,
plus KV-cache, batching, interventions and input validation."""
import pytest
import torch

import moe_engine
from moe_engine import Capture, TapRequest

import oracle
from tolerances import assert_close

IDS7 = [1, 5, 9, 200, 3, 77, 301]
IDS17 = [(i * 37 + 11) % 500 for i in range(17)]


@pytest.fixture(scope="module")
def raw32(tiny_fp32_dir):
    return oracle.read_raw(tiny_fp32_dir, torch.float32)


@pytest.mark.parametrize("ids", [IDS7, IDS17, [42]], ids=["T7", "T17", "T1"])
def test_logits_match_oracle_fp32(tiny_fp32, raw32, ids):
    cfg, w = raw32
    got = tiny_fp32.forward(ids)[0]
    want = oracle.forward(cfg, w, ids, fp32_router=True)
    assert_close(got, want, "model_logits", torch.float32, f"T={len(ids)}")


def test_logits_match_oracle_bf16(tiny_dir):
    m = moe_engine.load(tiny_dir, dtype="bfloat16", backend="torch", progress=False)
    cfg, w = oracle.read_raw(tiny_dir, torch.bfloat16)
    got = m.forward(IDS17)[0]
    want = oracle.forward(cfg, w, IDS17)  # the remote code's bf16 router + bf16 accumulation
    assert_close(got, want, "model_logits", torch.bfloat16, "T=17 remote-code rounding")


@pytest.mark.parametrize("topk", [0, 1, 3, 8])
def test_topk_override_matches_oracle(tiny_fp32, raw32, topk):
    cfg, w = raw32
    got = tiny_fp32.forward(IDS7, topk=topk)[0]
    want = oracle.forward(cfg, w, IDS7, topk=topk, fp32_router=True)
    assert_close(got, want, "model_logits", torch.float32, f"topk={topk}")


def test_per_layer_topk(tiny_fp32, raw32):
    cfg, w = raw32
    got = tiny_fp32.forward(IDS7, topk=[None, 1, 4])[0]
    want = oracle.forward(cfg, w, IDS7, topk={1: 1, 2: 4}, fp32_router=True)
    assert_close(got, want, "model_logits", torch.float32, "topk per layer")


@pytest.mark.parametrize("mode", ["reroute", "zero"])
@pytest.mark.parametrize("renorm", [False, True])
def test_mask_modes_match_oracle(tiny_fp32, raw32, mode, renorm):
    cfg, w = raw32
    mask = {1: [0, 3, 5], 2: [7]}
    got = tiny_fp32.forward(IDS7, expert_mask=mask, mask_mode=mode, renormalize=renorm)[0]
    want = oracle.forward(cfg, w, IDS7, mask=mask, mask_mode=mode, renormalize=renorm, fp32_router=True)
    assert_close(got, want, "model_logits", torch.float32, f"mask {mode} renorm={renorm}")
    plain = tiny_fp32.forward(IDS7)[0]
    assert (got - plain).abs().max() > 1e-3, "the mask changed nothing"


def test_force_expert_matches_oracle(tiny_fp32, raw32):
    cfg, w = raw32
    got = tiny_fp32.forward(IDS7, force_experts={1: 6, 2: 2})[0]
    want = oracle.forward(cfg, w, IDS7, force={1: 6, 2: 2}, fp32_router=True)
    assert_close(got, want, "model_logits", torch.float32, "force_experts")


def test_mask_hand_computed_route(tiny_fp32):
    """reroute: the masked expert never appears and the next-best slides in; zero: same ids as
    unmasked, the masked expert's weight is 0."""
    cap = Capture(TapRequest(["blocks.1.moe.hook_topk_ids", "blocks.1.moe.hook_topk_weights",
                              "blocks.1.moe.hook_router_probs"]))
    tiny_fp32.forward(IDS7, capture=cap)
    ids0, probs = cap["blocks.1.moe.hook_topk_ids"], cap["blocks.1.moe.hook_router_probs"]
    top = int(ids0[0, 0])
    for mode in ("reroute", "zero"):
        c = Capture(TapRequest(["blocks.1.moe.hook_topk_ids", "blocks.1.moe.hook_topk_weights"]))
        tiny_fp32.forward(IDS7, capture=c, expert_mask={1: [top]}, mask_mode=mode)
        ids, wts = c["blocks.1.moe.hook_topk_ids"], c["blocks.1.moe.hook_topk_weights"]
        if mode == "reroute":
            assert not (ids == top).any()
            order = torch.sort(-probs[0], stable=True).indices
            want = [int(e) for e in order if int(e) != top][:2]
            assert ids[0].tolist() == want
            assert torch.allclose(wts[0], probs[0, want])
        else:
            assert torch.equal(ids, ids0)
            assert float(wts[0, 0]) == 0.0


def test_kv_cache_decode_equals_full_recompute(tiny_fp32):
    full = tiny_fp32.forward(IDS17)[0]
    cache = tiny_fp32.new_cache(1, 17)
    parts = [tiny_fp32.forward(IDS17[:9], cache=cache)[0]]
    for t in IDS17[9:]:
        parts.append(tiny_fp32.forward([t], cache=cache)[0])
    assert_close(torch.cat(parts), full, "model_logits", torch.float32, "kv-cache")


def test_batched_equals_one_by_one(tiny_fp32):
    prompts = [IDS7, IDS17, [3, 4]]
    P = max(map(len, prompts))
    ids = torch.zeros(3, P, dtype=torch.long)
    mask = torch.zeros(3, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = True
    cache = tiny_fp32.new_cache(3, P + 3)
    out = tiny_fp32.forward(ids, attention_mask=mask, cache=cache)
    nxt = torch.tensor([[10], [20], [30]])
    step = tiny_fp32.forward(nxt, cache=cache)
    for i, p in enumerate(prompts):
        alone = tiny_fp32.forward(p + [int(nxt[i])])[0]
        assert_close(out[i, P - len(p):], alone[:-1], "model_logits", torch.float32, f"prefill seq {i}")
        assert_close(step[i, 0], alone[-1], "model_logits", torch.float32, f"decode seq {i}")


def test_usage_counters_skip_padding(tiny_fp32):
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    usage = tiny_fp32.new_usage_counters()
    tiny_fp32.forward(ids, attention_mask=mask, usage=usage, topk=2)
    assert usage[0].sum() == 0  # dense layer
    assert usage[1].sum() == 2 * 6 and usage[2].sum() == 2 * 6


@pytest.mark.parametrize("bad,msg", [
    (dict(input_ids=[1, 512]), "outside the vocabulary"),
    (dict(input_ids=[1, -1]), "outside the vocabulary"),
    (dict(input_ids=[1, 2], topk=9), "out of range"),
    (dict(input_ids=[1, 2], topk=-1), "out of range"),
    (dict(input_ids=[1, 2], expert_mask={1: list(range(8))}), "removes every one"),
    (dict(input_ids=[1, 2], expert_mask={1: list(range(7))}), "leaves only 1"),
    (dict(input_ids=[1, 2], expert_mask={1: [8]}), "out of range"),
    (dict(input_ids=[1, 2], mask_mode="drop"), "mask_mode"),
    (dict(input_ids=[1, 2], topk=[1, 2]), "one per layer"),
    (dict(input_ids=[1, 2], force_experts={1: 8}), "force_expert"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1, 0]]), "left-padded"),
    (dict(input_ids=[1.5]), "integer token ids"),
])
def test_bad_input_is_refused_with_a_clear_message(tiny_fp32, bad, msg):
    bad = dict(bad)
    ids = bad.pop("input_ids")
    with pytest.raises(ValueError, match=msg):
        tiny_fp32.forward(ids, **bad)


def test_prompt_longer_than_context_is_refused(tiny_fp32):
    with pytest.raises(ValueError, match="context"):
        tiny_fp32.forward([1] * 513)
    with pytest.raises(ValueError, match="context"):
        tiny_fp32.generate("hello", max_new_tokens=600)


def test_two_calls_with_different_settings_do_not_interfere(tiny_fp32):
    a1 = tiny_fp32.forward(IDS7, topk=1)
    b = tiny_fp32.forward(IDS7, expert_mask={1: [0, 1, 2, 3]})
    a2 = tiny_fp32.forward(IDS7, topk=1)
    plain = tiny_fp32.forward(IDS7)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, plain) and not torch.equal(b, plain)


@pytest.mark.parametrize("rope", [None, {"type": "linear", "factor": 4.0}, {"type": "dynamic", "factor": 2.0}])
def test_rope_matches_the_published_formulas(tiny_dir, rope):
    """cos/sin for positions inside and beyond the context, against the formulas of the
    remote code (LlamaLinearScaling / LlamaDynamicNTKScaling rotary embeddings)."""
    m = moe_engine.load(tiny_dir, dtype="float32", backend="torch", progress=False)
    c = m.config
    if rope is not None:
        from moe_engine.config import ModelConfig
        c = ModelConfig.from_dict({**c.to_dict(), "rope_scaling": rope})
        m = moe_engine.Model(c, m.weights, backend="torch")
    hd, base, ctx = c.head_dim, c.rope_theta, c.max_position_embeddings
    for seq_len in (7, ctx, ctx + 37):
        if rope is None and seq_len > ctx:
            continue
        pos = torch.tensor([[0, 1, seq_len - 2, seq_len - 1]])
        b, t = base, pos.double()
        if rope is not None and rope["type"] == "linear":
            t = t / rope["factor"]
        if rope is not None and rope["type"] == "dynamic" and seq_len > ctx:
            f = rope["factor"]
            b = base * ((f * seq_len / ctx) - (f - 1)) ** (hd / (hd - 2))
        inv = 1.0 / (b ** (torch.arange(0, hd, 2).double() / hd))
        emb = torch.cat([t.unsqueeze(-1) * inv] * 2, -1)
        cos, sin = m._rope(pos, seq_len)
        torch.testing.assert_close(cos.double(), emb.cos(), atol=2e-5, rtol=0, msg=f"cos {rope} {seq_len}")
        torch.testing.assert_close(sin.double(), emb.sin(), atol=2e-5, rtol=0, msg=f"sin {rope} {seq_len}")
