"""One Model from several threads gives every call the bits it gets alone (issue 13, item 2).

Each thread runs its own scripts -- a prefill of a random batch, then greedy decode steps on its
own KV cache -- with its own interventions (top-k, masks, forced experts) and taps, all on one
Model. Every logit and every captured tap is then compared bit for bit with a sequential replay
of the same scripts. Before Model.forward took its lock, two threads already got NaN and
foreign token ids from the cpu backend's shared per-layer buffers.
"""
from __future__ import annotations

import inspect
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


# -- the lock matters: one deterministic interleaving, with and without it ---------------------------

class _SpyLock:
    """The model's lock, unchanged, that also reports a caller about to wait for it."""

    def __init__(self, inner, waiting: threading.Event):
        self.inner, self.waiting = inner, waiting

    def __enter__(self):
        if not self.inner.acquire(blocking=False):
            self.waiting.set()
            self.inner.acquire()
        return self

    def __exit__(self, *exc):
        self.inner.release()


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _decode_script(model, prompt, steps):
    """Prefill then greedy one-call decode steps; (outputs, tensors the C++ step may point at)."""
    cache = model.new_cache(1, 8)  # one Tkv_cap for every script: the same decode-step workspace
    outs, keep = [model.forward(torch.tensor([prompt]), cache=cache, logits="last")], [cache]
    for _ in range(steps):
        nxt = outs[-1].argmax(-1, keepdim=True)
        keep.append(nxt)
        outs.append(model.forward(nxt, cache=cache, logits="last"))
    return outs, keep


def _interleave(model, lock):
    """Thread A stops inside its first decode step, after filling the shared step parameters and
    before the C++ call; thread B then runs a prefill and a decode step; then A goes on. With the
    real lock B waits for A instead (the spy reports that, and A goes on). Returns (A's outputs,
    B's outputs, tensors to keep alive until the end)."""
    from moe_engine.cpu_weights import CpuModelWeights
    code = CpuModelWeights.decode_step.__code__
    src, first = inspect.getsourcelines(CpuModelWeights.decode_step)
    line = first + next(i for i, s in enumerate(src) if "mod.decode_step_cpu(p" in s)
    paused, go_on = threading.Event(), threading.Event()
    res: dict = {}

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == line and not paused.is_set():
            paused.set()
            assert go_on.wait(60), "thread B neither finished nor waited for the lock"
        return local

    def a():
        sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
        try:
            res["a"] = _decode_script(model, [11, 12, 13], 3)
        finally:
            sys.settrace(None)

    def b():
        res["b"] = _decode_script(model, [21, 22, 23], 1)
        go_on.set()

    real = model._lock
    model._lock = _SpyLock(real, go_on) if lock else _NoLock()
    try:
        ta = threading.Thread(target=a)
        ta.start()
        assert paused.wait(60)
        tb = threading.Thread(target=b)
        tb.start()
        ta.join()
        tb.join()
    finally:
        model._lock = real
    return res["a"][0], res["b"][0], (res["a"][1], res["b"][1])


def _differs(got, want) -> bool:
    return len(got) != len(want) or any(not torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("lock", [True, False], ids=["with-lock", "lock-removed"])
def test_the_lock_is_what_keeps_calls_apart(model, lock):
    """The comparison above can fail: with the lock replaced by a no-op, B's decode step
    overwrites the step parameters A has filled (they belong to the model), so A's step runs on
    B's cache and ids and A's logits are never written -- the replay comparison sees it. With the
    lock, the same interleaving attempt leaves both scripts bit-identical to their replays."""
    a, b, keep = _interleave(model, lock)
    want_a, _ = _decode_script(model, [11, 12, 13], 3)
    want_b, _ = _decode_script(model, [21, 22, 23], 1)
    broken = _differs(a, want_a) or _differs(b, want_b)
    assert broken != lock, ("calls interleaved under the lock changed the results" if lock else
                            "without the lock the interleaving went unnoticed: the check cannot fail")
    del keep
