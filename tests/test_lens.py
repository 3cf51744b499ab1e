"""The MoE Lens analyses: a known answer for each (checkpoints built so the answer is known in
closed form, see _lens_helpers.py), the logit lens against the model's own output, corpus
chunking, taps streamed to disk, and the CLI end to end on a tiny checkpoint (JSON + PNG).

The known-answer tests run on every available backend, in fp32 where the backend can (torch,
cpu) and bf16 on emu/cuda; closed forms are float64; tolerances.py ("lens_known_answer").
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from _lens_helpers import (BACKENDS, Analytic, analytic_dir, dtype_of, load,  # noqa: F401
                           routing_dir)
from tolerances import TOL
from PIL import Image

from moe_engine import Capture, TapRequest, lens
from moe_engine.lens.__main__ import main as lens_main

A = Analytic


def approx(expected, backend):
    atol, rtol = TOL["lens_known_answer", getattr(torch, dtype_of(backend))]
    return pytest.approx(expected, rel=rtol, abs=atol)


# ---- 1. routing ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "digits.txt").write_text("0123456789" * 30 + "9876543210" * 7)  # no "\n": not a digit
    (d / "words").mkdir()
    (d / "words" / "a.txt").write_text("hello world, the quick brown fox jumps over a dog\n" * 8)
    (d / "words" / "b.jsonl").write_text(json.dumps({"text": "some more plain words here"}) + "\n")
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_known_answer(routing_dir, two_domains, backend):
    """Digit tokens go exactly to experts 0..5, all other tokens to 6..11, in every MoE layer;
    with k = 2 the tie between six equal logits goes to the two lowest ids. Exact in any dtype."""
    model = load(routing_dir, backend)
    tok = model.tokenizer
    n_digits = len(tok.encode("0123456789" * 30 + "9876543210" * 7, add_bos=False))
    res = lens.route_corpus(model, [two_domains / "digits.txt", two_domains / "words"], max_len=64,
                            batch_tokens=256, progress=False)
    j = res.to_json()
    assert j["uniform_percent"] == {"1": 50.0, "2": 50.0}
    digits, words = j["domains"]["digits"], j["domains"]["words"]
    assert digits["tokens"] == n_digits
    for l in ("1", "2"):
        assert digits["layers"][l]["percent"] == [100.0] * 6 + [0.0] * 6
        assert words["layers"][l]["percent"] == [0.0] * 6 + [100.0] * 6
        assert sum(digits["layers"][l]["hits"]) == 6 * n_digits
        assert digits["layers"][l]["experts_for_half"] == 3
    res2 = lens.route_corpus(model, {"d": two_domains / "digits.txt", "w": two_domains / "words"},
                             topk=2, progress=False)
    j2 = res2.to_json()
    assert j2["topk"] == [0, 2, 2]
    assert j2["domains"]["d"]["layers"]["1"]["percent"] == [100.0, 100.0] + [0.0] * 10
    assert j2["domains"]["w"]["layers"]["2"]["percent"] == [0.0] * 6 + [100.0, 100.0] + [0.0] * 4


@pytest.mark.parametrize("preset", ["paper", "paper-as-run"])
def test_routing_paper_presets_known_answer(routing_dir, tmp_path, preset):
    """The paper presets take one document per non-empty stripped line; paper-as-run divides
    the hits by the whole file's token count, as the MoE Lens routing code did."""
    model = load(routing_dir)
    tok = model.tokenizer
    text = "0123 4567 ab\n\n   89 x01  \n"
    (tmp_path / "d.txt").write_text(text)
    res = lens.route_corpus(model, [tmp_path / "d.txt"], preset=preset, progress=False).to_json()
    d = res["domains"]["d"]
    ids = tok.encode("0123 4567 ab", add_bos=False) + tok.encode("89 x01", add_bos=False)
    digit = [any(ch.isdigit() for ch in tok.decode([i], skip_special=False)) for i in ids]
    hits = [sum(digit)] * 6 + [len(ids) - sum(digit)] * 6
    den = len(tok.encode(text, add_bos=False)) if preset == "paper-as-run" else len(ids)
    assert (d["tokens"], d["samples"], d["denominator"]) == (len(ids), 2, den)
    assert res["preset"] == preset
    for l in ("1", "2"):
        assert d["layers"][l]["hits"] == hits
        assert d["layers"][l]["percent"] == pytest.approx([100.0 * h / den for h in hits])


# ---- 2. early decoding and the logit lens ----------------------------------------------------

def _expect_top(h, vocab, n, norm="final"):
    lp = Analytic.logprobs(h, vocab, norm)
    v, i = torch.topk(lp, n)
    return i.tolist(), v.exp()


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_decode_known_answer(analytic_dir, backend):
    model = load(analytic_dir, backend)
    V = model.tokenizer.vocab_size
    res = lens.early_decode(model, [1, 2, 3, 4, 5], top=3).to_json()
    l0, l1 = res["layers"]
    assert not l0["moe"] and l1["moe"]
    assert l1["experts"] == [0, 1, 2]
    assert l1["weights"] == approx(A.probs()[:3].tolist(), backend)
    # layer 0 writes nothing: its output is a = e0, which decodes to T_BASE
    assert l0["layer_out"][0][2] == A.T_BASE
    for k in range(1, 4):
        ids, probs = _expect_top(A.hidden(k), V, 3)
        got = l1["cumulative"][k - 1]
        # the third is one of the ~500 tokens with logit 0: compare its probability only
        assert ids[:2] == [c[2] for c in got[:2]]
        assert [c[1] for c in got] == approx(probs.tolist(), backend)
    # a single expert j alone (unweighted, |E_j| = 3 > |a| = 1) votes for its own token
    for j in range(3):
        assert l1["single"][j][0][2] == A.T_EXPERT + j
    # the layer output of the last layer is H^{l_K} (shared experts write nothing here)
    assert l1["layer_out"] == l1["cumulative"][-1]
    # every cell carries the raw logit of its token: norm="final" -> lm_head(RMSNorm(h))
    z = A.logits(A.hidden(2), V)
    assert [c[3] for c in l1["cumulative"][1][:2]] == approx(z[[c[2] for c in l1["cumulative"][1][:2]]].tolist(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["paper", "paper-as-run"])
def test_early_decode_paper_presets_known_answer(analytic_dir, backend, preset):
    """The MoE Lens code's early decoding: base a (the residual before post_attention_layernorm),
    raw weights, lm_head without the final norm, raw logits as the score. As run, its stored
    expert outputs were w_j E_j: columns a + w_j E_j and a + sum_{j<=k} w_j^2 E_j."""
    model = load(analytic_dir, backend)
    V = model.tokenizer.vocab_size
    weighted = preset == "paper-as-run"
    res = lens.early_decode(model, [1, 2, 3], top=2, preset=preset).to_json()
    assert (res["norm"], res["base"], res["score"], res["weighted_expert_out"]) == \
        ("none", "resid_mid", "logit", weighted)
    l1 = res["layers"][1]
    for k in range(1, 4):
        h = A.hidden(k, weighted=weighted)
        ids, probs = _expect_top(h, V, 2, norm="none")
        got = l1["cumulative"][k - 1]
        assert [c[2] for c in got] == ids
        assert [c[1] for c in got] == approx(probs.tolist(), backend)
        assert [c[3] for c in got] == approx(A.logits(h, V, "none")[ids].tolist(), backend)
    for j in range(3):
        h = A.single(j, weighted=weighted)
        ids, probs = _expect_top(h, V, 1, norm="none")
        assert l1["single"][j][0][2] == ids[0]
        assert l1["single"][j][0][1] == approx(probs[0].item(), backend)
    # as run, w_1 |E_1| > |a| but w_2 |E_2| < |a|: the second single column decodes a's token
    if weighted:
        assert [l1["single"][j][0][2] for j in range(2)] == [A.T_EXPERT, A.T_BASE]


def test_logit_lens_reproduces_model_and_targets(tiny_fp32_dir):
    """Decoding the last layer's output through the final norm IS the model's output; targets
    and full log-probs agree with the top-n; no [N, K, V] tensor unless asked."""
    model = load(tiny_fp32_dir)
    ids = torch.tensor(model.tokenizer.encode("The lens decodes every layer 12345"))
    L = model.config.num_hidden_layers
    cap = Capture(TapRequest([f"blocks.{L - 1}.hook_resid_post", *lens.lens_tap_names()]))
    logits = model.forward(ids, capture=cap)[0]
    V = model.tokenizer.vocab_size
    ref = torch.log_softmax(logits[:, :V], -1)
    out = lens.logit_lens(model, cap[f"blocks.{L - 1}.hook_resid_post"], top=4,
                          targets=ids, full=True)
    torch.testing.assert_close(out.logprobs, ref, rtol=0, atol=1e-5)
    assert torch.equal(out.top_ids, torch.topk(ref, 4).indices)
    torch.testing.assert_close(out.target_logprobs, ref.gather(1, ids.view(-1, 1)).squeeze(1),
                               rtol=0, atol=1e-5)
    H = lens.cumulative(cap, 1)                                          # [N, K, D]
    lo = lens.logit_lens(model, H, top=2)
    assert lo.top_ids.shape == (ids.numel(), 2, 2) and lo.logprobs is None
    assert len(lo.tokens(model.tokenizer)) == ids.numel()


def test_cumulative_at_k_plus_shared_is_layer_output(tiny_fp32_dir):
    model = load(tiny_fp32_dir)
    ids = torch.tensor(model.tokenizer.encode("residual stream bookkeeping"))
    cap = Capture(TapRequest(["blocks.*.hook_resid_post", "blocks.*.moe.hook_shared_out",
                              "blocks.*.moe.hook_topk_ids", *lens.lens_tap_names()]))
    model.forward(ids, capture=cap)
    for l in model.config.moe_layers:
        H = lens.cumulative(cap, l)
        torch.testing.assert_close(H[:, -1] + cap[f"blocks.{l}.moe.hook_shared_out"],
                                   cap[f"blocks.{l}.hook_resid_post"], rtol=1e-5, atol=1e-5)
        S = lens.single(cap, l)
        e = cap[f"blocks.{l}.moe.hook_expert_out"]
        a = cap[f"blocks.{l}.hook_resid_mid"].unsqueeze(1)
        torch.testing.assert_close(S - a, e, rtol=0, atol=1e-6)
        # renormalised: H^{l_1} = base + E_1 exactly
        Hr = lens.cumulative(cap, l, renormalize=True)
        torch.testing.assert_close(Hr[:, 0], S[:, 0], rtol=1e-6, atol=1e-6)


# ---- 3. perplexity vs top-k ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_sweep_known_answer(analytic_dir, backend):
    """Every position sees the same hidden state, so a sample's perplexity is exp of the mean
    -log P_k(next token) under the closed-form distribution; the domain score is the geometric
    mean over samples."""
    model = load(analytic_dir)
    V = model.config.vocab_size                 # perplexity uses the model's full softmax
    t0, tb, t1 = A.T_EXPERT, A.T_BASE, A.T_EXPERT + 1
    domains = {"a": [[t0] * 6, [tb] * 4], "b": [[t1, tb, t1, tb, t1]]}
    res = lens.topk_sweep(model, domains, progress=False, batch_tokens=16)
    j = res.to_json()
    assert j["ks"] == [1, 2, 3] and j["reference_k"] == 3
    for k in (1, 2, 3):
        lp = A.logprobs(A.hidden(k), V)
        a = [-lp[t0].item(), -lp[tb].item()]
        b = (-2 * lp[tb] - 2 * lp[t1]).item() / 4
        assert res.domains["a"]["log_ppl"][k] == approx(a, backend)
        geo = math.exp(sum(a) / 2)
        assert j["domains"]["a"]["perplexity"][str(k)] == approx(geo, backend)
        assert j["domains"]["b"]["perplexity"][str(k)] == approx(math.exp(b), backend)
    da = j["domains"]["a"]
    assert da["log_perplexity_ratio"]["3"] == 1.0
    assert da["samples"] == 2 and da["tokens"] == 10
    # the paper's two normalisations, per domain over k: min-max of log(geometric mean) and of
    # the arithmetic mean of per-sample perplexities
    logs = [math.log(da["perplexity"][str(k)]) for k in (1, 2, 3)]
    lo, hi = min(logs), max(logs)
    assert [da["minmax_log_perplexity"][str(k)] for k in (1, 2, 3)] == \
        pytest.approx([(x - lo) / (hi - lo) for x in logs])
    mean = [sum(da["per_sample_perplexity"][str(k)]) / 2 for k in (1, 2, 3)]
    assert [da["mean_perplexity"][str(k)] for k in (1, 2, 3)] == pytest.approx(mean)
    assert sorted(da["minmax_mean_perplexity"].values())[::2] == [0.0, 1.0]


@pytest.mark.parametrize("preset", ["paper", "paper-as-run"])
def test_topk_sweep_paper_pools_chunks_per_document(analytic_dir, preset):
    """The paper presets score a document, not a chunk: a document longer than max_len is cut
    into chunks (BOS only on the first; each chunk's first token predicts nothing), and its
    perplexity is exp of the mean NLL over all its chunks' predictions."""
    model = load(analytic_dir)
    V = model.config.vocab_size
    t0, tb = A.T_EXPERT, A.T_BASE
    doc = [t0, tb, tb, t0, tb, t0, t0]                 # chunks [t0 tb tb t0] [tb t0 t0] at 4
    res = lens.topk_sweep(model, {"d": [doc, [tb, t0]]}, ks=[1, 3], preset=preset, max_len=4,
                          progress=False)
    for k in (1, 3):
        lp = A.logprobs(A.hidden(k), V)
        nll = {t: -lp[t].item() for t in (t0, tb)}
        pooled = (nll[tb] + nll[tb] + nll[t0] + nll[t0] + nll[t0]) / 5   # 3 + 2 predictions
        assert res.domains["d"]["log_ppl"][k] == pytest.approx([pooled, nll[t0]], rel=1e-5)
    assert res.domains["d"]["samples"] == 2 and res.domains["d"]["tokens"] == 9
    notes = lens.topk_sweep(model, {"d": [doc]}, ks=[3], max_len=4, progress=False)
    assert len(notes.domains["d"]["log_ppl"][3]) == 2                    # a chunk per sample


# ---- 4. single-vs-ensemble similarity ------------------------------------------------------

def _cos(x, y):
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_known_answer(analytic_dir, backend):
    model = load(analytic_dir, backend)
    samples = {"d": [[1, 2, 3, 4], [5, 6, 7]]}
    notes = lens.similarity(model, samples, progress=False).to_json()
    want = _cos(A.hidden(1), A.hidden(3))
    got = notes["domains"]["d"]["1"]
    assert got["count"] == 7 and got["mean"] == approx(want, backend) and got["std"] < 1e-3
    # the layer output is H^{l_K} here (shared experts write nothing)
    assert got["final_vs_topk"]["mean"] == approx(1.0, backend)
    assert got["final_vs_top1"]["mean"] == approx(want, backend)
    for preset in ("paper", "paper-as-run"):
        wt = preset == "paper-as-run"
        paper = lens.similarity(model, samples, preset=preset, progress=False).to_json()
        h1 = A.hidden(1, base="moe_in", renormalize=True, weighted=wt)
        hK = A.hidden(3, base="moe_in", renormalize=True, weighted=wt)
        got = paper["domains"]["d"]["1"]
        assert got["count"] == 2 and got["mean"] == approx(_cos(h1, hK), backend)
        assert got["final_vs_top1"]["mean"] == approx(_cos(A.hidden(3), h1), backend)
        assert paper["base"] == "moe_in" and paper["renormalize"] and paper["positions"] == "last"
        assert paper["weighted_expert_out"] == wt
    k2 = lens.similarity(model, samples, topk=2, progress=False).to_json()  # K = the call's k
    assert k2["domains"]["d"]["1"]["mean"] == approx(_cos(A.hidden(1), A.hidden(2)), backend)


@pytest.mark.parametrize("preset", ["notes", "paper", "paper-as-run"])
def test_similarity_matches_cumulative_on_a_random_model(tiny_fp32_dir, preset):
    """The streaming per-layer path equals cos of lens.cumulative's first and last column."""
    model = load(tiny_fp32_dir)
    samples = [model.tokenizer.encode(t) for t in ("a random model routes unevenly", "x = 1 + 2")]
    res = lens.similarity(model, {"d": samples}, preset=preset, progress=False).to_json()
    pr = lens.get_preset(preset)
    for l in model.config.moe_layers:
        cos = []
        for ids in samples:
            cap = Capture(TapRequest(lens.lens_tap_names("*", pr.sim_base),
                                     positions=pr.positions))
            model.forward(torch.tensor(ids), capture=cap)
            H = lens.cumulative(cap, l, base=pr.sim_base, renormalize=pr.renormalize,
                                weighted=pr.weighted, renorm_skip=pr.renorm_skip)
            cos.append(torch.nn.functional.cosine_similarity(H[:, 0], H[:, -1], dim=-1))
        cos = torch.cat(cos).double()
        got = res["domains"]["d"][str(l)]
        assert got["count"] == cos.numel()
        assert got["mean"] == pytest.approx(float(cos.mean()), abs=1e-6)
        assert got["std"] == pytest.approx(float(cos.std(unbiased=False)), abs=1e-4)


# ---- corpus ----------------------------------------------------------------------------------

def test_corpus_formats_and_chunking(tiny_fp32_dir, tmp_path):
    model = load(tiny_fp32_dir)
    tok = model.tokenizer
    (tmp_path / "gsm.jsonl").write_text(
        json.dumps({"question": "What is 2+2?", "answer": "#### 4"}) + "\n\n" +
        json.dumps({"context": "Paris est la capitale.", "question": "Quelle ville ?",
                    "answers": {"text": ["Paris"], "answer_start": [0]}}) + "\n")
    (tmp_path / "squad.json").write_text(json.dumps({"data": [{"paragraphs": [
        {"context": "C", "qas": [{"question": "Q1", "answers": [{"text": "A1"}]},
                                 {"question": "Q2", "answers": []}]}]}]}))
    long_text = "word " * 700
    (tmp_path / "book.txt").write_text(long_text)
    def docs(name):
        return [t for t, _ in lens.corpus.iter_text_pieces(lens.domain_from_path(tmp_path / name))]
    assert docs("gsm.jsonl") == ["What is 2+2?\n#### 4",
                                 "Paris est la capitale.\nQuelle ville ?\nParis"]
    assert docs("squad.json") == ["C\nQ1\nA1", "C\nQ2"]
    book = lens.domain_from_path(f"english={tmp_path / 'book.txt'}")
    assert book.name == "english"
    samples = list(lens.iter_samples(book, tok, 64))
    body = tok.encode(long_text, add_bos=False)
    assert all(len(s) <= 64 and s[0] == tok.bos_id for s in samples)
    assert sum(len(s) - 1 for s in samples) == len(body)
    assert [i for s in samples for i in s[1:]] == body
    assert len(list(lens.iter_samples(book, tok, 64, max_samples=2))) == 2
    assert sum(map(len, lens.iter_samples(book, tok, 64, max_tokens=100))) == 100
    batches = list(lens.iter_batches(samples, 128, "cpu"))
    assert all(b.input_ids.numel() <= 128 for b in batches)
    assert sum(int(b.attention_mask.sum()) for b in batches) == sum(map(len, samples))
    assert bool(batches[-1].attention_mask[:, -1].all())                  # left-padded
    whole = lens.domain_from_path(tmp_path)
    assert whole.name == tmp_path.name and len(whole.files) == 3
    with pytest.raises(ValueError, match="share the label"):
        lens.as_domains([tmp_path / "book.txt", tmp_path / "book.txt"])
    with pytest.raises(FileNotFoundError):
        lens.as_domains({"typo": str(tmp_path / "bok.txt")})
    assert lens.as_domains({"t": ["one text"]})[0].texts == ("one text",)


# ---- taps streamed to disk -------------------------------------------------------------------

def test_tap_writer_streams_shards(tiny_fp32_dir, tmp_path):
    model = load(tiny_fp32_dir)
    names = ["blocks.*.moe.hook_topk_ids", "blocks.2.moe.hook_expert_out"]
    ref = Capture(TapRequest(names))
    prompts = [model.tokenizer.encode(t) for t in ("alpha beta gamma", "one two", "x y z w v u t")]
    with lens.TapWriter(tmp_path / "taps", TapRequest(names), shard_bytes=2000) as w:
        for step, ids in enumerate(prompts):
            model.forward(torch.tensor(ids), capture=w, step=step)
            model.forward(torch.tensor(ids), capture=ref, step=step)
    index = json.loads((tmp_path / "taps" / "index.json").read_text())
    assert len(index["shards"]) >= 2
    assert index["taps"]["blocks.1.moe.hook_topk_ids"]["rows"] == sum(map(len, prompts))
    for name in ["blocks.1.moe.hook_topk_ids", "blocks.2.moe.hook_topk_ids", names[1]]:
        v, rows = lens.read_taps(tmp_path / "taps", name, rows=True)
        assert torch.equal(v, ref[name]) and torch.equal(rows, ref.rows(name))


# ---- the CLI end to end -------------------------------------------------------------------------

def _png_ok(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 150


@pytest.mark.parametrize("sub", ["routing", "early-decode", "topk-sweep", "similarity"])
def test_cli_end_to_end(sub, routing_dir, two_domains, tmp_path, capsys):
    out = tmp_path / sub
    argv = [sub, "--model", str(routing_dir), "--out", str(out), "--backend", "torch",
            "--dtype", "float32", "--max-len", "48", "--max-samples", "3", "--no-progress",
            str(two_domains / "digits.txt"), f"plain={two_domains / 'words'}"]
    if sub == "early-decode":
        argv += ["--prompt", "0 1 2 3", "--prompt-tokens", "8"]
    if sub == "topk-sweep":
        argv += ["--ks", "1,3,6"]
    assert lens_main(argv) == 0, capsys.readouterr().err
    js = sorted(out.glob("*.json"))
    pngs = sorted(out.glob("*.png"))
    assert len(js) == 1 and pngs
    data = json.loads(js[0].read_text())
    for p in pngs:
        _png_ok(p)
    # every JSON also as long-format CSV, one value per row
    expected = {"routing": ["routing.csv"], "early-decode": ["early_decode.csv"],
                "topk-sweep": ["topk_sweep.csv", "topk_sweep_samples.csv"],
                "similarity": ["similarity.csv"]}[sub]
    assert sorted(p.name for p in out.glob("*.csv")) == expected
    with open(out / expected[0], newline="") as f:
        rows = list(csv.DictReader(f))
    if sub == "routing":
        assert len(rows) == 2 * 2 * 12                      # domain x layer x expert
        r = [r for r in rows if (r["domain"], r["layer"], r["expert"]) == ("digits", "1", "0")]
        assert float(r[0]["percent"]) == 100.0
    elif sub == "early-decode":
        cols = {r["column"] for r in rows if r["layer"] == "1"}
        assert cols == {"layer_out", *(f"k={k}" for k in range(1, 7)),
                        *(f"single{j}" for j in range(1, 7))}
    elif sub == "topk-sweep":
        assert [(r["domain"], r["k"]) for r in rows] == [(d, k) for d in ("digits", "plain")
                                                         for k in ("1", "3", "6")]
        assert float(rows[0]["perplexity"]) == pytest.approx(data["domains"]["digits"]["perplexity"]["1"])
    else:
        assert len(rows) == 2 * 2 * 3                       # domain x layer x metric
        assert float(rows[0]["mean"]) == pytest.approx(data["domains"]["digits"]["1"]["mean"])
    if sub == "routing":
        assert data["domains"]["digits"]["layers"]["1"]["percent"] == [100.0] * 6 + [0.0] * 6
        assert data["domains"]["plain"]["layers"]["2"]["percent"] == [0.0] * 6 + [100.0] * 6
        assert [p.name for p in pngs] == ["routing_layer01.png", "routing_layer02.png",
                                          "routing_overview.png"]
    elif sub == "early-decode":
        assert [r["label"] for r in data["results"]] == ["prompt0", "digits", "plain"]
        assert len(pngs) == 3
        assert data["results"][1]["layers"][1]["experts"] == [0, 1, 2, 3, 4, 5]
    elif sub == "topk-sweep":
        assert data["ks"] == [1, 3, 6] and set(data["domains"]) == {"digits", "plain"}
    else:
        assert set(data["domains"]["digits"]) == {"1", "2"}


def test_token_text_shows_partial_characters_as_bytes(tiny_fp32_dir):
    tok = load(tiny_fp32_dir).tokenizer
    ids = tok.encode("€", add_bos=False)        # three UTF-8 bytes; the BPE may split them
    texts = [lens.token_text(tok, i) for i in ids]
    assert "\ufffd" not in "".join(texts)
    if len(ids) > 1:
        assert all(t.startswith("<") for t in texts)


def test_cli_default_model_is_the_bundled_one(routing_dir, two_domains, tmp_path, monkeypatch):
    """No --model: the model comes from moe_engine.model.default_model_dir() (pointed here at a
    test checkpoint, so the test does not depend on the bundled assets)."""
    import moe_engine.model
    monkeypatch.setattr(moe_engine.model, "default_model_dir", lambda: routing_dir)
    out = tmp_path / "default"
    assert lens_main(["routing", "--out", str(out), "--backend", "torch", "--max-samples", "1",
                      "--no-progress", str(two_domains / "digits.txt")]) == 0
    assert json.loads((out / "routing.json").read_text())["model"]["path"] == str(routing_dir)


def test_cli_presets_set_the_split(routing_dir, tmp_path):
    """--preset paper reads a plain-text file one line per document (the paper code's split);
    an explicit --split still wins."""
    (tmp_path / "c.txt").write_text("12 34\nab cd\n\n5 6\n")
    for preset, split, n in (("paper", None, 3), ("notes", None, 1), ("paper", "file", 1)):
        out = tmp_path / f"{preset}-{split}"
        argv = ["routing", "--model", str(routing_dir), "--out", str(out), "--backend", "torch",
                "--dtype", "float32", "--no-progress", "--preset", preset, str(tmp_path / "c.txt")]
        assert lens_main(argv + (["--split", split] if split else [])) == 0
        assert json.loads((out / "routing.json").read_text())["domains"]["c"]["samples"] == n


def test_cli_errors(tmp_path, capsys):
    assert lens_main(["routing", "--out", str(tmp_path), str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_document_samples_paper_chunking(tiny_fp32_dir, tmp_path):
    """The paper presets' samples: stripped non-empty lines, cut into chunks of max_len tokens;
    BOS on every chunk (routing, similarity) or on the first only (perplexity)."""
    tok = load(tiny_fp32_dir).tokenizer
    assert tok.add_bos_token and tok.bos_id is not None
    lines = ["  the first line has quite a few words in it, more than eight tokens  ", "",
             "second line, also long enough to need a few chunks of eight"]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    dom = lens.domain_from_path(tmp_path / "c.txt")
    bodies = [tok.encode(lines[0].strip(), add_bos=False), tok.encode(lines[2], add_bos=False)]
    first = list(lens.document_samples(dom, tok, 8, bos="first"))
    for d in (0, 1):
        chunks = [c for doc, c in first if doc == d]
        assert [i for c in chunks for i in c] == [tok.bos_id] + bodies[d]
        assert all(len(c) <= 8 for c in chunks) and all(c[0] != tok.bos_id for c in chunks[1:])
    every = list(lens.document_samples(dom, tok, 8, bos="every"))
    for d in (0, 1):
        chunks = [c for doc, c in every if doc == d]
        assert all(c[0] == tok.bos_id and len(c) <= 8 for c in chunks)
        assert [i for c in chunks for i in c[1:]] == bodies[d]
    assert {d for d, _ in lens.document_samples(dom, tok, 8, max_samples=1)} == {0}
    assert sum(len(c) for _, c in lens.document_samples(dom, tok, 8, max_tokens=11)) == 11


def test_progress_bar_counts_tokens_as_batches_run(routing_dir, two_domains, monkeypatch):
    """The bar advances after each batch has run through the model, by its real tokens: a whole
    file is read before its first forward, so counting bytes read left the bar at 100% (or gone)
    for the whole run."""
    from moe_engine.lens import analyses

    updates = []

    class Bar:
        def __init__(self, *a, disable=False, **kw):
            self.disable = disable

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates.append(n)

    monkeypatch.setattr(analyses, "tqdm", Bar)
    model = load(routing_dir, "torch")
    res = lens.route_corpus(model, [two_domains / "digits.txt"], max_len=64, batch_tokens=128,
                            progress=True)
    tokens = res.to_json()["domains"]["digits"]["tokens"]
    assert len(updates) >= 2, updates  # one update per batch, not one per file read
    assert sum(updates) == tokens
