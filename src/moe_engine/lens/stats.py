"""Routing statistics beyond the MoE Lens figures, each streamed over a corpus with the device
holding only small accumulators (one MoE layer's taps at a time, via LayerStream):

    router_stats   per layer: router entropy H(p) = -sum_e p_e log p_e (nats; mean and std over
                   tokens, and as a fraction of log E), the mean router probability of each
                   expert, and the mean probability mass of the chosen top-k
    coactivation   per layer: C[i, j] = tokens that chose both experts i and j (C[i, i] = hits
                   of i), and the lift C[i, j] * N / (C[i, i] * C[j, j]) (1 = independent)
    vocab          per layer and expert: the tokens routed to it most often (count), and the
                   share of each such token's occurrences that went to that expert

Shape legend: N tokens, E routed experts, L layers, V vocab rows of the tokenizer.
Each result's `to_json()` is what the CLI writes; export.py turns it into long-format CSV.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..model import Model
from . import corpus
from .analyses import (BATCH_TOKENS, LayerStream, _bar, _batches, get_preset, model_info)
from .decode import token_text

VOCAB_BUDGET = 1 << 29        # bytes of [V, E] int32 counters the vocab analysis may hold


def _kw(interventions, intervention_kwargs):
    return dict(intervention_kwargs) if interventions is None else {"interventions": interventions}


def _stream(model, domains, suffixes, on_layer_for, *, preset, corpus_kw, kw, progress, what,
            positions="all"):
    """Run every batch of every domain with a LayerStream calling on_layer_for(domain); after
    each batch fn.batch_done(batch index) when fn has it, and after the domain fn.tokens is
    summed over the ranks (corpus parallel)."""
    p = get_preset(preset)
    for dom in corpus.as_domains(domains):
        fn = on_layer_for(dom.name)
        fn.tokens = 0
        with _bar(dom, what, progress) as bar:
            for b in _batches(model, dom, bar, preset=p, **corpus_kw):
                model.forward(b.input_ids, attention_mask=b.attention_mask, logits="last",
                              capture=LayerStream(model, suffixes, fn, positions), **kw)
                fn.tokens += int(b.attention_mask.sum())
                if hasattr(fn, "batch_done"):
                    fn.batch_done(b.index)
        fn.tokens = distributed.sum_int(fn.tokens)
        yield dom.name, fn


def _corpus_kw(max_len, batch_tokens, split, max_samples, max_tokens):
    return dict(max_len=max_len, batch_tokens=batch_tokens, split=split,
                max_samples=max_samples, max_tokens=max_tokens)


# ---- router entropy and mean router probability ----------------------------------------------

@dataclass
class RouterStatsResult:
    model: dict
    domains: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"analysis": "router-stats", "model": self.model,
                "definition": {"entropy": "H(p) = -sum_e p_e ln p_e over all E experts, nats; "
                                          "mean and std over tokens",
                               "entropy_fraction": "mean entropy / ln E (1 = uniform router)",
                               "mean_prob": "per expert, the router probability averaged "
                                            "over tokens (sums to 1)",
                               "topk_mass": "mean over tokens of the chosen experts' summed "
                                            "router probability"},
                "domains": self.domains}


@torch.no_grad()
def router_stats(model: Model, domains, *, preset="notes", max_len=None,
                 batch_tokens: int = BATCH_TOKENS, split=None, max_samples=None,
                 max_tokens=None, progress: bool = True, interventions=None,
                 **intervention_kwargs) -> RouterStatsResult:
    L, E = model.config.num_hidden_layers, model.config.n_routed_experts
    moe = list(model.config.moe_layers)
    res = RouterStatsResult(model_info(model))

    def for_domain(name):
        # one batch's sums, folded into the totals in batch order (distributed.OrderedSum)
        acc = torch.zeros((L, 4), dtype=torch.float64, device=model.device)  # H, H^2, n, mass
        probs = torch.zeros((L, E), dtype=torch.float64, device=model.device)
        totals = (distributed.OrderedSum(acc), distributed.OrderedSum(probs))

        def fn(l, taps):
            p = taps["moe.hook_router_probs"].double()
            if p.shape[0] == 0:
                return
            h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
            acc[l, 0] += h.sum()
            acc[l, 1] += (h * h).sum()
            acc[l, 2] += h.numel()
            ids = taps["moe.hook_topk_ids"].long()
            acc[l, 3] += p.gather(1, ids.clamp_min(0)).sum() if ids.numel() else 0.0
            probs[l] += p.sum(0)
        def batch_done(index):
            for t, part in zip(totals, (acc, probs)):
                t.add(index, part)
                part.zero_()
        fn.batch_done, fn.totals = batch_done, totals
        return fn

    for name, fn in _stream(model, domains, ["moe.hook_router_probs", "moe.hook_topk_ids"],
                            for_domain, preset=preset,
                            corpus_kw=_corpus_kw(max_len, batch_tokens, split, max_samples,
                                                 max_tokens),
                            kw=_kw(interventions, intervention_kwargs), progress=progress,
                            what="router-stats"):
        a, pr = (t.result().cpu() for t in fn.totals)
        layers = {}
        for l in moe:
            s, sq, n, mass = a[l].tolist()
            mean = s / n if n else float("nan")
            layers[str(l)] = {
                "entropy_mean": mean,
                "entropy_std": math.sqrt(max(sq / n - mean * mean, 0.0)) if n else float("nan"),
                "entropy_fraction": mean / math.log(E) if n else float("nan"),
                "topk_mass": mass / n if n else float("nan"),
                "mean_prob": [x / n if n else float("nan") for x in pr[l].tolist()]}
        res.domains[name] = {"tokens": getattr(fn, "tokens", 0), "layers": layers}
    return res


# ---- expert co-activation --------------------------------------------------------------------

@dataclass
class CoactivationResult:
    model: dict
    domains: dict[str, dict] = field(default_factory=dict)

    def lift(self, domain: str, layer: int) -> torch.Tensor:
        """[E, E] C[i, j] * N / (C[i, i] * C[j, j]); NaN where an expert was never chosen."""
        d = self.domains[domain]
        c = torch.tensor(d["layers"][str(layer)], dtype=torch.float64)
        hits = c.diagonal()
        return c * d["tokens"] / (hits[:, None] * hits[None, :])

    def to_json(self) -> dict:
        return {"analysis": "coactivation", "model": self.model,
                "definition": "counts[l][i][j] = tokens whose top-k in layer l holds both i "
                              "and j (diagonal: tokens choosing i); lift = counts * tokens / "
                              "(counts[i][i] * counts[j][j]), 1 when independent",
                "domains": self.domains}


@torch.no_grad()
def coactivation(model: Model, domains, *, preset="notes", max_len=None,
                 batch_tokens: int = BATCH_TOKENS, split=None, max_samples=None,
                 max_tokens=None, progress: bool = True, interventions=None,
                 **intervention_kwargs) -> CoactivationResult:
    L, E = model.config.num_hidden_layers, model.config.n_routed_experts
    moe = list(model.config.moe_layers)
    res = CoactivationResult(model_info(model))

    def for_domain(name):
        counts = torch.zeros((L, E, E), dtype=torch.float64, device=model.device)

        def fn(l, taps):
            ids = taps["moe.hook_topk_ids"].long()
            if ids.numel() == 0:
                return
            x = torch.zeros((ids.shape[0], E), dtype=torch.float64, device=ids.device)
            x.scatter_(1, ids.clamp_min(0), (ids >= 0).double())   # one-hot of the chosen set
            counts[l] += x.t() @ x
        fn.counts = counts
        return fn

    for name, fn in _stream(model, domains, ["moe.hook_topk_ids"], for_domain, preset=preset,
                            corpus_kw=_corpus_kw(max_len, batch_tokens, split, max_samples,
                                                 max_tokens),
                            kw=_kw(interventions, intervention_kwargs), progress=progress,
                            what="coactivation"):
        c = distributed.all_sum_(fn.counts.round().long()).cpu()   # integer counts: exact in any order
        res.domains[name] = {"tokens": getattr(fn, "tokens", 0),
                             "layers": {str(l): c[l].tolist() for l in moe}}
    return res


# ---- vocabulary specialisation ---------------------------------------------------------------

@dataclass
class VocabResult:
    model: dict
    top: int
    domains: list[str]
    tokens: int = 0
    layers: dict[str, list] = field(default_factory=dict)   # layer -> per expert: top tokens

    def to_json(self) -> dict:
        return {"analysis": "vocab", "model": self.model, "domains": self.domains,
                "tokens": self.tokens, "top": self.top,
                "definition": "per layer and expert, the `top` tokens routed to it most often "
                              "over all domains together: [token, id, count, share], share = "
                              "count / occurrences of that token",
                "layers": self.layers}


@torch.no_grad()
def vocab(model: Model, domains, *, top: int = 10, layers=None, preset="notes", max_len=None,
          batch_tokens: int = BATCH_TOKENS, split=None, max_samples=None, max_tokens=None,
          progress: bool = True, interventions=None, **intervention_kwargs) -> VocabResult:
    """Tokens most routed to each expert. Holds a [V, E] int32 counter per layer on the device:
    `layers` (default: every MoE layer) bounds it, and more than VOCAB_BUDGET bytes is refused."""
    if top < 1:
        raise ValueError(f"top = {top}; expected at least 1")
    E = model.config.n_routed_experts
    moe = list(model.config.moe_layers)
    layers = moe if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if l not in moe]
    if bad:
        raise ValueError(f"layers {bad} are not MoE layers; expected some of {moe}")
    tok = model.tokenizer
    V = tok.vocab_size if tok is not None else model.config.vocab_size
    need = V * E * 4 * len(layers)
    if need > VOCAB_BUDGET:
        raise ValueError(f"counting {len(layers)} layers needs {need >> 20} MiB of [V, E] "
                         f"counters (limit {VOCAB_BUDGET >> 20} MiB); pick fewer layers")
    doms = corpus.as_domains(domains)
    counts = {l: torch.zeros((V, E), dtype=torch.int32, device=model.device) for l in layers}
    occ = torch.zeros(V, dtype=torch.int64, device=model.device)
    p = get_preset(preset)
    state = {}

    def fn(l, taps):
        if l not in counts:
            return
        ids = taps["moe.hook_topk_ids"].long()
        t = state["ids"]
        if ids.numel() == 0:
            return
        K = ids.shape[1]
        flat = (t.unsqueeze(1).expand(-1, K) * E + ids.clamp_min(0)).reshape(-1)
        ok = (ids >= 0).reshape(-1)
        counts[l].view(-1).index_add_(0, flat[ok], torch.ones_like(flat[ok], dtype=torch.int32))

    kw = _kw(interventions, intervention_kwargs)
    corpus_kw = _corpus_kw(max_len, batch_tokens, split, max_samples, max_tokens)
    n_tokens = 0
    for dom in doms:
        with _bar(dom, "vocab", progress) as bar:
            for b in _batches(model, dom, bar, preset=p, **corpus_kw):
                t = b.input_ids.reshape(-1)[b.attention_mask.reshape(-1)]
                t = t.clamp(max=V - 1)
                state["ids"] = t
                occ.index_add_(0, t, torch.ones_like(t))
                n_tokens += t.numel()
                model.forward(b.input_ids, attention_mask=b.attention_mask, logits="last",
                              capture=LayerStream(model, ["moe.hook_topk_ids"], fn), **kw)
    for c in counts.values():
        distributed.all_sum_(c)
    distributed.all_sum_(occ)
    n_tokens = distributed.sum_int(n_tokens)
    res = VocabResult(model_info(model), top, [d.name for d in doms], n_tokens)
    o = occ.cpu()
    for l in layers:
        c = counts[l].cpu()                                    # [V, E]
        n = min(top, V)
        vals, idx = torch.sort(c.t(), dim=1, descending=True, stable=True)   # ties: lower id
        vals, idx = vals[:, :n], idx[:, :n]                    # [E, n]
        per_expert = []
        for e in range(E):
            per_expert.append([[token_text(tok, int(i)), int(i), int(v), round(int(v) / int(o[i]), 6)]
                               for v, i in zip(vals[e].tolist(), idx[e].tolist()) if v > 0])
        res.layers[str(l)] = per_expert
    return res
