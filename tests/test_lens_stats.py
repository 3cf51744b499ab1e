"""Routing statistics (lens/stats.py): known answers on the routing checkpoint of
_lens_helpers.py, where a token whose text holds a digit gets router logit +r on experts 0..5
and -r on 6..11 (and the reverse for any other token) in every MoE layer, with
r = 1 / sqrt(1/D + eps) -- so router entropy, mean probabilities, co-activation and the
vocabulary of each expert have closed forms. Plus the three CLI commands end to end."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from _lens_helpers import BACKENDS, dtype_of, load, routing_dir  # noqa: F401
from tolerances import TOL

from moe_engine import lens
from moe_engine.lens.__main__ import main as lens_main


def _split_vocab(model):
    tok = model.tokenizer
    digit = [i for i in range(tok.vocab_size)
             if any(ch.isdigit() for ch in tok.decode([i], skip_special=False))]
    other = [i for i in range(tok.vocab_size) if i not in set(digit)]
    return digit, other


def _probs(model) -> tuple[float, float]:
    """Router probability of one of the six favoured experts, and of one of the six others."""
    c = model.config
    r = 1.0 / math.sqrt(1.0 / c.hidden_size + c.rms_norm_eps)
    z = 6 * math.exp(r) + 6 * math.exp(-r)
    return math.exp(r) / z, math.exp(-r) / z


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_stats_known_answer(routing_dir, backend):
    model = load(routing_dir, backend)
    digit, other = _split_vocab(model)
    res = lens.router_stats(model, {"d": [digit[:5], digit[5:9]], "w": [other[:7]]},
                            progress=False).to_json()
    hi, lo = _probs(model)
    H = -6 * hi * math.log(hi) - 6 * lo * math.log(lo)
    atol, rtol = TOL["lens_known_answer", getattr(torch, dtype_of(backend))]
    for name, favoured in (("d", range(6)), ("w", range(6, 12))):
        d = res["domains"][name]
        assert d["tokens"] == (9 if name == "d" else 7)
        for l in ("1", "2"):
            v = d["layers"][l]
            assert v["entropy_mean"] == pytest.approx(H, rel=rtol, abs=atol)
            assert v["entropy_std"] == pytest.approx(0.0, abs=max(atol, 1e-6))
            assert v["entropy_fraction"] == pytest.approx(H / math.log(12), rel=rtol, abs=atol)
            assert v["topk_mass"] == pytest.approx(6 * hi, rel=rtol, abs=atol)
            want = [hi if e in favoured else lo for e in range(12)]
            assert v["mean_prob"] == pytest.approx(want, rel=rtol, abs=atol)


def test_coactivation_known_answer(routing_dir):
    """A token picks all six of its group: pairs inside a group co-occur on exactly the tokens
    of that group; pairs across groups never. With a digits and b other tokens, the lift of a
    pair inside the digit group is (a + b) / a."""
    model = load(routing_dir)
    digit, other = _split_vocab(model)
    a, b = 5, 3
    res = lens.coactivation(model, {"m": [digit[:a] + other[:b]]}, progress=False)
    j = res.to_json()
    c = torch.tensor(j["domains"]["m"]["layers"]["1"])
    want = torch.zeros(12, 12, dtype=torch.long)
    want[:6, :6], want[6:, 6:] = a, b
    assert torch.equal(c, want)
    lift = res.lift("m", 1)
    assert lift[0, 1].item() == pytest.approx((a + b) / a)
    assert lift[7, 8].item() == pytest.approx((a + b) / b) and lift[0, 7].item() == 0.0
    k2 = lens.coactivation(model, {"d": [digit[:4]]}, topk=2, progress=False).to_json()
    c2 = torch.tensor(k2["domains"]["d"]["layers"]["2"])
    assert c2[:2, :2].eq(4).all() and int(c2.sum()) == 4 * 4      # ties: experts 0 and 1


def test_vocab_known_answer(routing_dir):
    """Each expert's top tokens are the occurrences of its group's tokens, most frequent first
    (ties: lower id), and every such token went to it every time (share 1)."""
    model = load(routing_dir)
    digit, other = _split_vocab(model)
    d1, d2, d3, w1 = digit[3], digit[1], digit[2], other[4]
    res = lens.vocab(model, {"a": [[d1, d1, d2, w1]], "b": [[d3, d1, w1, w1, w1]]}, top=2,
                     progress=False).to_json()
    assert res["tokens"] == 9 and res["domains"] == ["a", "b"]
    for l in ("1", "2"):
        experts = res["layers"][l]
        for e in range(6):
            assert [(t[1], t[2], t[3]) for t in experts[e]] == \
                [(d1, 3, 1.0), (min(d2, d3), 1, 1.0)]
        for e in range(6, 12):
            assert [(t[1], t[2], t[3]) for t in experts[e]] == [(w1, 4, 1.0)]
    one = lens.vocab(model, {"a": [[d1, w1]]}, layers=[2], topk=1, progress=False).to_json()
    assert list(one["layers"]) == ["2"]
    assert one["layers"]["2"][0][0][1] == d1 and one["layers"]["2"][1] == []
    with pytest.raises(ValueError, match="not MoE layers"):
        lens.vocab(model, {"a": [[d1]]}, layers=[0], progress=False)


@pytest.mark.parametrize("sub", ["router-stats", "coactivation", "vocab"])
def test_stats_cli_end_to_end(sub, routing_dir, tmp_path):
    (tmp_path / "digits.txt").write_text("0123456789" * 20)          # no space: not a digit
    (tmp_path / "words.txt").write_text("hello world and some words " * 10)
    out = tmp_path / "out"
    argv = [sub, "--model", str(routing_dir), "--out", str(out), "--backend", "torch",
            "--dtype", "float32", "--max-len", "48", "--no-progress",
            str(tmp_path / "digits.txt"), str(tmp_path / "words.txt")]
    assert lens_main(argv) == 0
    stem = sub.replace("-", "_")
    data = json.loads((out / f"{stem}.json").read_text())
    assert data["analysis"] == sub
    with open(out / f"{stem}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and sorted(p.name for p in out.glob("*.png"))
    if sub == "router-stats":
        assert len(rows) == 2 * 2                                   # domain x layer
        assert (out / "router_stats_mean_prob.csv").exists()
    elif sub == "coactivation":
        # inside each group every pair co-occurs, across groups none: 21 pairs i <= j per group
        assert len(rows) == 2 * 2 * 21
        assert {r["lift"] for r in rows} == {"1.0"}
    else:
        assert {int(r["expert"]) for r in rows} == set(range(12))
