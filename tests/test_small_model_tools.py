"""Fast checks of the tools that build the bundled small model (tools/build_corpus.py,
tools/train_small.py, tools/eval_small.py) on tiny shapes and tiny corpora; no network."""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import build_corpus as bc  # noqa: E402
import eval_small as ev  # noqa: E402
import train_small as ts  # noqa: E402

TINY = ["--hidden", "32", "--layers", "3", "--heads", "2", "--experts", "8", "--topk", "3", "--shared", "2",
        "--expert-width", "8", "--dense-width", "32", "--max-pos", "64", "--bpe-vocab", "300",
        "--vocab-size", "320", "--batch", "4", "--seq", "16", "--steps", "3", "--warmup", "1",
        "--eval-every", "0", "--eval-chunks", "2"]


def _digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_roff_to_text_keeps_french_prose_and_drops_markup():
    roff = "\n".join([
        '.\\" commentaire', ".TH LS 1", ".SH NOM", "ls \\- afficher le contenu d'un répertoire",
        ".SH DESCRIPTION", "Afficher les informations sur les \\fIFICHIER\\fP (du répertoire courant",
        "par défaut).", ".PP", "This paragraph was not translated and is in the English language.",
        ".TS", "tab;", "a\tb", ".TE", ".SH TRADUCTION", "La traduction française..."])
    text = bc.roff_to_text(roff)
    assert "ls - afficher le contenu d'un répertoire" in text
    assert "Afficher les informations sur les FICHIER (du répertoire courant par défaut)." in text
    assert "\\f" not in text and "tab;" not in text and "traduction" not in text.lower()
    paras = [p for p in text.split("\n\n") if bc._is_french(p)]
    assert not any("English language" in p for p in paras)


def test_split_is_by_whole_work_and_seeded():
    works = [(f"w{i}", "\n\n".join(f"para {i}.{j} " + "x" * 50 for j in range(20))) for i in range(10)]
    a = bc.split_source("s", works, seed=1, heldout_chars=1500, train_chars=5000, doc_chars=300)
    b = bc.split_source("s", works, seed=1, heldout_chars=1500, train_chars=5000, doc_chars=300)
    c = bc.split_source("s", works, seed=2, heldout_chars=1500, train_chars=5000, doc_chars=300)
    assert a == b and a != c
    train, held = a
    assert not {d["work"] for d in train} & {d["work"] for d in held}
    assert all(len(d["text"]) <= 360 for d in train + held)


def test_build_corpus_is_deterministic(tmp_path):
    # the stdlib source needs no download; caps keep it to a fraction of a second
    args = dict(cache=tmp_path / "cache", seed=0, heldout_chars=3000, train_chars=20000, doc_chars=1000,
                gsm_per_template=2, only=["python-stdlib"])
    m1 = bc.build(tmp_path / "a", **args)
    m2 = bc.build(tmp_path / "b", **args)
    assert m1["files"] == m2["files"] and m1["files"]["code/train.jsonl"]["chars"] > 10000
    held = {d["work"] for d in bc.load_split(tmp_path / "a", "code", "heldout")}
    train = {d["work"] for d in bc.load_split(tmp_path / "a", "code", "train")}
    assert held and not held & train


def test_gsm_generators_load_from_the_wheel():
    wheel = bc.Path.home() / ".cache" / "moe_engine" / "corpus-downloads" / bc.SOURCES["gsm-symbolic"]["file"]
    if not wheel.exists():
        pytest.skip("reasoning-gym wheel not cached (tools/build_corpus.py fetches it)")
    works = list(bc.read_gsm(wheel, seed=0, per_template=1))
    assert len(works) == 85 and all(t.startswith("Question: ") and "\nAnswer: " in t for _, t in works)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    text = {
        "english": "And the king said unto his servants, Go ye and bring me the sword. ",
        "french": "Cette commande affiche le contenu du répertoire courant par défaut. ",
        "math": "Question: Tom has 3 apples and buys 4 more. How many?\nAnswer: 3 + 4 = 7\n#### 7\n\n",
        "code": "def add(a, b):\n    return a + b\n\n",
    }
    for dom, t in text.items():
        (root / dom).mkdir()
        for split, n in (("train", 12), ("heldout", 2)):
            with open(root / dom / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    f.write(json.dumps({"source": dom, "work": f"{split}{i}", "text": t * (4 + i % 3)}) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_model(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    ts.main(["--corpus", str(tiny_corpus), "--out", str(out), *TINY])
    return out


def test_training_writes_the_published_layout(tiny_model):
    from safetensors import safe_open
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "train_log.json", "loss.png"):
        assert (tiny_model / name).exists(), name
    c = json.loads((tiny_model / "config.json").read_text())
    assert c["architectures"] == ["DeepseekForCausalLM"] and c["model_type"] == "deepseek"
    assert c["norm_topk_prob"] is False and c["scoring_func"] == "softmax" and c["first_k_dense_replace"] == 1
    assert c["torch_dtype"] == "bfloat16" and c["tie_word_embeddings"] is False
    D, E, Fw, V = 32, 8, 8, 320
    expect = {"model.embed_tokens.weight": [V, D], "lm_head.weight": [V, D], "model.norm.weight": [D],
              "model.layers.0.mlp.gate_proj.weight": [32, D], "model.layers.0.mlp.down_proj.weight": [D, 32],
              "model.layers.0.self_attn.q_proj.weight": [D, D]}
    for l in (1, 2):
        expect[f"model.layers.{l}.mlp.gate.weight"] = [E, D]
        expect[f"model.layers.{l}.mlp.shared_experts.up_proj.weight"] = [2 * Fw, D]
        expect[f"model.layers.{l}.mlp.shared_experts.down_proj.weight"] = [D, 2 * Fw]
        for e in range(E):
            expect[f"model.layers.{l}.mlp.experts.{e}.gate_proj.weight"] = [Fw, D]
            expect[f"model.layers.{l}.mlp.experts.{e}.up_proj.weight"] = [Fw, D]
            expect[f"model.layers.{l}.mlp.experts.{e}.down_proj.weight"] = [D, Fw]
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert len(got) == 9 + 2 * (10 + 3 * E) + 3
    for k, shape in expect.items():
        assert got.get(k) == shape, k
    tc = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["bos_token"]["content"] == ts.BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert tok.token_to_id(ts.BOS) == c["bos_token_id"] and tok.token_to_id(ts.EOS) == c["eos_token_id"]
    enc = tok.encode("x = 333")
    assert enc.ids[0] == c["bos_token_id"] and enc.tokens[-3:] == ["3", "3", "3"]


def test_saved_weights_reload_into_the_same_function(tiny_model):
    model, c = ts.load_hf(tiny_model)
    ids = torch.randint(0, 300, (2, 11))
    logits, _ = model(ids)
    # save → load is exact on the bf16-rounded weights
    sd = ts.hf_state_dict(model)
    model2, _ = ts.load_hf(tiny_model)
    assert all(torch.equal(sd[k], v) for k, v in ts.hf_state_dict(model2).items())
    # k = E with shared experts equals the dense sum over all experts weighted by the softmax
    moe = model.layers[1].mlp
    h = torch.randn(5, 32)
    out, _, ids_k = moe(h, topk=8)
    p = torch.softmax(h @ moe.gate.weight.t(), -1)
    ref = moe.shared_experts(h)
    for e in range(8):
        g, u = (h @ moe.w_gate_up[e].t()).split(8, -1)
        ref = ref + p[:, e:e + 1] * ((torch.nn.functional.silu(g) * u) @ moe.w_down[e].t())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logits).all()


def test_training_is_deterministic_and_replayable(tiny_corpus, tiny_model, tmp_path):
    ts.main(["--corpus", str(tiny_corpus), "--out", str(tmp_path / "again"), *TINY])
    ts.main(["--corpus", str(tiny_corpus), "--out", str(tmp_path / "replay"), *TINY,
             "--replay-lr", str(tiny_model / "train_log.json")])
    w = _digest(tiny_model)["model.safetensors"]
    assert _digest(tmp_path / "again")["model.safetensors"] == w
    assert _digest(tmp_path / "replay")["model.safetensors"] == w


def test_eval_writes_card_with_perplexity_and_js(tiny_corpus, tiny_model):
    res = ev.evaluate(tiny_model, tiny_corpus, ks=[0, 1, 3], chunk=16, gen_tokens=4, threads=1, train_chunks=3)
    assert set(res["perplexity"]) == set(bc.DOMAINS)
    assert all(res["perplexity"][d][1] > 1 and res["perplexity"][d][3] > 1 for d in bc.DOMAINS)
    for layer, j in res["js_bits"].items():
        assert all(0 <= v <= 1 for v in j["pairs"].values())
    for d in bc.DOMAINS:  # percentages sum to k·100 per layer
        for pct in res["routing_percent"][d].values():
            assert abs(sum(pct) - 300) < 0.1
    ev.write_card(tiny_model, res, "python tools/eval_small.py (test)")
    card = (tiny_model / "MODEL_CARD.md").read_text()
    assert "Jensen" in card and "k=1" in card and (tiny_model / "routing.png").exists()


def test_js_divergence_bounds():
    import numpy as np
    a = np.array([1.0, 0, 0, 0])
    b = np.array([0, 1.0, 0, 0])
    assert ev.js_divergence(a, a) == 0 and abs(ev.js_divergence(a, b) - 1) < 1e-12


def test_engine_runtime_matches_the_training_twin(tiny_model):
    """The engine's reference forward on the saved directory reproduces the model that was trained."""
    model_mod = pytest.importorskip("moe_engine.model")
    eng = model_mod.Model.load(tiny_model, dtype="float32", backend="torch", progress=False)
    twin, _ = ts.load_hf(tiny_model)
    ids = eng.tokenizer.encode("And the king said: x = 333\ndef f():")
    from tokenizers import Tokenizer
    assert ids == Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode("And the king said: x = 333\ndef f():").ids
    x = torch.tensor([ids])
    for k in (None, 1, 0):
        kw = {} if k is None else {"topk": k}
        with torch.no_grad():
            ref, _ = twin(x, topk=k)
        torch.testing.assert_close(eng.forward(x, **kw), ref, rtol=1e-4, atol=1e-4)
