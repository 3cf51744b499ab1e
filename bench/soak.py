"""Soak: does a long run of generation and intervened forward calls leak memory or slow down?

    PYTHONPATH=src python bench/soak.py                  # 10,000 tokens + 1,000 calls, <= ~2 min
    PYTHONPATH=src python bench/soak.py --max-seconds 600 --json

On the bundled small model (cpu backend), two phases, each with random interventions drawn from
--seed (top-k per call or per layer, expert masks in both modes, forced experts, renormalize):
  generate  greedy generate() calls of --chunk tokens until --tokens tokens are generated
  forward   --calls forward() calls: a prefill of 1..3 prompts of 1..24 tokens, and on every
            other call a capture of random taps and a usage counter
It records every call's latency and the resident set size after it (/proc/self/statm), and
splits the calls that ran into --windows windows (median latency, resident memory at the end).
The first window is warm-up (allocator pools, the packed weights' buffers, the RoPE
table). Verdict, per phase: resident memory may grow by at most --max-growth-mb after warm-up,
and the last window's median latency may be at most --max-slowdown x the second window's (the
machine's noise is the limit of this check: run it twice on a shared machine). Past
--max-seconds a phase stops early and says how far it got (the verdict then covers what ran).
Exit status 1 when a phase trends.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

import moe_engine
from moe_engine import Capture, TapRequest

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def random_interventions(rng: random.Random, cfg) -> dict:
    moe = list(cfg.moe_layers)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    kind = rng.randrange(6)
    if kind == 0:
        return {}
    if kind == 1:
        return {"topk": rng.randint(0, min(E, 2 * K))}
    if kind == 2:
        return {"topk": {l: rng.randint(1, K + 1) for l in rng.sample(moe, rng.randint(1, len(moe)))}}
    if kind == 3:
        return {"expert_mask": {l: rng.sample(range(E), rng.randint(1, E // 2)) for l in rng.sample(moe, 1)},
                "mask_mode": rng.choice(["reroute", "zero"])}
    if kind == 4:
        return {"force_experts": {rng.choice(moe): rng.randrange(E)}}
    return {"renormalize": rng.choice([True, False]), "topk": rng.randint(1, K)}


def _heap_growth(before, top: int = 5) -> list[str]:
    """The source lines whose live Python allocations grew most since `before` (tracemalloc)."""
    import tracemalloc
    stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
    return [f"{st.size_diff / 1024:+.0f} KB in {st.count_diff:+d} blocks at {st.traceback[0]}" for st in stats[:top]]


class Recorder:
    """Latency and resident memory of every call; split into --windows equal windows of the
    calls that ran (so a phase cut short by --max-seconds is still judged on all of it)."""

    def __init__(self, windows: int, trace: bool = False, warmup: int = 0):
        self.n, self.calls, self.trace, self.warmup = windows, [], trace, warmup

    snapshot = None  # tracemalloc snapshot at the end of the warm-up (--tracemalloc)

    def add(self, seconds: float) -> None:
        self.calls.append((seconds, rss_mb()))
        if self.trace and self.snapshot is None and len(self.calls) == self.warmup:
            import tracemalloc
            self.snapshot = tracemalloc.take_snapshot()

    def verdict(self, max_growth_mb: float, max_slowdown: float) -> dict:
        c, n = self.calls, self.n
        if len(c) < 3 * n:
            return {"windows": [], "ok": True, "note": f"{len(c)} calls: too few for {n} windows"}
        w = []
        for i in range(n):
            part = c[i * len(c) // n:(i + 1) * len(c) // n]
            w.append({"median_ms": 1e3 * statistics.median(s for s, _ in part), "rss_mb": part[-1][1]})
        growth = w[-1]["rss_mb"] - w[0]["rss_mb"]  # window 0 ends the warm-up
        slowdown = w[-1]["median_ms"] / w[1]["median_ms"]
        # a leak grows by about the same amount every call; warm-up by steps that stop
        after = c[len(c) // n - 1:]
        per_call_kb = 1024 * (after[-1][1] - after[0][1]) / max(1, len(after) - 1)
        second_half_kb = 1024 * (after[-1][1] - after[len(after) // 2][1]) / max(1, len(after) - 1 - len(after) // 2)
        return {"windows": w, "rss_growth_mb": round(growth, 1), "slowdown": round(slowdown, 2),
                "rss_kb_per_call": round(per_call_kb, 1), "rss_kb_per_call_2nd_half": round(second_half_kb, 1),
                "ok": growth <= max_growth_mb and slowdown <= max_slowdown}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000, help="tokens generated in the generate phase")
    ap.add_argument("--chunk", type=int, default=50, help="tokens per generate() call")
    ap.add_argument("--calls", type=int, default=1_000, help="forward() calls in the forward phase")
    ap.add_argument("--windows", type=int, default=10, help="windows a phase's calls are split into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=55.0, help="per phase (both phases: about 2 minutes at most)")
    ap.add_argument("--max-growth-mb", type=float, default=32.0)
    ap.add_argument("--max-slowdown", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="also report the Python heap's growth after each phase's warm-up, by source line")
    args = ap.parse_args(argv)
    for flag, v in (("--tokens", args.tokens), ("--chunk", args.chunk), ("--calls", args.calls),
                    ("--max-seconds", args.max_seconds), ("--windows", args.windows)):
        if v <= 0:
            print(f"error: {flag} {v}: expected a positive number", file=sys.stderr)
            return 2
    moe_engine.model.set_threads(args.threads)
    if args.tracemalloc:
        import tracemalloc
        tracemalloc.start()
    rng = random.Random(args.seed)
    model = moe_engine.load(progress=False, backend="cpu")
    cfg = model.config
    words = "The a French cat sum of 3 and 4 def print ( ) is was in on".split()
    result = {"model": str(model.path), "threads": args.threads, "seed": args.seed}

    # phase 1: generate
    rec = Recorder(args.windows, args.tracemalloc, -(-args.tokens // args.chunk) // args.windows)
    done, t_end = 0, time.perf_counter() + args.max_seconds
    while done < args.tokens and time.perf_counter() < t_end:
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        n = min(args.chunk, args.tokens - done)
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, **random_interventions(rng, cfg))
        rec.add(time.perf_counter() - t)
        done += max(1, len(out[0].token_ids))  # an early EOS still counts as a call's tokens
    result["generate"] = {"tokens": done, "of": args.tokens,
                          **rec.verdict(args.max_growth_mb, args.max_slowdown)}
    if rec.snapshot is not None:
        result["generate"]["heap_growth"] = _heap_growth(rec.snapshot)

    # phase 2: forward with interventions and taps
    rec = Recorder(args.windows, args.tracemalloc, args.calls // args.windows)
    taps = ["blocks.*.moe.hook_topk_ids", "blocks.*.hook_resid_post", "logits", "blocks.1.moe.hook_expert_out"]
    usage = model.new_usage_counters()
    calls, t_end = 0, time.perf_counter() + args.max_seconds
    while calls < args.calls and time.perf_counter() < t_end:
        prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(1, 24))]
                   for _ in range(rng.randint(1, 3))]
        ids, mask = moe_engine.model.left_pad(prompts)
        cap = Capture(TapRequest(rng.sample(taps, 2), positions=rng.choice(["all", "last"]))) if calls % 2 else None
        t = time.perf_counter()
        model.forward(ids, attention_mask=mask, capture=cap, usage=usage if cap else None, logits="last",
                      **random_interventions(rng, cfg))
        rec.add(time.perf_counter() - t)
        calls += 1
    result["forward"] = {"calls": calls, "of": args.calls, **rec.verdict(args.max_growth_mb, args.max_slowdown)}
    if rec.snapshot is not None:
        result["forward"]["heap_growth"] = _heap_growth(rec.snapshot)

    ok = result["generate"]["ok"] and result["forward"]["ok"]
    for phase in ("generate", "forward"):
        r = result[phase]
        ran = f"{r.get('tokens', r.get('calls'))} of {r['of']}"
        print(f"{phase:9s} {ran:>14s}  rss growth {r.get('rss_growth_mb', '-')} MB  "
              f"slowdown {r.get('slowdown', '-')}x  windows (median ms / rss MB): "
              + " ".join(f"{w['median_ms']:.0f}/{w['rss_mb']:.0f}" for w in r["windows"])
              + ("" if r["ok"] else "  TREND"))
        if "rss_kb_per_call" in r:
            print(f"{'':9s} after warm-up: {r['rss_kb_per_call']} KB per call "
                  f"({r['rss_kb_per_call_2nd_half']} KB in the second half)")
        for line in r.get("heap_growth", []):
            print(f"{'':9s} python heap {line}")
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
