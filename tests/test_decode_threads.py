"""decode_threads.DecodeThreads: the team size of each one-call decode step on a busy machine
(issue 12, item 2). The policy is driven with made-up step times (no clock, no timed test); the
model tests check that a change of team changes no bit and that the setting is restored."""
from __future__ import annotations

import random

import pytest
import torch

import moe_engine
from moe_engine import decode_threads as DT
from moe_engine.decode_threads import DecodeThreads
from moe_engine.ops import available_backends
from moe_engine.ops import backend as backends

IDLE = {1: 1.6e-3, 2: 1.0e-3}      # step seconds per team on an idle machine (2 threads faster)
BUSY = {1: 4.0e-3, 2: 20e-3}       # beside busy processes: the 2-thread team waits at barriers


def _drive(dt: DecodeThreads, times: dict, steps: int, full=2, key=1, rng=None):
    """Run `steps` steps whose time depends on the team (+-10 % noise); returns the teams used."""
    rng = rng or random.Random(0)
    teams = []
    for _ in range(steps):
        team = dt.choose(full, key)
        teams.append(team)
        dt.record(team, full, times[team] * rng.uniform(0.9, 1.1))
    return teams


def test_an_idle_machine_keeps_the_full_team():
    """Only the rare probes run on one thread, ever more rarely (16, 32, ... 256 steps apart)."""
    dt = DecodeThreads(enabled=True)
    teams = _drive(dt, IDLE, 2000)
    assert dt.switches == 0 and dt.n == 2
    assert teams.count(1) <= 12 and teams[-300:].count(1) <= 2


def test_a_machine_busy_from_the_first_step_is_found_by_a_probe():
    dt = DecodeThreads(enabled=True)
    teams = _drive(dt, BUSY, 100)
    assert teams.index(1) == DT.PROBE_FIRST and dt.n == 1


def test_a_busy_machine_drops_to_one_thread_and_probes_ever_more_rarely():
    dt = DecodeThreads(enabled=True)
    _drive(dt, IDLE, 100)
    teams = _drive(dt, BUSY, 2000)
    first_one = teams.index(1)
    assert first_one <= DT.WINDOW, "did not notice the slow steps"
    probes = [i for i, t in enumerate(teams) if t == 2 and i > first_one]
    assert 3 <= len(probes) <= 12, probes                       # backs off: 16, 32, ... 256 steps
    assert teams.count(1) / len(teams) > 0.97


def test_the_full_team_comes_back_when_the_machine_is_idle_again():
    dt = DecodeThreads(enabled=True)
    _drive(dt, IDLE, 100)
    _drive(dt, BUSY, 3000)                                       # probes now every PROBE_MAX steps
    teams = _drive(dt, IDLE, DT.PROBE_MAX + 50)
    back = teams.index(2)
    assert back <= DT.PROBE_MAX and dt.n == 2 and teams[back:].count(1) <= 4  # probes 16, 48, 112 steps on


def test_more_threads_halve_step_by_step():
    dt = DecodeThreads(enabled=True)
    times = {8: 1e-3, 4: 1e-3, 2: 1e-3, 1: 1e-3}
    _drive(dt, times, 50, full=8)
    assert dt.n == 8
    times = {8: 30e-3, 4: 10e-3, 2: 3e-3, 1: 3.5e-3}             # busy: fewer is better, down to 2
    teams = _drive(dt, times, 400, full=8)
    assert teams[-1] == 2 and 4 in teams and 1 in teams          # 1 was tried and is slower


def test_a_new_shape_or_thread_setting_starts_over():
    dt = DecodeThreads(enabled=True)
    _drive(dt, IDLE, 20)
    _drive(dt, BUSY, 50)
    assert dt.n == 1
    assert dt.choose(2, key=4) == 2 and dt.n == 2                 # another batch size
    _drive(dt, BUSY, 50, key=4)
    assert dt.n == 1 and dt.choose(4, key=4) == 4 and dt.n == 4   # another full team


@pytest.mark.parametrize("full", [1, 2])
def test_disabled_or_one_thread_never_changes_the_team(full, monkeypatch):
    monkeypatch.setenv("MOE_ENGINE_ADAPT_THREADS", "0")
    dt = DecodeThreads()
    assert not dt.enabled and set(_drive(dt, BUSY, 200, full=full)) == {full}
    dt = DecodeThreads(enabled=True)
    assert set(_drive(dt, BUSY, 200, full=1, rng=random.Random(1))) == {1}


needs_cpu = pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")


@needs_cpu
def test_run_sets_the_team_for_the_step_and_restores_it():
    mod = backends.native_module("cpu")
    before = mod.kernel_threads(0)
    mod.kernel_threads(2)
    try:
        dt = DecodeThreads(enabled=True)
        dt.n, dt._key, dt._full = 1, 7, 2                         # as after a drop
        dt._reset(2)
        dt.n = 1
        seen = dt.run(mod, 7, lambda: mod.kernel_threads(0))
        assert seen == 1 and mod.kernel_threads(0) == 2
        with pytest.raises(ZeroDivisionError):                     # restored on an error too
            dt.run(mod, 7, lambda: 1 / 0)
        assert mod.kernel_threads(0) == 2
        with pytest.raises(ValueError, match=r"kernel_threads: n=-1, expected >= 0"):
            mod.kernel_threads(-1)
    finally:
        mod.kernel_threads(before)


@needs_cpu
def test_changing_team_mid_decode_changes_no_bit(tiny_ckpt):
    """Steps alternate between one and two threads: the logits are those of the two-thread run
    (csrc/cpu's fixed summation order), so the policy can only change the speed."""
    model = moe_engine.load(tiny_ckpt, backend="cpu")
    mod = backends.native_module("cpu")
    before = mod.kernel_threads(0)
    mod.kernel_threads(2)
    ctl = model._cpu_weights().threads

    def decode(teams):
        cache = model.new_cache(2, 16)
        out = [model.forward(torch.tensor([[5, 6, 7], [8, 9, 10]]), cache=cache, logits="last")]
        for team in teams:
            ctl.choose = lambda full, key, team=team: team
            out.append(model.forward(out[-1].argmax(-1, keepdim=True), cache=cache, logits="last"))
        return out

    try:
        plain = decode([2] * 8)
        mixed = decode([1, 2, 1, 1, 2, 2, 1, 2])
    finally:
        del ctl.choose
        mod.kernel_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(plain, mixed))
