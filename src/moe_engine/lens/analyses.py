"""The four MoE Lens analyses (docs/lens.md), each a function returning a result whose
`to_json()` is what the CLI writes and what the plots read.

    route_corpus   hits per expert per layer per domain, from the device usage counters
    early_decode   logit lens of the layer output, H^{l_k} (k = 1..K) and base + E_j per layer
    topk_sweep     per-sample perplexity (geometric mean per domain) with k overridden everywhere
    similarity     cos(H^{l_1}, H^{l_K}) per layer, mean over tokens

Shape legend: B samples per batch, T batch length, N valid tokens, L layers, E routed experts,
K top-k, D hidden, V vocab.

Presets: "notes" (the default, docs/lens.md) and "paper" (the public MoE Lens code's choices:
base u instead of a, weights renormalised by their running sum, last token only, no final norm
in the lens) minus its expert-output misalignment, which no option reproduces.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..interventions import Interventions, for_call
from ..model import Model, rms_norm
from ..taps import Capture, TapRequest, _layer_of
from . import corpus as C
from .decode import cumulative, lens_tap_names, logit_lens, single, token_text

BATCH_TOKENS = 8192           # padded tokens per forward call in the corpus analyses


@dataclass(frozen=True)
class Preset:
    name: str
    base: str = "resid_mid"       # H^{l_k} starts from a ("resid_mid") or u ("moe_in")
    renormalize: bool = False     # divide sum_{j<=k} w_j E_j by sum_{j<=k} w_j
    positions: str = "all"        # tokens the similarity averages over: "all" | "last"
    norm: str = "final"           # early decoding: lm_head(RMSNorm_final(.)) or lm_head(.)


PRESETS = {
    "notes": Preset("notes"),
    "paper": Preset("paper", base="moe_in", renormalize=True, positions="last", norm="none"),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def model_info(model: Model) -> dict:
    c = model.config
    return {"path": str(model.path), "backend": model.backend,
            "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
            "layers": c.num_hidden_layers, "moe_layers": list(c.moe_layers),
            "experts": c.n_routed_experts, "topk": c.num_experts_per_tok, "vocab": c.vocab_size}


def _max_len(model: Model, max_len: int | None) -> int:
    ctx = model.config.max_position_embeddings
    return min(C.MAX_LEN if max_len is None else max_len, ctx)


def _bar(domain: C.Domain, what: str, progress: bool):
    total = domain.total_bytes or None
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"{what} {domain.name}",
                disable=not progress, leave=False)


def _batches(model: Model, domain: C.Domain, bar, *, max_len, batch_tokens, split, max_samples,
             max_tokens):
    samples = C.iter_samples(domain, model.tokenizer, _max_len(model, max_len), split=split,
                             max_samples=max_samples, max_tokens=max_tokens, progress=bar)
    return C.iter_batches(samples, batch_tokens, model.device)


class LayerStream(Capture):
    """A Capture that hands each MoE layer's requested taps to `fn(layer, {suffix: tensor})` as
    soon as the layer's last one arrives and then drops them, so memory holds one layer's taps
    at a time whatever the depth of the model."""

    def __init__(self, model: Model, suffixes: Sequence[str], fn: Callable, positions="all"):
        names = [f"blocks.*.{s}" for s in suffixes]
        super().__init__(TapRequest(names, list(model.config.moe_layers), positions))
        self._suffixes = tuple(suffixes)
        self._fn = fn

    def __call__(self, name, value):
        out = super().__call__(name, value)
        l = _layer_of(name)
        if l is not None and name in self._values:
            keys = [f"blocks.{l}.{s}" for s in self._suffixes]
            if all(k in self._values for k in keys):
                taps = {s: self._values.pop(k)[-1] for s, k in zip(self._suffixes, keys)}
                for k in keys:
                    self._rows.pop(k, None)
                self._fn(l, taps)
        return out


# ---- 1. routing distribution -----------------------------------------------------------------

@dataclass
class RoutingResult:
    model: dict
    topk: list[int]                       # k per layer (0 for dense layers)
    domains: dict[str, dict] = field(default_factory=dict)  # name -> {tokens, samples, hits [L][E]}

    def percent(self, domain: str) -> torch.Tensor:
        """[L, E] percent of the domain's tokens routed to each expert (rows sum to 100·k)."""
        d = self.domains[domain]
        return torch.tensor(d["hits"], dtype=torch.float64) * 100.0 / max(d["tokens"], 1)

    def to_json(self) -> dict:
        E = self.model["experts"]
        out = {"analysis": "routing", "model": self.model, "topk": self.topk,
               "uniform_percent": {str(l): 100.0 * self.topk[l] / E
                                   for l in self.model["moe_layers"]},
               "domains": {}}
        for name, d in self.domains.items():
            pct = self.percent(name)
            layers = {}
            for l in self.model["moe_layers"]:
                share = pct[l] / max(self.topk[l], 1)             # percent of routing decisions
                cum = torch.cumsum(torch.sort(share, descending=True).values, 0)
                top = torch.argsort(share, descending=True, stable=True)[:8].tolist()
                half = int((cum < 50.0).sum()) + 1 if d["tokens"] else 0
                layers[str(l)] = {"hits": d["hits"][l],
                                  "percent": [round(x, 6) for x in pct[l].tolist()],
                                  "experts_for_half": half, "top_experts": top}
            out["domains"][name] = {"tokens": d["tokens"], "samples": d["samples"],
                                    "layers": layers}
        return out


@torch.no_grad()
def route_corpus(model: Model, domains, *, max_len: int | None = None,
                 batch_tokens: int = BATCH_TOKENS, split: str = "file",
                 max_samples: int | None = None, max_tokens: int | None = None,
                 progress: bool = True, interventions: Interventions | None = None,
                 **intervention_kwargs) -> RoutingResult:
    """Count (token, slot) hits per expert per layer over each domain on the device (usage
    counters [L, E] and a token counter per domain; the host reads them once at the end).
    The tokens counted are exactly the tokens routed (pads never reach the MoE layer)."""
    doms = C.as_domains(domains)
    corpus_kw = dict(max_len=max_len, batch_tokens=batch_tokens, split=split,
                     max_samples=max_samples, max_tokens=max_tokens)
    kw = dict(intervention_kwargs) if interventions is None else {"interventions": interventions}
    routing = None
    res = None
    for dom in doms:
        usage = model.new_usage_counters()
        # The kernels count in int32; a hot expert of a multi-billion-token corpus would overflow
        # it, so each batch's counts are drained into int64 (on the device, no synchronisation).
        hits = torch.zeros(usage.shape, dtype=torch.int64, device=model.device)
        tokens = torch.zeros((), dtype=torch.int64, device=model.device)
        n_samples = 0
        with _bar(dom, "routing", progress) as bar:
            for b in _batches(model, dom, bar, **corpus_kw):
                model.forward(b.input_ids, attention_mask=b.attention_mask, usage=usage,
                              logits="last", **kw)
                hits += usage
                usage.zero_()
                tokens += b.attention_mask.sum()
                n_samples += len(b.lengths)
        if routing is None:
            iv = interventions if interventions is not None else for_call(None, intervention_kwargs)
            routing = iv.resolve(model.config, torch.device("cpu"))
            moe = set(model.config.moe_layers)
            res = RoutingResult(model_info(model), [routing.k[l] if l in moe else 0
                                                    for l in range(model.config.num_hidden_layers)])
        res.domains[dom.name] = {"tokens": int(tokens), "samples": n_samples,
                                 "hits": hits.cpu().tolist()}
    return res


# ---- 2. early decoding -----------------------------------------------------------------------

@dataclass
class EarlyDecodeResult:
    data: dict

    def to_json(self) -> dict:
        return self.data


def _cells(tok, ids: torch.Tensor, probs: torch.Tensor) -> list:
    """[..., n] ids/probs -> nested lists of [token text, prob, token id]."""
    if ids.dim() == 1:
        return [[token_text(tok, int(i)), round(float(p), 6), int(i)] for i, p in zip(ids, probs)]
    return [_cells(tok, i, p) for i, p in zip(ids, probs)]


@torch.no_grad()
def early_decode(model: Model, prompt: str | Sequence[int], *, position: int = -1, top: int = 5,
                 preset: str | Preset = "notes", norm: str | None = None, label: str | None = None,
                 interventions: Interventions | None = None,
                 **intervention_kwargs) -> EarlyDecodeResult:
    """Logit lens at one position of one prompt, for every layer: the layer output
    (hook_resid_post), and on MoE layers H^{l_k} for k = 1..K and base + E_j for each chosen
    expert j, with the chosen experts' ids and weights (docs/lens.md analysis 2)."""
    p = get_preset(preset)
    norm = p.norm if norm is None else norm
    tok = model.tokenizer
    ids = tok.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    pos = position if position >= 0 else len(ids) + position
    if not 0 <= pos < len(ids):
        raise ValueError(f"position {position} is outside the prompt's {len(ids)} tokens")
    moe = list(model.config.moe_layers)
    names = ["blocks.*.hook_resid_post", *lens_tap_names("*", p.base), "blocks.*.moe.hook_topk_ids"]
    cap = Capture(TapRequest(names, positions=[pos]))
    kw = dict(intervention_kwargs) if interventions is None else {"interventions": interventions}
    model.forward(torch.tensor(ids[:pos + 1]), capture=cap, logits="last", **kw)
    layers = []
    for l in range(model.config.num_hidden_layers):
        out = logit_lens(model, cap[f"blocks.{l}.hook_resid_post"][0], norm=norm, top=top)
        row = {"layer": l, "moe": l in moe, "layer_out": _cells(tok, out.top_ids, out.top_probs)}
        if l in moe:
            K = cap[f"blocks.{l}.moe.hook_topk_ids"].shape[1]
            row["experts"] = cap[f"blocks.{l}.moe.hook_topk_ids"][0].tolist()
            weights = cap[f"blocks.{l}.moe.hook_topk_weights"][0].tolist()
            row["weights"] = [round(w, 6) for w in weights]
            if K:
                H = cumulative(cap, l, base=p.base, renormalize=p.renormalize)[0]
                cum = logit_lens(model, H, norm=norm, top=top)
                one = logit_lens(model, single(cap, l, base=p.base)[0], norm=norm, top=top)
                row["cumulative"] = _cells(tok, cum.top_ids, cum.top_probs)
                row["single"] = _cells(tok, one.top_ids, one.top_probs)
            else:
                row["cumulative"], row["single"] = [], []
        layers.append(row)
    toks = [token_text(tok, i) for i in ids[:pos + 1]]
    return EarlyDecodeResult({"analysis": "early-decode", "model": model_info(model),
                              "preset": p.name, "label": label, "norm": norm, "base": p.base,
                              "renormalize": p.renormalize, "position": pos,
                              "prompt_tokens": toks, "top": top, "layers": layers})


# ---- 3. perplexity vs top-k ------------------------------------------------------------------

@dataclass
class TopkSweepResult:
    model: dict
    ks: list[int]
    reference_k: int
    domains: dict[str, dict] = field(default_factory=dict)  # name -> {log_ppl {k: [..]}, ...}

    def perplexity(self, domain: str, k: int) -> float:
        """Geometric mean over samples of the per-sample perplexity."""
        lp = self.domains[domain]["log_ppl"][k]
        return math.exp(sum(lp) / len(lp)) if lp else float("nan")

    def to_json(self) -> dict:
        out = {"analysis": "topk-sweep", "model": self.model, "ks": self.ks,
               "reference_k": self.reference_k,
               "normalised": "log(ppl_k) / log(ppl_reference_k)", "domains": {}}
        for name, d in self.domains.items():
            ppl = {k: self.perplexity(name, k) for k in self.ks}
            ref = math.log(ppl[self.reference_k]) if self.reference_k in ppl else float("nan")
            out["domains"][name] = {
                "samples": d["samples"], "tokens": d["tokens"],
                "perplexity": {str(k): ppl[k] for k in self.ks},
                "normalised_log_perplexity": {
                    str(k): (math.log(ppl[k]) / ref if ref else float("nan")) for k in self.ks},
                "increase_vs_reference_percent": {
                    str(k): 100.0 * (ppl[k] / ppl[self.reference_k] - 1.0) for k in self.ks},
                "per_sample_perplexity": {
                    str(k): [math.exp(x) for x in d["log_ppl"][k]] for k in self.ks}}
        return out


def _sample_nll(model: Model, b: C.Batch, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed next-token NLL [B] and predicted-token counts [B] from the last layer's
    hook_resid_post [N, D] (valid tokens, sequence-major, in position order)."""
    w = model.weights
    flat_mask = b.attention_mask.reshape(-1)
    valid = flat_mask.nonzero().squeeze(1)
    T = b.attention_mask.shape[1]
    seq = valid // T
    tgt = b.input_ids.reshape(-1)[valid]
    has_next = torch.zeros_like(seq, dtype=torch.bool)
    has_next[:-1] = seq[1:] == seq[:-1]
    rows = has_next.nonzero().squeeze(1)
    V = w.lm_head.shape[0]
    nll = torch.zeros(len(b.lengths), dtype=torch.float64, device=model.device)
    step = max(1, (1 << 26) // V)
    for lo in range(0, rows.numel(), step):
        r = rows[lo:lo + step]
        h = rms_norm(resid[r], w.final_norm, model.config.rms_norm_eps)
        logp = torch.log_softmax((h @ w.lm_head.t()).float(), dim=-1)
        nll.index_add_(0, seq[r], -logp.gather(1, tgt[r + 1].unsqueeze(1)).squeeze(1).double())
    counts = torch.bincount(seq[rows], minlength=len(b.lengths))
    return nll, counts


@torch.no_grad()
def topk_sweep(model: Model, domains, ks: Sequence[int] | None = None, *,
               reference_k: int | None = None, max_len: int | None = None,
               batch_tokens: int = BATCH_TOKENS, split: str = "file",
               max_samples: int | None = None, max_tokens: int | None = None,
               progress: bool = True, renormalize: bool | None = None) -> TopkSweepResult:
    """Perplexity with k overridden on every MoE layer (weights not renormalised unless asked:
    the model's own semantics; shared experts on). Each batch of samples runs once per k, so
    the corpus is read once. Samples with fewer than 2 tokens predict nothing and are skipped."""
    K = model.config.num_experts_per_tok
    ks = list(range(1, K + 1)) if ks is None else [int(k) for k in ks]
    reference_k = K if reference_k is None else reference_k
    if reference_k not in ks:
        ks = sorted(set(ks) | {reference_k})
    L = model.config.num_hidden_layers
    last = f"blocks.{L - 1}.hook_resid_post"
    res = TopkSweepResult(model_info(model), ks, reference_k)
    corpus_kw = dict(max_len=max_len, batch_tokens=batch_tokens, split=split,
                     max_samples=max_samples, max_tokens=max_tokens)
    for dom in C.as_domains(domains):
        log_ppl = {k: [] for k in ks}
        n_samples = n_tokens = 0
        with _bar(dom, "topk-sweep", progress) as bar:
            for b in _batches(model, dom, bar, **corpus_kw):
                keep = None
                for k in ks:
                    cap = Capture(TapRequest([last]))
                    model.forward(b.input_ids, attention_mask=b.attention_mask, capture=cap,
                                  logits="last", topk=k, renormalize=renormalize)
                    nll, cnt = _sample_nll(model, b, cap[last])
                    keep = cnt > 0
                    log_ppl[k].append((nll[keep] / cnt[keep]).cpu())
                n_samples += int(keep.sum())
                n_tokens += sum(n for n, kp in zip(b.lengths, keep.tolist()) if kp)
        res.domains[dom.name] = {"samples": n_samples, "tokens": n_tokens,
                                 "log_ppl": {k: torch.cat(v).tolist() if v else []
                                             for k, v in log_ppl.items()}}
    return res


# ---- 4. single-vs-ensemble similarity -------------------------------------------------------

@dataclass
class SimilarityResult:
    model: dict
    preset: str
    base: str
    renormalize: bool
    positions: str
    domains: dict[str, dict] = field(default_factory=dict)  # name -> {layer: {mean, std, count}}

    def to_json(self) -> dict:
        return {"analysis": "similarity", "model": self.model, "preset": self.preset,
                "base": self.base, "renormalize": self.renormalize, "positions": self.positions,
                "definition": "cos(H^{l_1}, H^{l_K}) per token; mean and std over tokens",
                "domains": self.domains}


@torch.no_grad()
def similarity(model: Model, domains, *, preset: str | Preset = "notes",
               max_len: int | None = None, batch_tokens: int = BATCH_TOKENS, split: str = "file",
               max_samples: int | None = None, max_tokens: int | None = None,
               progress: bool = True, interventions: Interventions | None = None,
               **intervention_kwargs) -> SimilarityResult:
    """cos(H^{l_1}, H^{l_K}) per token per MoE layer, accumulated on the device (sum, sum of
    squares, count) one layer at a time (LayerStream), so neither depth nor corpus size bounds
    memory. K is the layer's k in this call (the model's unless overridden)."""
    p = get_preset(preset)
    moe = list(model.config.moe_layers)
    res = SimilarityResult(model_info(model), p.name, p.base, p.renormalize, p.positions)
    suffixes = [n.split(".", 2)[2] for n in lens_tap_names("*", p.base)]
    corpus_kw = dict(max_len=max_len, batch_tokens=batch_tokens, split=split,
                     max_samples=max_samples, max_tokens=max_tokens)
    kw = dict(intervention_kwargs) if interventions is None else {"interventions": interventions}
    for dom in C.as_domains(domains):
        acc = torch.zeros((model.config.num_hidden_layers, 3), dtype=torch.float64,
                          device=model.device)                  # sum, sum of squares, count

        def on_layer(l, taps):
            # H^{l_1} and H^{l_K} only, slot by slot: O(N·D) fp32 besides the taps themselves,
            # where the full cumulative() would be [N, K, D] fp32.
            base, w, e = (taps[s] for s in suffixes)
            N, K = w.shape
            if N == 0 or K == 0:
                return
            w = w.float()
            first = w[:, :1] * e[:, 0].float()
            full = first.clone()
            for j in range(1, K):
                full += w[:, j:j + 1] * e[:, j].float()
            if p.renormalize:
                s1, sK = w[:, :1], w.sum(1, keepdim=True)
                first = torch.where(s1 > 0, first / torch.where(s1 > 0, s1, 1.0), first)
                full = torch.where(sK > 0, full / torch.where(sK > 0, sK, 1.0), full)
            h1, hK = base.float() + first, base.float() + full
            cos = torch.nn.functional.cosine_similarity(h1, hK, dim=-1).double()
            acc[l, 0] += cos.sum()
            acc[l, 1] += (cos * cos).sum()
            acc[l, 2] += cos.numel()

        with _bar(dom, "similarity", progress) as bar:
            for b in _batches(model, dom, bar, **corpus_kw):
                model.forward(b.input_ids, attention_mask=b.attention_mask, logits="last",
                              capture=LayerStream(model, suffixes, on_layer, p.positions), **kw)
        a = acc.cpu()
        out = {}
        for l in moe:
            s, sq, n = a[l].tolist()
            mean = s / n if n else float("nan")
            std = math.sqrt(max(sq / n - mean * mean, 0.0)) if n else float("nan")
            out[str(l)] = {"mean": mean, "std": std, "count": int(n)}
        res.domains[dom.name] = out
    return res
