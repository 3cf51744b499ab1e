"""What the distributed tests compute, the same code in one process (the reference, in the test)
and in each spawned process (_worker.py): expert-parallel forward cases and the corpus
analyses. Shape legend: docs/shapes.md."""
from __future__ import annotations

import torch

from moe_engine import Capture, TapRequest
from moe_engine.taps import Patch
from moe_engine.lens import analyses
from moe_engine.lens import stats
from moe_engine.prune import perplexity

# ragged batch (left-padded by forward): pads never reach the MoE layer, so the EP exchange
# sees a token count that is not a multiple of W
IDS = [[5, 9, 17, 3, 22, 8, 41], [7, 2, 30], [11, 13, 19, 4, 6]]
INTERVENTIONS = {
    "plain": {},
    "topk1": {"topk": 1},
    "mask_zero": {"expert_mask": {1: [0, 3, 7], 2: [5]}, "mask_mode": "zero"},
    "mask_reroute": {"expert_mask": {1: [0, 1, 2]}, "mask_mode": "reroute", "renormalize": True},
    "force": {"force_experts": 6},
    "topk0": {"topk": 0},
}
TAPS = ["blocks.*.moe.hook_topk_ids", "blocks.*.moe.hook_expert_out", "blocks.*.hook_resid_post",
        "blocks.*.moe.hook_router_probs"]


def forward_cases(model) -> dict:
    """name -> tensors: logits under each intervention; taps and usage counters; a patched
    expert output; greedy decoding with the KV cache (the one-token steps)."""
    out = {}
    for name, kw in INTERVENTIONS.items():
        out[f"logits/{name}"] = model.forward(IDS, **kw)
    cap = Capture(TapRequest(TAPS))
    usage = model.new_usage_counters()
    out["logits/taps"] = model.forward(IDS, capture=cap, usage=usage, topk=1)
    for name in sorted(cap.keys()):
        out[f"tap/{name}"] = cap[name]
    out["usage"] = usage
    # a patch of the expert outputs (what the exchange brought back) reaches the logits
    half = Patch("blocks.*.moe.hook_expert_out", lambda v, ctx: v * 0.5)
    out["logits/patched"] = model.forward(IDS, capture=Capture(patches=[half]))
    # decode: prefill 3 sequences, then 4 greedy steps of one token each
    cache = model.new_cache(len(IDS), 7 + 4)
    logits = model.forward(IDS, cache=cache, logits="last")
    steps = []
    for _ in range(4):
        nxt = logits.argmax(-1)
        steps.append(nxt)
        logits = model.forward(nxt.unsqueeze(1), cache=cache, logits="last")
    out["decode/tokens"] = torch.stack(steps)
    out["decode/logits"] = logits
    return out


CORPUS = {
    "en": ["The cat sat on the mat. " * 6, "A dog ran in the park and met a friend.",
           "Numbers: 1 2 3 4 5 6 7 8 9 10 and more numbers follow here."],
    "fr": ["Le chat est sur le tapis. " * 5, "Il fait beau aujourd'hui a Paris.",
           "Une phrase courte.", "Encore une autre phrase pour le corpus."],
}
CORPUS_KW = dict(max_len=24, batch_tokens=48, progress=False)


def corpus_results(model) -> dict:
    """Every corpus analysis's JSON (and the prune perplexity) on CORPUS; small batches so each
    domain has several, dealt out to the ranks."""
    return {
        "routing": analyses.route_corpus(model, CORPUS, **CORPUS_KW).to_json(),
        "routing_paper": analyses.route_corpus(model, CORPUS, preset="paper", **CORPUS_KW).to_json(),
        "topk_sweep": analyses.topk_sweep(model, CORPUS, ks=[1, 2], **CORPUS_KW).to_json(),
        "similarity": analyses.similarity(model, CORPUS, **CORPUS_KW).to_json(),
        "router_stats": stats.router_stats(model, CORPUS, **CORPUS_KW).to_json(),
        "coactivation": stats.coactivation(model, CORPUS, **CORPUS_KW).to_json(),
        "vocab": stats.vocab(model, CORPUS, top=3, **CORPUS_KW).to_json(),
        "perplexity": perplexity(model, CORPUS, max_len=24, batch_tokens=48),
    }
