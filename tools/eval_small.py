"""Evaluate the bundled small model and write its MODEL_CARD.md.

Runs the training twin of the model (tools/train_small.py) on the saved bf16 weights, computing in
fp32:

- held-out perplexity per domain at several top-k (k overridden on every MoE layer, weights NOT
  renormalised, shared experts on: the model's own semantics). Each held-out document is cut into
  chunks of at most --chunk tokens, each chunk scored on its own; the domain score is the geometric
  mean of per-chunk perplexities (exp of the mean per-chunk NLL), as in the MoE Lens paper; the
  token-weighted perplexity is given too.
- the routing histogram per domain and MoE layer at the model's k: percent of tokens that chose
  each expert (sums to k·100%; uniform = k/E·100%), and how different the domains' expert
  distributions are: the Jensen–Shannon divergence (bits, in [0, 1]) between the normalised
  histograms of every pair of domains, per layer, next to a noise floor (JS between the two halves
  of the same domain's held-out set).
- one greedy continuation per domain.

Results go to eval.json, routing.png and MODEL_CARD.md in the model directory.

    python tools/eval_small.py --model src/moe_engine/assets/small --corpus out/corpus
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import DOMAINS  # noqa: E402
from train_small import EOS, chunk_nll, encode_domain, heldout_chunks, load_hf  # noqa: E402

PROMPTS = {
    "english": "And the king said unto",
    "french": "DESCRIPTION\n\nCette commande permet de",
    "math": "Question: Sarah has 5 boxes with 12 pencils in each box. She gives away 17 pencils. "
            "How many pencils does she have left?\nAnswer:",
    "code": "def read_lines(path):\n",
}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits between two histograms (normalised here)."""
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int, eos: int) -> str:
    ids = tok.encode(prompt).ids
    start = len(ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids[-model.c["max_position_embeddings"]:]]))
        nxt = int(logits[0, -1, : tok.get_vocab_size()].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    return tok.decode(ids[start:])


def plot_routing(hist: dict, k: int, E: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted(next(iter(hist.values())))
    fig, axes = plt.subplots(len(layers), 1, figsize=(11, 1.5 + 1.3 * len(layers)), dpi=100, squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        mat = np.array([hist[d][layer] for d in DOMAINS])
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(DOMAINS)), DOMAINS, fontsize=8)
        ax.set_xticks(range(0, E, 4))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"layer {layer}: % of tokens routed to each expert (k={k}, uniform {100 * k / E:.2f}%)",
                     fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[-1, 0].set_xlabel("routed expert id")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(model_dir: Path, corpus: Path, ks: list[int], chunk: int, gen_tokens: int, threads: int,
             bf16_check: bool = True, train_chunks: int = 0) -> dict:
    from tokenizers import Tokenizer
    torch.set_num_threads(threads)
    model, c = load_hf(model_dir)
    bf16_model = load_hf(model_dir, torch.bfloat16)[0] if bf16_check else None
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    K, E = c["num_experts_per_tok"], c["n_routed_experts"]
    res = {"model": str(model_dir), "chunk_tokens": chunk, "gen_tokens": gen_tokens, "compute_dtype": "float32 (weights as saved, bf16)",
           "perplexity": {}, "perplexity_token_weighted": {}, "heldout_tokens": {}, "heldout_chunks": {},
           "routing_percent": {}, "samples": {}}
    hits, halves = {}, {}
    for dom in DOMAINS:
        docs = encode_domain(tok, corpus, dom, "heldout", eos)
        chunks = heldout_chunks(docs, chunk)
        res["heldout_chunks"][dom] = len(chunks)
        res["heldout_tokens"][dom] = sum(len(x) - 1 for x in chunks)
        res["perplexity"][dom], res["perplexity_token_weighted"][dom] = {}, {}
        for k in ks:
            t0 = time.time()
            h = {} if k == K else None
            nll = chunk_nll(model, chunks, topk=k, routing_hist=h)
            w = np.array([len(x) - 1 for x in chunks], dtype=np.float64)
            res["perplexity"][dom][k] = round(math.exp(float(np.mean(nll))), 3)
            res["perplexity_token_weighted"][dom][k] = round(math.exp(float(np.dot(nll, w) / w.sum())), 3)
            if h is not None:
                hits[dom] = {layer: v.numpy().astype(np.float64) for layer, v in h.items()}
                # noise floor: the same histogram from each half of the domain's chunks
                halves[dom] = []
                for part in (chunks[0::2], chunks[1::2]):
                    hh = {}
                    chunk_nll(model, part, topk=k, routing_hist=hh)
                    halves[dom].append({layer: v.numpy().astype(np.float64) for layer, v in hh.items()})
            print(f"[eval] {dom} k={k}: ppl {res['perplexity'][dom][k]} ({time.time() - t0:.0f}s)", file=sys.stderr)
        if train_chunks:  # the same measure on training text, to separate "hard held-out" from "weak model"
            tr = heldout_chunks(encode_domain(tok, corpus, dom, "train", eos), chunk)
            tr = tr[:: max(1, len(tr) // train_chunks)][:train_chunks]
            res.setdefault("perplexity_train_sample", {})[dom] = {
                K: round(math.exp(float(np.mean(chunk_nll(model, tr, topk=K)))), 3)}
        if bf16_model is not None:
            nll = chunk_nll(bf16_model, chunks, topk=K)
            res.setdefault("perplexity_bf16", {})[dom] = {K: round(math.exp(float(np.mean(nll))), 3)}
        res["routing_percent"][dom] = {layer: (100.0 * v / res["heldout_tokens"][dom]).round(3).tolist()
                                       for layer, v in hits[dom].items()}
        res["samples"][dom] = {"prompt": PROMPTS[dom], "greedy": greedy(model, tok, PROMPTS[dom], gen_tokens, eos)}
    layers = sorted(hits[DOMAINS[0]])
    res["js_bits"] = {}
    for layer in layers:
        pairs = {f"{a}|{b}": round(js_divergence(hits[a][layer], hits[b][layer]), 4) for a, b in combinations(DOMAINS, 2)}
        floor = {d: round(js_divergence(halves[d][0][layer], halves[d][1][layer]), 4) for d in DOMAINS}
        res["js_bits"][layer] = {"pairs": pairs, "mean_between": round(float(np.mean(list(pairs.values()))), 4),
                                 "within_split_half": floor,
                                 "mean_within": round(float(np.mean(list(floor.values()))), 4)}
    res["top_expert_share"] = {}
    for dom in DOMAINS:
        res["top_expert_share"][dom] = {}
        for layer in layers:
            v = np.sort(hits[dom][layer])[::-1]
            res["top_expert_share"][dom][layer] = {
                "top5_percent_of_decisions": round(100 * float(v[:5].sum() / v.sum()), 1),
                "experts_for_half_of_decisions": int(np.searchsorted(np.cumsum(v) / v.sum(), 0.5) + 1),
                "top_experts": [int(i) for i in np.argsort(-hits[dom][layer], kind="stable")[:5]]}
    res["uniform_percent"] = round(100 * K / E, 3)
    plot_routing(res["routing_percent"], K, E, model_dir / "routing.png")
    return res


def _quant_section(w, q: dict) -> None:
    """The quantized-weights quality table (tools/eval_quant.py writes q into eval.json)."""
    w("### Quantized weights\n")
    w(f"Held-out perplexity per domain (chunks of <= {q['chunk_tokens']} tokens, as above) with the weights "
      "quantized on load by round to nearest in the GPTQ layout (docs/quantization.md; asymmetric unless "
      "marked sym, scales per group of g input channels), and top-1 agreement: the share of held-out positions "
      "whose most likely next token is the same as with the bf16 weights. Computed by the engine ("
      f"{q['compute']}), so the rows differ only in the weights. `{q['command']}`\n")
    labels = list(q["ppl"])
    w("| weights | " + " | ".join(f"{d} ppl" for d in DOMAINS) + " | ppl vs bf16 (mean) | top-1 agreement (mean) |")
    w("|---|" + "---|" * (len(DOMAINS) + 2))
    base = q["ppl"][labels[0]]
    for lab in labels:
        ppl, agr = q["ppl"][lab], q["top1_agreement"][lab]
        rel = float(np.mean([ppl[d] / base[d] - 1 for d in DOMAINS]))
        w(f"| {lab} | " + " | ".join(f"{ppl[d]:.2f}" for d in DOMAINS)
          + f" | {100 * rel:+.2f}% | {100 * float(np.mean([agr[d] for d in DOMAINS])):.2f}% |")
    w("")


def _prune_section(w, p: dict) -> None:
    """The expert-pruning table (eval.json "pruning": the prune.json of python -m moe_engine.prune
    per kept count, gathered by hand; see the command it records)."""
    w("### Expert pruning\n")
    w("Held-out perplexity per domain (geometric mean over samples of <= "
      f"{p['max_len']} tokens, the first {p['max_tokens']} tokens of each domain's held-out split) with "
      "only N of the 64 routed experts kept in every MoE layer, removed experts masked with mask_mode "
      "reroute (the router's next choice takes the slot; weights not renormalised). Calibrated: the N "
      f"experts the calibration text (the first {p['max_tokens']} tokens of each domain's train split) "
      "routes to most; random: as many experts chosen uniformly at random (seed 0). Full: all 64. "
      f"`{p['command']}`\n")
    w("| kept | calibration hits kept (mean over layers) | " + " | ".join(f"{d} full / calibrated / random" for d in DOMAINS)
      + " |")
    w("|---|---|" + "---|" * len(DOMAINS))
    for keep, r in sorted(p["runs"].items(), key=lambda kv: int(kv[0])):
        mass = float(np.mean(list(r["calibration_mass_kept"].values())))
        w(f"| {keep} | {100 * mass:.1f}% | " + " | ".join(
            f"{r['domains'][d]['full']:.2f} / {r['domains'][d]['calibrated']:.2f} / {r['domains'][d]['random']:.2f}"
            for d in DOMAINS) + " |")
    w("")
    if p.get("note"):
        w(p["note"] + "\n")


def _fence(s: str) -> str:
    return "```\n" + s.replace("```", "ʼʼʼ") + "\n```"


def write_card(model_dir: Path, res: dict, cmdline: str) -> None:
    c = json.loads((model_dir / "config.json").read_text())
    log = json.loads((model_dir / "train_log.json").read_text())
    src_path = Path(__file__).resolve().parent / "corpus_sources.json"
    sources = json.loads(src_path.read_text())["sources"] if src_path.exists() else {}
    a = log["args"]
    ks = sorted({int(k) for d in res["perplexity"].values() for k in d})
    K, E = c["num_experts_per_tok"], c["n_routed_experts"]
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    last = log["evals"][-1]["heldout"]
    tail = log["steps"][-50:]
    L = []
    w = L.append
    w(f"# moe_engine small model (DeepSeekMoE architecture, {log['params'] / 1e6:.1f}M parameters)\n")
    w("A tiny model of the DeepSeekMoE family that ships inside the package so that generation, the "
      "benchmarks and the MoE Lens analyses work offline on any machine. It was trained from scratch on "
      "the CPU by `tools/train_small.py` on four domains (English, French, grade-school math with worked "
      "solutions, Python code) assembled by `tools/build_corpus.py`. It produces recognisable text in "
      "each domain; it is not a useful assistant and knows no facts worth asking for.\n")
    w("## Architecture\n")
    n_moe = sum(1 for l in range(c["num_hidden_layers"]) if l >= c["first_k_dense_replace"])
    w("| field | value |\n|---|---|")
    rows = [("layers", f"{c['num_hidden_layers']} (layer 0 dense SwiGLU of width {c['intermediate_size']}, "
             f"layers 1..{c['num_hidden_layers'] - 1} MoE)"),
            ("hidden / heads", f"{c['hidden_size']} / {c['num_attention_heads']} (plain MHA, head dim "
             f"{c['hidden_size'] // c['num_attention_heads']}, rotate-half RoPE θ={c['rope_theta']:g})"),
            ("routed experts", f"{E}, SwiGLU width {c['moe_intermediate_size']}, top-{K}, softmax gate, "
             "norm_topk_prob false (weights are raw probabilities)"),
            ("shared experts", f"{c['n_shared_experts']}, stored as one SwiGLU MLP of width "
             f"{c['n_shared_experts'] * c['moe_intermediate_size']}"),
            ("vocabulary", f"{c['vocab_size']} rows: byte-level BPE ids 0..{c['bos_token_id'] - 1}, BOS "
             f"{c['bos_token_id']}, EOS {c['eos_token_id']} (also pad); rows above {c['eos_token_id']} belong to "
             "no token, as in the published model"),
            ("context", f"trained on {a['seq']}-token windows; max_position_embeddings {c['max_position_embeddings']}"),
            ("parameters", f"{log['params']:,} ({size_mb:.1f} MB bf16 safetensors); activated per token ≈ "
             f"{_activated(c) / 1e6:.1f}M")]
    for k, v in rows:
        w(f"| {k} | {v} |")
    w("\nFiles follow the published `deepseek-ai/deepseek-moe-16b-base` layout: `config.json` (same fields, "
      "no `auto_map` since no remote code ships), `model.safetensors` with the published tensor names "
      "(`model.layers.{l}.mlp.experts.{e}.gate_proj.weight`, `...shared_experts...`, `...mlp.gate.weight`), "
      "`tokenizer.json` (fast tokenizer; BOS prepended on encode, digits split one per token), "
      "`tokenizer_config.json` (`LlamaTokenizerFast`, `add_bos_token` true), `generation_config.json`.\n")
    w("## Training data\n")
    w("| domain | source | licence | train chars | held-out chars (works held out whole) |\n|---|---|---|---|---|")
    for name, s in sources.items():
        held = s["heldout_works"]
        held_s = ", ".join(held) if len(held) <= 4 else f"{len(held)} works"
        w(f"| {s['domain']} | {s['package']} {s['version']} ({s['registry']}): {s['description']} | {s['licence']} "
          f"| {s['train_chars']:,} | {s['heldout_chars']:,} ({held_s}) |")
    ct = log["corpus_tokens"]
    w("\nTokens (this tokenizer): " + ", ".join(f"{d} {ct[d]['train']:,} train / {ct[d]['heldout']:,} held-out"
                                                 for d in DOMAINS) + ". Every batch holds the four domains in "
      "equal shares (random windows), so the model saw each domain about equally often.\n")
    w("## Training\n")
    w(f"- {log['steps_done']} steps of {a['batch']}×{a['seq']} tokens = {log['tokens_seen']:,} tokens "
      f"(passes over each domain's train split: " + ", ".join(
          f"{d} {log['tokens_seen'] / len(DOMAINS) / log['corpus_tokens'][d]['train']:.2f}" for d in DOMAINS)
      + f") in {log['train_seconds'] / 60:.1f} min on {log['threads']} CPU "
      f"thread(s) of a shared 2-core machine: **{log['tokens_per_s']:.0f} tokens/s** (torch {log['torch']}, fp32).")
    w(f"- AdamW (β 0.9/0.95, weight decay {a['weight_decay']}), peak lr {a['lr']}, {a['warmup']} warmup steps, "
      f"cosine to {a['min_lr_frac']}× over the run (see below), grad clip {a['grad_clip']}, seed {a['seed']}.")
    w(f"- Loss = cross-entropy + α·Σ_layers Σ_i f_i·P_i (DeepSeekMoE expert-level balance loss, α = {a['aux_alpha']}; "
      f"1.0 per layer means perfectly balanced).")
    w(f"- Final train CE (mean of the last {len(tail)} steps): {np.mean([r['ce'] for r in tail]):.3f} nats/token; "
      f"balance term per layer {np.mean([r['balance'] for r in tail]):.3f}. Held-out CE at the end (first "
      f"{a['eval_chunks']} chunks per domain): " + ", ".join(f"{d} {last[d]:.3f}" for d in DOMAINS) + ".")
    if log["steps_done"] < a["steps"]:
        w(f"- The schedule followed the wall-time budget (--minutes {a['minutes']}): progress = max(step/steps, "
          f"elapsed/budget), so the cosine completed and the budget ended the run at step {log['steps_done']} "
          f"(of at most {a['steps']}). The learning rate of every step is in train_log.json; "
          "`--replay-lr` replays it exactly.")
    w("\n![loss curve](loss.png)\n")
    w("## Evaluation (held-out, works never seen in training)\n")
    w(f"Perplexity per domain: geometric mean over chunks of ≤ {res['chunk_tokens']} tokens of the per-chunk "
      "perplexity; k overridden on every MoE layer, weights not renormalised, shared experts on (k = 0 is the "
      "shared experts alone). Computed in fp32 from the saved bf16 weights by the training twin of the model.\n")
    w("| domain | held-out tokens | " + " | ".join(f"k={k}" for k in ks) + f" | k=1 vs k={K} |")
    w("|---|---|" + "---|" * len(ks) + "---|")
    for d in DOMAINS:
        p = res["perplexity"][d]
        rel = f"{100 * (p[1] / p[K] - 1):+.0f}%" if 1 in p and K in p else ""
        w(f"| {d} | {res['heldout_tokens'][d]:,} | " + " | ".join(f"{p[k]:.2f}" for k in ks) + f" | {rel} |")
    better0 = [d for d in DOMAINS if 0 in res["perplexity"][d] and res["perplexity"][d][0] < res["perplexity"][d][K]]
    if better0:
        w(f"\nOn {', '.join(better0)} the shared experts alone (k=0) score better than k={K}: what the routed "
          "experts learned there is specific to the training works/templates and does not transfer to the held-out ones.")
    if "perplexity_train_sample" in res:
        w(f"\nFor comparison, the same measure at k={K} on a sample of training text (evenly spaced chunks of "
          "the train split): " + ", ".join(f"{d} {res['perplexity_train_sample'][d][K]:.2f}" for d in DOMAINS)
          + ". Held-out text comes from works never trained on (other plays and Bible books, other manual pages, "
          "other modules, and for math problem templates never seen), so the ratio held-out/train measures how far "
          "the model generalises beyond the works it saw: " + ", ".join(
              f"{d} {res['perplexity'][d][K] / res['perplexity_train_sample'][d][K]:.1f}×" for d in DOMAINS) + ". "
          "A large ratio for math means the model learned the wording of its training templates rather than "
          "arithmetic.")
    if "perplexity_bf16" in res:
        w(f"\nThe same at k={K} computed in bf16 end to end (bf16 router softmax, bf16 accumulation in expert "
          "order, as the published remote code does): " + ", ".join(
              f"{d} {res['perplexity_bf16'][d][K]:.2f}" for d in DOMAINS) + ".")
    w("\nToken-weighted perplexity at k=" + str(K) + ": " +
      ", ".join(f"{d} {res['perplexity_token_weighted'][d][K]:.2f}" for d in DOMAINS) + ".\n")
    if "quantization" in res:
        _quant_section(w, res["quantization"])
    if "pruning" in res:
        _prune_section(w, res["pruning"])
    w("### Routing differs by domain\n")
    w(f"Percent of held-out tokens routed to each expert, per layer and domain, at k={K} (each row sums to "
      f"{K}00%; uniform is {res['uniform_percent']}% per expert):\n")
    w("![routing histogram](routing.png)\n")
    w("Jensen–Shannon divergence (bits; 0 = same distribution, 1 = disjoint) between the domains' normalised "
      "expert histograms, per MoE layer, and as a noise floor the JS between the two halves (alternate "
      "chunks) of the same domain:\n")
    pairs = list(next(iter(res["js_bits"].values()))["pairs"])
    w("| layer | " + " | ".join(p.replace("|", "–") for p in pairs) + " | mean between | mean within (floor) |")
    w("|---|" + "---|" * (len(pairs) + 2))
    for layer, j in res["js_bits"].items():
        w(f"| {layer} | " + " | ".join(f"{j['pairs'][p]:.3f}" for p in pairs) +
          f" | **{j['mean_between']:.3f}** | {j['mean_within']:.3f} |")
    ratios = [j["mean_between"] / max(j["mean_within"], 1e-9) for j in res["js_bits"].values()]
    w(f"\nIn every MoE layer the mean between-domain divergence is {min(ratios):.0f}–{max(ratios):.0f}× the "
      "within-domain floor: the domains are routed to measurably different experts.")
    w(f"\nConcentration: share of a domain's routing decisions taken by its 5 most used experts (of {E}), and "
      "the number of experts that take half of them:\n")
    layers = list(res["js_bits"])
    w("| domain | " + " | ".join(f"layer {l}" for l in layers) + " |")
    w("|---|" + "---|" * len(layers))
    for d in DOMAINS:
        t = res["top_expert_share"][d]
        w(f"| {d} | " + " | ".join(f"{t[l]['top5_percent_of_decisions']:.0f}% (top {t[l]['top_experts']}); "
                                     f"{t[l]['experts_for_half_of_decisions']} for half" for l in layers) + " |")
    w("\n## Greedy samples\n")
    for d in DOMAINS:
        s = res["samples"][d]
        w(f"**{d}** — prompt, then up to {res['gen_tokens']} greedy tokens:\n")
        w(_fence(s["prompt"] + "⟨" + s["greedy"] + "⟩") + "\n")
    w("(The continuation is between ⟨ ⟩.)\n")
    w("## Reproduce\n")
    train_cmd = ("python tools/train_small.py --corpus out/corpus --out src/moe_engine/assets/small "
                 f"--seed {a['seed']} --threads {a['threads']} --steps {a['steps']}"
                 + (f" --minutes {a['minutes']:g}" if a.get("minutes") else "") + f" --lr {a['lr']} --warmup {a['warmup']}")
    w("```\npython tools/build_corpus.py --out out/corpus --seed 0 --sources-json tools/corpus_sources.json\n"
      f"{train_cmd}\n{cmdline}\n```\n")
    w("To reproduce these weights bit for bit rather than within noise (same torch build and thread count), "
      "replay the logged learning rates instead of the wall-time budget:\n")
    w("```\n" + train_cmd.split(" --minutes")[0].replace(" --out src/moe_engine/assets/small", " --out out/replay")
      + " --replay-lr src/moe_engine/assets/small/train_log.json\n```\n")
    w("The corpus is byte-identical given the seed and the Python version (the code domain reads the running "
      "interpreter's standard library; this one was built with Python "
      f"{json.loads(src_path.read_text())['python'] if src_path.exists() else '?'}). Training is bit-identical "
      "for the same steps, seed, thread count and torch build; a run cut by --minutes at a different step "
      "differs within noise. Sources are fetched with `pip download` / `apt-get download`, pinned by version "
      "and sha256, and cached under ~/.cache/moe_engine/corpus-downloads.\n")
    w("## Limitations\n")
    w(f"- {log['params'] / 1e6:.1f}M parameters and {log['tokens_seen'] / 1e6:.1f}M training tokens: local style "
      "and vocabulary per domain, little else; math answers are usually wrong; code does not run.")
    w("- Evaluated by the training twin in fp32. The engine's reference forward (`moe_engine.model`, torch "
      "backend) reproduced the twin's fp32 logits to 5e-6 on this model at k=6, 1 and 0 when checked; "
      "tests/test_small_model_tools.py pins that on a tiny model. In bf16 the two differ by bf16 rounding "
      "(0.19 at most on logits of magnitude 16 over a 40-token text, same argmax; router near-ties may pick "
      "a different 6th expert).")
    w("- The French domain is technical (manual pages) and the English domain is Early Modern English "
      "(Shakespeare, King James); neither is contemporary prose.")
    (model_dir / "MODEL_CARD.md").write_text("\n".join(L) + "\n")


def _activated(c: dict) -> int:
    D, V, F_, K = c["hidden_size"], c["vocab_size"], c["moe_intermediate_size"], c["num_experts_per_tok"]
    L = c["num_hidden_layers"]
    n_moe = L - c["first_k_dense_replace"]
    attn = 4 * D * D * L
    dense = 3 * D * c["intermediate_size"] * c["first_k_dense_replace"]
    moe = n_moe * (3 * D * F_ * (K + c["n_shared_experts"]) + D * c["n_routed_experts"])
    return attn + dense + moe + 2 * V * D


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("src/moe_engine/assets/small"))
    ap.add_argument("--corpus", type=Path, default=Path("out/corpus"))
    ap.add_argument("--topk", default="0,1,2,4,6", help="comma-separated k values to score")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-card", action="store_true")
    ap.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from the saved eval.json")
    ap.add_argument("--train-chunks", type=int, default=150, help="training chunks per domain scored for comparison")
    ap.add_argument("--no-bf16-check", action="store_true", help="skip the bf16 end-to-end perplexity")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.topk.split(",")]
    if args.card_only:
        res = json.loads((args.model / "eval.json").read_text())
        for key in ("perplexity", "perplexity_token_weighted", "perplexity_bf16", "perplexity_train_sample"):
            for d, v in res.get(key, {}).items():
                res[key][d] = {int(k): x for k, x in v.items()}
        write_card(args.model, res, res["command"])
        return
    res = evaluate(args.model, args.corpus, ks, args.chunk, args.gen_tokens, args.threads, not args.no_bf16_check,
                   args.train_chunks)
    res["command"] = "python tools/eval_small.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.model / "eval.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    if not args.no_card:
        write_card(args.model, res, res["command"])
    print(json.dumps({d: res["perplexity"][d] for d in DOMAINS}), file=sys.stderr)


if __name__ == "__main__":
    main()
