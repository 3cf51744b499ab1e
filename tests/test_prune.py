"""Expert pruning from routing statistics (moe_engine.prune): the choice of experts against
counts made by hand, the mask file round trip and its use by the lens CLI, perplexity against
lens.topk_sweep, and the command end to end on the routing checkpoint of _lens_helpers.py
(digit tokens route to experts 0..5 only)."""
from __future__ import annotations

import json

import pytest
import torch
from _lens_helpers import load, routing_dir  # noqa: F401

from moe_engine import lens, prune
from moe_engine.lens.__main__ import main as lens_main


def test_choose_experts():
    hits = torch.tensor([[0, 0, 0, 0, 0],            # a dense layer: never masked
                         [5, 40, 30, 20, 5],
                         [10, 10, 10, 10, 10]])
    m = prune.choose_experts(hits, [1, 2], keep=2)
    assert m[0].tolist() == [False] * 5
    assert m[1].tolist() == [True, False, False, True, True]
    assert m[2].tolist() == [False, False, True, True, True]           # ties: lower ids kept
    m = prune.choose_experts(hits, [1, 2], keep_mass=0.7)               # 40+30 = 70 of 100
    assert (~m[1]).nonzero().flatten().tolist() == [1, 2]
    assert int((~m[2]).sum()) == 4                                     # 4 x 10 >= 35
    r = prune.random_like(m, [1, 2], seed=3)
    assert r.sum(1).tolist() == m.sum(1).tolist()
    assert int((~prune.choose_experts(hits, [1, 2], keep_mass=0.7, min_keep=3)[1]).sum()) == 3
    for bad in (dict(keep=0), dict(keep_mass=0.0), dict(keep=2, keep_mass=0.5), {},
                dict(keep=2, min_keep=3)):
        with pytest.raises(ValueError):
            prune.choose_experts(hits, [1, 2], **bad)


def test_mask_file_round_trip(tmp_path):
    m = torch.zeros(3, 8, dtype=torch.bool)
    m[1, [0, 5]] = True
    m[2, 7] = True
    path = prune.save_mask(tmp_path / "mask.json", m, keep=6)
    assert torch.equal(prune.load_mask(path, 3, 8), m)
    with pytest.raises(ValueError, match="is for 3 layers x 8 experts"):
        prune.load_mask(path, 4, 8)
    (tmp_path / "bad.json").write_text(json.dumps({"removed": {}}))
    with pytest.raises(ValueError, match="not an expert mask file"):
        prune.load_mask(tmp_path / "bad.json")


def test_perplexity_matches_topk_sweep(tiny_fp32_dir):
    model = load(tiny_fp32_dir)
    doms = {"a": ["a few words of text to score", "and some more words"], "b": ["x = 1 + 2"]}
    got = prune.perplexity(model, doms)
    sweep = lens.topk_sweep(model, doms, ks=[model.config.num_experts_per_tok], progress=False)
    for n in doms:
        assert got[n]["perplexity"] == pytest.approx(
            sweep.perplexity(n, model.config.num_experts_per_tok), rel=1e-6)
    m = torch.zeros(model.config.num_hidden_layers, model.config.n_routed_experts, dtype=torch.bool)
    m[1, :4] = True
    masked = prune.perplexity(model, doms, expert_mask=m)
    assert masked["a"]["perplexity"] != got["a"]["perplexity"]


def test_prune_cli_end_to_end(routing_dir, tmp_path, capsys):
    """Calibrating on digits keeps experts 0..5 (the only ones digits use), so held-out digits
    route exactly as in the full model; the mask file then drives the lens CLI."""
    (tmp_path / "cal.txt").write_text("0123456789" * 30)
    (tmp_path / "held.txt").write_text("9876543210" * 12)
    out = tmp_path / "out"
    argv = ["--model", str(routing_dir), "--corpus", str(tmp_path / "cal.txt"),
            "--heldout", f"digits={tmp_path / 'held.txt'}", "--out", str(out),
            "--backend", "torch", "--dtype", "float32", "--no-progress"]
    assert prune.main(argv + ["--keep", "6", "--checkpoint"]) == 0
    assert json.loads((out / "model" / "config.json").read_text())["n_routed_experts"] == 6
    mask = prune.load_mask(out / "mask.json")
    assert mask[1].tolist() == [False] * 6 + [True] * 6 and not mask[0].any()
    res = json.loads((out / "prune.json").read_text())
    d = res["domains"]["digits"]
    assert d["calibrated"] == d["full"] and res["calibration_mass_kept"]["1"] == 1.0
    assert "digits" in (out / "prune.csv").read_text()
    # half the mass is 3 of the 6 equally used experts, but a token needs k = 6 to choose from
    assert prune.main(argv + ["--keep-mass", "0.5"]) == 0
    assert (~prune.load_mask(out / "mask.json")[2]).nonzero().flatten().tolist() == list(range(6))
    lo = tmp_path / "lens"
    assert lens_main(["routing", "--model", str(routing_dir), "--out", str(lo), "--backend",
                      "torch", "--dtype", "float32", "--no-progress", "--expert-mask-file",
                      str(out / "mask.json"), str(tmp_path / "held.txt")]) == 0
    pct = json.loads((lo / "routing.json").read_text())["domains"]["held"]["layers"]["1"]["percent"]
    assert pct == [100.0] * 6 + [0.0] * 6
    m = torch.zeros(3, 12, dtype=torch.bool)
    m[1, :3] = True                                    # remove 0..2: digits reroute to 3..8
    prune.save_mask(tmp_path / "m3.json", m)
    assert lens_main(["routing", "--model", str(routing_dir), "--out", str(lo), "--backend",
                      "torch", "--dtype", "float32", "--no-progress", "--expert-mask-file",
                      str(tmp_path / "m3.json"), str(tmp_path / "held.txt")]) == 0
    pct = json.loads((lo / "routing.json").read_text())["domains"]["held"]["layers"]
    assert pct["1"]["percent"] == [0.0] * 3 + [100.0] * 6 + [0.0] * 3
    assert pct["2"]["percent"] == [100.0] * 6 + [0.0] * 6
    capsys.readouterr()
    assert prune.main(argv + ["--keep", "99"]) == 2
    assert capsys.readouterr().err.startswith("error: keep = 99")
    assert prune.main(argv + ["--keep", "4"]) == 2                      # fewer than k = 6
    assert "routed to 6 experts" in capsys.readouterr().err


def test_pruned_checkpoint_equals_masked_model(tiny_fp32_dir, tmp_path):
    """Dropping experts and their router rows gives the masked model (mode reroute) exactly
    when the top-k weights are renormalised (the smaller softmax then cancels)."""
    model = load(tiny_fp32_dir)
    L, E = model.config.num_hidden_layers, model.config.n_routed_experts
    m = torch.zeros(L, E, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for l in model.config.moe_layers:
        m[l, torch.randperm(E, generator=g)[:E // 2]] = True
    small = load(prune.write_pruned_checkpoint(tiny_fp32_dir, tmp_path / "small", m))
    assert small.config.n_routed_experts == E - E // 2
    ids = torch.tensor(model.tokenizer.encode("prune the experts and compare the logits"))
    want = model.forward(ids, expert_mask=m, mask_mode="reroute", renormalize=True)
    got = small.forward(ids, renormalize=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bad = m.clone()
    bad[1, ~m[1]] = True
    with pytest.raises(ValueError, match="same number"):
        prune.write_pruned_checkpoint(tiny_fp32_dir, tmp_path / "bad", bad)
