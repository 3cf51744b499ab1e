"""One Model from several threads gives every call the bits it gets alone (issue 13, item 2).

Each thread runs its own scripts -- a prefill of a random batch, then greedy decode steps on its
own KV cache -- with its own interventions (top-k, masks, forced experts) and taps, all on one
Model. Every logit and every captured tap is then compared bit for bit with a sequential replay
of the same scripts. Before Model.forward took its lock, two threads already got NaN and
foreign token ids from the cpu backend's shared per-layer buffers.
"""
from __future__ import annotations

import random
import sys
import threading

import pytest
import torch

import moe_engine
from moe_engine import Capture, TapRequest

THREADS = 4
SCRIPTS = 3      # per thread
DECODE_STEPS = 12


@pytest.fixture(scope="module")
def model():
    return moe_engine.load(progress=False, backend="cpu")


def _script(seed: int, cfg):
    """A call plan: prompts, interventions, taps (everything that varies, drawn from `seed`)."""
    rng = random.Random(seed)
    B = rng.choice([1, 1, 2])  # mostly one shape: threads then share the same cpu buffers
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(1, 9))] for _ in range(B)]
    moe = list(cfg.moe_layers)
    iv = rng.choice([
        {}, {"topk": rng.randint(0, cfg.num_experts_per_tok + 1)},
        {"expert_mask": {rng.choice(moe): rng.sample(range(cfg.n_routed_experts), 3)},
         "mask_mode": rng.choice(["reroute", "zero"])},
        {"force_experts": {rng.choice(moe): rng.randrange(cfg.n_routed_experts)}},
    ])
    taps = rng.choice([None, ["blocks.*.moe.hook_topk_ids"], ["blocks.1.hook_resid_post", "logits"]])
    return prompts, iv, taps


def _run(model, plan):
    """The script's outputs: every call's logits and the captured taps, in call order."""
    prompts, iv, taps = plan
    ids, mask = moe_engine.model.left_pad(prompts)
    cache = model.new_cache(len(prompts), ids.shape[1] + DECODE_STEPS)
    cap = Capture(TapRequest(taps, positions="all")) if taps else None
    outs = [model.forward(ids, attention_mask=mask, cache=cache, capture=cap, logits="last", **iv)]
    for step in range(1, DECODE_STEPS + 1):
        nxt = outs[-1].argmax(-1, keepdim=True)
        # decode steps without taps take the one-call C++ step; with taps the layer loop
        outs.append(model.forward(nxt, cache=cache, capture=cap, step=step, logits="last", **iv))
    if cap is not None:
        outs += [cap[k] for k in sorted(cap.keys())]
    return outs


def test_threads_match_a_sequential_replay(model):
    plans = [[_script(1000 * t + s, model.config) for s in range(SCRIPTS)] for t in range(THREADS)]
    got: dict[tuple[int, int], list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t):
        try:
            start.wait()
            for s, plan in enumerate(plans[t]):
                got[t, s] = _run(model, plan)
        except BaseException as e:  # reported below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    # switch threads every few bytecodes instead of every 5 ms: the calls interleave at every
    # point between two Python statements, as they would on more cores under load
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]
    for t in range(THREADS):
        for s, plan in enumerate(plans[t]):
            want = _run(model, plan)
            assert len(got[t, s]) == len(want)
            for i, (a, b) in enumerate(zip(got[t, s], want)):
                assert torch.equal(a, b), f"thread {t} script {s} output {i} differs from the sequential replay"


def test_the_lock_serialises_forward(model):
    """forward holds the model's lock for the whole call: a thread that holds it keeps another
    thread's forward waiting (the contract in the README), and releases it on an exception."""
    ids = torch.tensor([[5, 6, 7]])
    done = threading.Event()
    with model._lock:
        th = threading.Thread(target=lambda: (model.forward(ids), done.set()))
        th.start()
        assert not done.wait(0.3)
    th.join()
    assert done.is_set()
    with pytest.raises(ValueError):
        model.forward(ids, topk=99)
    assert model._lock.acquire(blocking=False)
    model._lock.release()
