"""The four MoE Lens analyses (docs/lens.md), each a function returning a result whose
`to_json()` is what the CLI writes and what the plots read.

    route_corpus   hits per expert per layer per domain, from the device usage counters
    early_decode   logit lens of the layer output, H^{l_k} (k = 1..K) and base + E_j per layer
    topk_sweep     per-sample perplexity (geometric mean per domain) with k overridden everywhere
    similarity     cos(H^{l_1}, H^{l_K}) per layer, mean over tokens

Shape legend: B samples per batch, Q batch length, N valid tokens, L layers, E routed experts,
K top-k, D hidden, V vocab.

Presets (docs/lens.md has the formulas per analysis): "notes" (the default, our clean
definitions), "paper" (the public MoE Lens code's definitions: per-line documents, early decoding
on a + w E without the final norm, similarity on u with renormalised weights at the last token,
perplexity per document) and "paper-as-run" (the same plus two defects of that code as it ran:
expert outputs scaled in place by their weight before being stored, and routing percentages over
a whole-file token count), so its published figures can be reproduced.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..interventions import Interventions, for_call
from ..model import Model, rms_norm
from ..taps import Capture, TapRequest, _layer_of
from . import corpus
from .decode import cumulative, lens_tap_names, logit_lens, renormalised, single, token_text

BATCH_TOKENS = 8192           # padded tokens per forward call in the corpus analyses
PAPER_RENORM_SKIP = 1e-5      # the MoE Lens code renormalises only when |sum w - 1| > 1e-5
PAPER_ROUTING_LEN = 4096      # the MoE Lens routing code's chunk length (tokens per line chunk)


@dataclass(frozen=True)
class Preset:
    """Every choice in which the MoE Lens code and our definitions differ (docs/lens.md)."""
    name: str
    base: str = "resid_mid"       # early decoding: H^{l_k} and single columns start from a or u
    norm: str = "final"           # early decoding: lm_head(RMSNorm_final(.)) or lm_head(.)
    score: str = "prob"           # early decoding: cell colour = top-1 probability or raw logit
    sim_base: str = "resid_mid"   # similarity: base of H^{l_1}, H^{l_K}
    renormalize: bool = False     # similarity: divide sum_{j<=k} w_j E_j by sum_{j<=k} w_j
    renorm_skip: float = 0.0      # ... except when |sum w - 1| <= renorm_skip
    positions: str = "all"        # tokens the similarity averages over: "all" | "last"
    split: str = "file"           # documents of a plain-text file (the CLI's --split default)
    documents: bool = False       # samples = stripped documents cut into chunks (the paper code)
                                  # and perplexity pooled per document, not per chunk
    weighted: bool = False        # stored expert outputs are w_j E_j (paper code as run)
    routing_max_len: int = corpus.MAX_LEN          # tokens per routing sample
    routing_denominator: str = "routed"       # "routed" tokens | "file": whole-file token count


PRESETS = {
    "notes": Preset("notes"),
    "paper": Preset("paper", norm="none", score="logit", sim_base="moe_in", renormalize=True,
                    renorm_skip=PAPER_RENORM_SKIP, positions="last", split="line",
                    documents=True, routing_max_len=PAPER_ROUTING_LEN),
    "paper-as-run": Preset("paper-as-run", norm="none", score="logit", sim_base="moe_in",
                           renormalize=True, renorm_skip=PAPER_RENORM_SKIP, positions="last",
                           split="line", documents=True, weighted=True,
                           routing_max_len=PAPER_ROUTING_LEN, routing_denominator="file"),
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
    return min(corpus.MAX_LEN if max_len is None else max_len, ctx)


def _bar(domain: corpus.Domain, what: str, progress: bool):
    """A bar of the tokens run through the model (advanced by _batches after each batch is
    processed). Counting the bytes read moved it only while a file was read, which for a whole
    file happens before the first forward: it sat at 100% for the whole run, or vanished."""
    return tqdm(unit="tok", unit_scale=True, desc=f"{what} {domain.name}", disable=not progress,
                leave=True)


def _batches(model: Model, domain: corpus.Domain, bar, *, max_len, batch_tokens, split, max_samples,
             max_tokens, preset: Preset | None = None, bos: str = "every"):
    """Padded batches of the domain's samples, each with `doc` [B] int64: the document (the
    sample itself unless the preset pools chunks per document) of each of its samples, and
    `index`, the batch's number in the domain. Under torchrun (corpus parallel) this rank gets
    only its batches (distributed.mine); the caller reduces with distributed.py."""
    p = get_preset("notes" if preset is None else preset)
    split = p.split if split is None else split
    if p.documents:
        pairs = document_samples(domain, model.tokenizer, _max_len(model, max_len), split=split,
                                 bos=bos, max_samples=max_samples, max_tokens=max_tokens)
    else:
        pairs = enumerate(corpus.iter_samples(domain, model.tokenizer, _max_len(model, max_len),
                                         split=split, max_samples=max_samples,
                                         max_tokens=max_tokens))
    docs: list[int] = []

    def samples():
        for d, s in pairs:
            docs.append(d)
            yield s

    for i, b in enumerate(corpus.iter_batches(samples(), batch_tokens, model.device)):
        n = len(b.lengths)
        b.doc = torch.tensor(docs[:n], dtype=torch.int64)
        b.index = i
        del docs[:n]
        if not distributed.mine(i):
            continue
        yield b
        if bar is not None:  # the caller has run the batch through the model
            bar.update(sum(b.lengths))


def document_samples(domain: corpus.Domain, tokenizer, max_len: int, *, split: str = "line",
                     bos: str = "every", max_samples: int | None = None,
                     max_tokens: int | None = None, progress=None):
    """(document index, token ids) as the MoE Lens code made its samples: each document
    stripped of surrounding whitespace (empty ones skipped), encoded, and cut into chunks of at
    most max_len tokens. bos="every": every chunk starts with BOS (its routing code re-encoded
    each chunk); bos="first": only the document's first chunk does (its perplexity code cut the
    encoded ids). max_samples counts documents. A "file" document is held whole in memory."""
    if bos not in ("every", "first"):
        raise ValueError(f"bos = {bos!r}; expected 'every' or 'first'")
    if max_len < 2:
        raise ValueError(f"max_len = {max_len}; expected at least 2 tokens per chunk")

    def chunks_of(ids: list[int], lead: list[int]):
        if bos == "first":
            ids = lead + ids
            return [ids[i:i + max_len] for i in range(0, len(ids), max_len)]
        body = max_len - len(lead)
        return [lead + ids[i:i + body] for i in range(0, len(ids), body)]

    def documents():
        if domain.token_ids is not None:
            for ids in domain.token_ids:
                yield list(ids), []
            return
        if tokenizer is None:
            raise ValueError(f"domain {domain.name!r} is text but the model has no tokenizer")
        lead = ([tokenizer.bos_id] if tokenizer.add_bos_token and tokenizer.bos_id is not None
                else [])
        parts: list[str] = []
        for text, ends in corpus.iter_text_pieces(domain, split):
            if progress is not None:
                progress.update(len(text.encode("utf-8")))
            parts.append(text)
            if not ends:
                continue
            doc, parts = "".join(parts).strip(), []
            if doc:
                yield tokenizer.encode(doc, add_bos=False), lead

    n_tokens = 0
    for d, (ids, lead) in enumerate(documents()):
        if max_samples is not None and d >= max_samples:
            return
        for chunk in chunks_of(ids, lead):
            if max_tokens is not None and n_tokens + len(chunk) > max_tokens:
                chunk = chunk[:max_tokens - n_tokens]
                if len(chunk) < 2:
                    return
            if not chunk:
                continue
            yield d, chunk
            n_tokens += len(chunk)
            if max_tokens is not None and n_tokens >= max_tokens:
                return


def file_tokens(domain: corpus.Domain, tokenizer) -> int:
    """Tokens of each plain-text file of the domain encoded whole, plus one BOS per file: the
    denominator of the MoE Lens routing code (it divided per-line routing counts by this).
    Encoded in blocks cut after a newline; other sources count 0 (then the routed tokens are
    used)."""
    if domain.files == () or tokenizer is None:
        return 0
    lead = 1 if tokenizer.add_bos_token and tokenizer.bos_id is not None else 0
    n = 0
    for path in domain.files:
        if path.suffix.lower() in (".json", ".jsonl"):
            return 0
        n += lead + sum(len(tokenizer.encode(t, add_bos=False))
                        for t, _ in corpus.iter_file_blocks(path, "file") if t)
    return n


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
    preset: str = "notes"

    def denominator(self, domain: str) -> int:
        """Tokens the percentages divide by: the tokens routed, or under paper-as-run the
        whole-file token count where there is one (`file_tokens`)."""
        d = self.domains[domain]
        return d.get("file_tokens") or d["tokens"]

    def percent(self, domain: str) -> torch.Tensor:
        """[L, E] percent of the domain's tokens routed to each expert (rows sum to 100·k when
        the denominator is the routed tokens)."""
        d = self.domains[domain]
        return torch.tensor(d["hits"], dtype=torch.float64) * 100.0 / max(self.denominator(domain), 1)

    def to_json(self) -> dict:
        E = self.model["experts"]
        out = {"analysis": "routing", "model": self.model, "preset": self.preset,
               "topk": self.topk,
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
                                    "denominator": self.denominator(name), "layers": layers}
        return out


@torch.no_grad()
def route_corpus(model: Model, domains, *, preset: str | Preset = "notes",
                 max_len: int | None = None,
                 batch_tokens: int = BATCH_TOKENS, split: str | None = None,
                 max_samples: int | None = None, max_tokens: int | None = None,
                 progress: bool = True, interventions: Interventions | None = None,
                 **intervention_kwargs) -> RoutingResult:
    """Count (token, slot) hits per expert per layer over each domain on the device (usage
    counters [L, E] and a token counter per domain; the host reads them once at the end).
    The tokens counted are exactly the tokens routed (pads never reach the MoE layer).
    preset: samples (and, under paper-as-run, the percentages' denominator) as docs/lens.md
    says; max_len defaults to the preset's routing length."""
    p = get_preset(preset)
    doms = corpus.as_domains(domains)
    corpus_kw = dict(max_len=p.routing_max_len if max_len is None else max_len,
                     batch_tokens=batch_tokens, split=split, max_samples=max_samples,
                     max_tokens=max_tokens, preset=p)
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
        distributed.all_sum_(hits)
        distributed.all_sum_(tokens)
        n_samples = distributed.sum_int(n_samples)
        if routing is None:
            iv = interventions if interventions is not None else for_call(None, intervention_kwargs)
            routing = iv.resolve(model.config, torch.device("cpu"))
            moe = set(model.config.moe_layers)
            res = RoutingResult(model_info(model), [routing.k[l] if l in moe else 0
                                                    for l in range(model.config.num_hidden_layers)],
                                preset=p.name)
        res.domains[dom.name] = {"tokens": int(tokens), "samples": n_samples,
                                 "hits": hits.cpu().tolist()}
        if p.routing_denominator == "file":
            res.domains[dom.name]["file_tokens"] = file_tokens(dom, model.tokenizer)
    return res


# ---- 2. early decoding -----------------------------------------------------------------------

@dataclass
class EarlyDecodeResult:
    data: dict

    def to_json(self) -> dict:
        return self.data


def _cells(tok, out) -> list:
    """LensOutput [..., n] -> nested lists of [token text, prob, token id, logit]."""
    def conv(ids, probs, logits):
        if ids.dim() == 1:
            return [[token_text(tok, int(i)), round(float(p), 6), int(i), round(float(z), 5)]
                    for i, p, z in zip(ids, probs, logits)]
        return [conv(i, p, z) for i, p, z in zip(ids, probs, logits)]
    return conv(out.top_ids.cpu(), out.top_probs.cpu(), out.top_logits.cpu())


@torch.no_grad()
def early_decode(model: Model, prompt: str | Sequence[int], *, position: int = -1, top: int = 5,
                 preset: str | Preset = "notes", norm: str | None = None, label: str | None = None,
                 interventions: Interventions | None = None,
                 **intervention_kwargs) -> EarlyDecodeResult:
    """Logit lens at one position of one prompt, for every layer: the layer output
    (hook_resid_post), and on MoE layers H^{l_k} for k = 1..K and base + E_j for each chosen
    expert j, with the chosen experts' ids and weights (docs/lens.md, early decoding). Each
    cell is [token text, probability, token id, raw logit]."""
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
        row = {"layer": l, "moe": l in moe, "layer_out": _cells(tok, out)}
        if l in moe:
            K = cap[f"blocks.{l}.moe.hook_topk_ids"].shape[1]
            row["experts"] = cap[f"blocks.{l}.moe.hook_topk_ids"][0].tolist()
            weights = cap[f"blocks.{l}.moe.hook_topk_weights"][0].tolist()
            row["weights"] = [round(w, 6) for w in weights]
            if K:
                H = cumulative(cap, l, base=p.base, weighted=p.weighted)[0]
                cum = logit_lens(model, H, norm=norm, top=top)
                one = logit_lens(model, single(cap, l, base=p.base, weighted=p.weighted)[0],
                                 norm=norm, top=top)
                row["cumulative"] = _cells(tok, cum)
                row["single"] = _cells(tok, one)
            else:
                row["cumulative"], row["single"] = [], []
        layers.append(row)
    toks = [token_text(tok, i) for i in ids[:pos + 1]]
    return EarlyDecodeResult({"analysis": "early-decode", "model": model_info(model),
                              "preset": p.name, "label": label, "norm": norm, "base": p.base,
                              "weighted_expert_out": p.weighted, "score": p.score,
                              "position": pos,
                              "prompt_tokens": toks, "top": top, "layers": layers})


# ---- 3. perplexity vs top-k ------------------------------------------------------------------

def _minmax(xs: list[float], flat: float) -> list[float]:
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo) if hi > lo else flat for x in xs]


@dataclass
class TopkSweepResult:
    model: dict
    ks: list[int]
    reference_k: int
    domains: dict[str, dict] = field(default_factory=dict)  # name -> {log_ppl {k: [..]}, ...}
    preset: str = "notes"

    def perplexity(self, domain: str, k: int) -> float:
        """Geometric mean over samples of the per-sample perplexity."""
        lp = self.domains[domain]["log_ppl"][k]
        return math.exp(sum(lp) / len(lp)) if lp else float("nan")

    def mean_perplexity(self, domain: str, k: int) -> float:
        """Arithmetic mean over samples of the per-sample perplexity."""
        lp = self.domains[domain]["log_ppl"][k]
        return sum(math.exp(x) for x in lp) / len(lp) if lp else float("nan")

    def to_json(self) -> dict:
        out = {"analysis": "topk-sweep", "model": self.model, "preset": self.preset,
               "ks": self.ks, "reference_k": self.reference_k,
               "definitions": {
                   "perplexity": "geometric mean over samples of exp(mean next-token NLL)",
                   "mean_perplexity": "arithmetic mean over samples of the same",
                   "log_perplexity_ratio": "log(ppl_k) / log(ppl_reference_k)",
                   "minmax_log_perplexity": "per domain, (log ppl_k - min_k) / (max_k - min_k)"
                                            " (0.5 if flat): the MoE Lens code's pplx notebook",
                   "minmax_mean_perplexity": "per domain, min-max of mean_perplexity over k"
                                             " (0 if flat): its plot notebook"},
               "domains": {}}
        for name, d in self.domains.items():
            ppl = {k: self.perplexity(name, k) for k in self.ks}
            mean = {k: self.mean_perplexity(name, k) for k in self.ks}
            ref = math.log(ppl[self.reference_k]) if self.reference_k in ppl else float("nan")
            ok = all(v == v for v in ppl.values())
            mm_log = _minmax([math.log(ppl[k]) for k in self.ks], 0.5) if ok else [float("nan")] * len(self.ks)
            mm_mean = _minmax([mean[k] for k in self.ks], 0.0) if ok else [float("nan")] * len(self.ks)
            out["domains"][name] = {
                "samples": d["samples"], "tokens": d["tokens"],
                "perplexity": {str(k): ppl[k] for k in self.ks},
                "mean_perplexity": {str(k): mean[k] for k in self.ks},
                "log_perplexity_ratio": {
                    str(k): (math.log(ppl[k]) / ref if ref else float("nan")) for k in self.ks},
                "minmax_log_perplexity": dict(zip(map(str, self.ks), mm_log)),
                "minmax_mean_perplexity": dict(zip(map(str, self.ks), mm_mean)),
                "increase_vs_reference_percent": {
                    str(k): 100.0 * (ppl[k] / ppl[self.reference_k] - 1.0) for k in self.ks},
                "per_sample_perplexity": {
                    str(k): [math.exp(x) for x in d["log_ppl"][k]] for k in self.ks}}
        return out


def _sample_nll(model: Model, b: corpus.Batch, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed next-token NLL [B] and predicted-token counts [B] from the last layer's
    hook_resid_post [N, D] (valid tokens, sequence-major, in position order)."""
    w = model.weights
    flat_mask = b.attention_mask.reshape(-1)
    valid = flat_mask.nonzero().squeeze(1)
    Q = b.attention_mask.shape[1]
    seq = valid // Q
    tgt = b.input_ids.reshape(-1)[valid]
    has_next = torch.zeros_like(seq, dtype=torch.bool)
    has_next[:-1] = seq[1:] == seq[:-1]
    rows = has_next.nonzero().squeeze(1)
    V = w.lm_head.shape[0]
    nll = torch.zeros(len(b.lengths), dtype=torch.float64, device=model.device)
    step = max(1, (1 << 24) // V)  # rows of [step, V] logits at a time: ~16M values, a few 100 MB in flight
    for lo in range(0, rows.numel(), step):
        r = rows[lo:lo + step]
        h = rms_norm(resid[r], w.final_norm, model.config.rms_norm_eps)
        logp = torch.log_softmax(model.lm_head_logits(h).float(), dim=-1)
        nll.index_add_(0, seq[r], -logp.gather(1, tgt[r + 1].unsqueeze(1)).squeeze(1).double())
    counts = torch.bincount(seq[rows], minlength=len(b.lengths))
    return nll, counts


@torch.no_grad()
def topk_sweep(model: Model, domains, ks: Sequence[int] | None = None, *,
               preset: str | Preset = "notes", reference_k: int | None = None,
               max_len: int | None = None, batch_tokens: int = BATCH_TOKENS,
               split: str | None = None, max_samples: int | None = None,
               max_tokens: int | None = None, progress: bool = True,
               renormalize: bool | None = None) -> TopkSweepResult:
    """Perplexity with k overridden on every MoE layer (weights not renormalised unless asked:
    the model's own semantics; shared experts on). Each batch of samples runs once per k, so
    the corpus is read once. A sample is a chunk (notes) or a document whose chunks' NLLs are
    pooled (paper presets: BOS on its first chunk only); samples predicting nothing are skipped."""
    p = get_preset(preset)
    K = model.config.num_experts_per_tok
    ks = list(range(1, K + 1)) if ks is None else [int(k) for k in ks]
    reference_k = K if reference_k is None else reference_k
    if reference_k not in ks:
        ks = sorted(set(ks) | {reference_k})
    L = model.config.num_hidden_layers
    last = f"blocks.{L - 1}.hook_resid_post"
    res = TopkSweepResult(model_info(model), ks, reference_k, preset=p.name)
    corpus_kw = dict(max_len=max_len, batch_tokens=batch_tokens, split=split,
                     max_samples=max_samples, max_tokens=max_tokens, preset=p, bos="first")
    for dom in corpus.as_domains(domains):
        per_batch = []   # (batch index, ({k: nll [B]}, counts [B], doc [B], lengths [B]))
        with _bar(dom, "topk-sweep", progress) as bar:
            for b in _batches(model, dom, bar, **corpus_kw):
                b_nll = {}
                for k in ks:
                    cap = Capture(TapRequest([last]))
                    model.forward(b.input_ids, attention_mask=b.attention_mask, capture=cap,
                                  logits="last", topk=k, renormalize=renormalize)
                    s_nll, s_cnt = _sample_nll(model, b, cap[last])
                    b_nll[k] = s_nll.cpu()
                per_batch.append((b.index, (b_nll, s_cnt.cpu(), b.doc,
                                            torch.tensor(b.lengths, dtype=torch.int64))))
        batches = distributed.in_order(per_batch)   # every rank's batches, in corpus order
        nll = {k: [x[0][k] for x in batches] for k in ks}
        cnt = [x[1] for x in batches]
        docs = [x[2] for x in batches]
        lengths = [x[3] for x in batches]
        if not docs:
            res.domains[dom.name] = {"samples": 0, "tokens": 0, "log_ppl": {k: [] for k in ks}}
            continue
        doc = torch.cat(docs)
        doc = torch.unique(doc, return_inverse=True)[1]          # documents in order, 0..n-1
        n = int(doc.max()) + 1
        c = torch.zeros(n, dtype=torch.int64).index_add_(0, doc, torch.cat(cnt))
        keep = c > 0
        toks = torch.zeros(n, dtype=torch.int64).index_add_(0, doc, torch.cat(lengths))
        log_ppl = {}
        for k in ks:
            s = torch.zeros(n, dtype=torch.float64).index_add_(0, doc, torch.cat(nll[k]))
            log_ppl[k] = (s[keep] / c[keep]).tolist()
        res.domains[dom.name] = {"samples": int(keep.sum()), "tokens": int(toks[keep].sum()),
                                 "log_ppl": log_ppl}
    return res


# ---- 4. single-vs-ensemble similarity -------------------------------------------------------

SIM_METRICS = ("top1_vs_topk", "final_vs_top1", "final_vs_topk")


@dataclass
class SimilarityResult:
    model: dict
    preset: str
    base: str
    renormalize: bool
    positions: str
    weighted: bool = False
    domains: dict[str, dict] = field(default_factory=dict)  # name -> {layer: {mean, std, count}}

    def to_json(self) -> dict:
        return {"analysis": "similarity", "model": self.model, "preset": self.preset,
                "base": self.base, "renormalize": self.renormalize, "positions": self.positions,
                "weighted_expert_out": self.weighted,
                "definition": "cos(H^{l_1}, H^{l_K}) per token; mean and std over tokens "
                              "(mean/std/count); final_vs_top1 / final_vs_topk: cos of the "
                              "layer output with H^{l_1} / H^{l_K}",
                "domains": self.domains}


@torch.no_grad()
def similarity(model: Model, domains, *, preset: str | Preset = "notes",
               max_len: int | None = None, batch_tokens: int = BATCH_TOKENS,
               split: str | None = None,
               max_samples: int | None = None, max_tokens: int | None = None,
               progress: bool = True, interventions: Interventions | None = None,
               **intervention_kwargs) -> SimilarityResult:
    """cos(H^{l_1}, H^{l_K}) per token per MoE layer, and the cosines of the layer output with
    each of them, accumulated on the device (sum, sum of squares, count) one layer at a time
    (LayerStream), so neither depth nor corpus size bounds memory. K is the layer's k in this
    call (the model's unless overridden)."""
    p = get_preset(preset)
    moe = list(model.config.moe_layers)
    res = SimilarityResult(model_info(model), p.name, p.sim_base, p.renormalize, p.positions,
                           p.weighted)
    parts = [n.split(".", 2)[2] for n in lens_tap_names("*", p.sim_base)]
    suffixes = parts + ["hook_resid_post"]
    corpus_kw = dict(max_len=max_len, batch_tokens=batch_tokens, split=split,
                     max_samples=max_samples, max_tokens=max_tokens, preset=p, bos="every")
    kw = dict(intervention_kwargs) if interventions is None else {"interventions": interventions}
    M = len(SIM_METRICS)
    for dom in corpus.as_domains(domains):
        # [L, metric, (sum, sum of squares, count)]
        # (a batch's partial sums, folded into the total in batch order: distributed.OrderedSum)
        acc = torch.zeros((model.config.num_hidden_layers, M, 3), dtype=torch.float64,
                          device=model.device)
        total = distributed.OrderedSum(acc)

        def on_layer(l, taps):
            # H^{l_1} and H^{l_K} only, slot by slot: O(N·D) fp32 besides the taps themselves,
            # where the full cumulative() would be [N, K, D] fp32.
            base, w, e = (taps[s] for s in parts)
            N, K = w.shape
            if N == 0 or K == 0:
                return
            w = w.float()

            def term(j):
                x = w[:, j:j + 1] * e[:, j].float()
                return w[:, j:j + 1] * x if p.weighted else x

            first = term(0)
            full = first.clone()
            for j in range(1, K):
                full += term(j)
            if p.renormalize:
                first = renormalised(first, w[:, :1], p.renorm_skip)
                full = renormalised(full, w.sum(1, keepdim=True), p.renorm_skip)
            h1, hK = base.float() + first, base.float() + full
            out = taps["hook_resid_post"].float()
            cs = torch.nn.functional.cosine_similarity
            for m, (x, y) in enumerate(((h1, hK), (out, h1), (out, hK))):
                cos = cs(x, y, dim=-1).double()
                acc[l, m, 0] += cos.sum()
                acc[l, m, 1] += (cos * cos).sum()
                acc[l, m, 2] += cos.numel()

        with _bar(dom, "similarity", progress) as bar:
            for b in _batches(model, dom, bar, **corpus_kw):
                acc.zero_()
                model.forward(b.input_ids, attention_mask=b.attention_mask, logits="last",
                              capture=LayerStream(model, suffixes, on_layer, p.positions), **kw)
                total.add(b.index, acc)
        a = total.result().cpu()
        out = {}
        for l in moe:
            row = {}
            for m, metric in enumerate(SIM_METRICS):
                s_, sq, n = a[l, m].tolist()
                mean = s_ / n if n else float("nan")
                std = math.sqrt(max(sq / n - mean * mean, 0.0)) if n else float("nan")
                if m == 0:
                    row.update(mean=mean, std=std, count=int(n))
                else:
                    row[metric] = {"mean": mean, "std": std}
            out[str(l)] = row
        res.domains[dom.name] = out
    return res
