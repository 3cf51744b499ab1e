"""Resident memory does not grow per call (issue 13, item 8; bench/soak.py's question).

bench/README.md ("soak.py") shows that the soak's growth is warm-up: memory grows while calls of
new shapes arrive and stays flat once calls repeat. This pins the second half: after one pass of
a varied set of forward and generate calls (interventions, taps, usage counters, decode steps),
more passes of the very same calls add no resident memory beyond allocator noise (SLACK_MB over
PASSES passes of 13 calls: a leak above ~60 KB per call fails it; the soak's forward phase grew
~550 KB per call before its plateau).

What this cannot show: growth that needs new shapes to appear (bounded caches are the point of
those) or that only appears after thousands of calls (bench/soak.py runs those).
"""
from __future__ import annotations

import os
import random

import torch

import moe_engine
from moe_engine import Capture, TapRequest
from moe_engine.model import left_pad

PASSES = 4
SLACK_MB = 3.0   # allocator noise: free lists and arenas settle over the first passes


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _one_pass(model, usage):
    rng = random.Random(7)  # the same calls on every pass
    cfg = model.config
    moe = list(cfg.moe_layers)
    taps = ["blocks.*.moe.hook_topk_ids", "blocks.*.hook_resid_post", "logits"]
    for i in range(12):
        prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(1, 12))]
                   for _ in range(rng.randint(1, 3))]
        ids, mask = left_pad(prompts)
        iv = rng.choice([{}, {"topk": rng.randint(1, cfg.num_experts_per_tok + 1)},
                         {"expert_mask": {rng.choice(moe): [0, 1]}, "mask_mode": "zero"},
                         {"force_experts": {rng.choice(moe): 2}}])
        cap = Capture(TapRequest(rng.sample(taps, 2))) if i % 2 else None
        model.forward(ids, attention_mask=mask, capture=cap, usage=usage if cap else None, **iv)
    model.generate(["The", "a b"], max_new_tokens=8, temperature=0.7, seed=1)


def test_repeating_the_same_calls_adds_no_memory(tiny_ckpt):
    model = moe_engine.load(tiny_ckpt, backend="cpu")
    usage = model.new_usage_counters()
    with torch.no_grad():
        _one_pass(model, usage)  # warm-up: every shape seen once
        _one_pass(model, usage)
        start = _rss_mb()
        for _ in range(PASSES):
            _one_pass(model, usage)
    grown = _rss_mb() - start
    assert grown <= SLACK_MB, f"resident memory grew {grown:.1f} MB over {PASSES} passes of the same calls"
