"""decode_threads: the team size of each one-call decode step on a busy machine (issue 12, item
2). The rule (TeamPolicy) is driven with synthetic step-time traces: no clock, no timed test. The
model tests check that a change of team changes no bit and that the setting is restored."""
from __future__ import annotations

import random

import pytest
import torch

import moe_engine
from moe_engine import decode_threads as DT
from moe_engine.decode_threads import DecodeThreads, TeamPolicy, enabled_from_env
from moe_engine.ops import available_backends
from moe_engine.ops import backend as backends

# step seconds per team at an empty cache. Idle: two threads 25% faster than one. Busy (beside
# CPU-bound processes): the two-thread team waits at its barriers, one thread runs when it can.
IDLE = {1: 2.5e-3, 2: 2.0e-3}
BUSY = {1: 5.0e-3, 2: 30e-3}
CAP = 256  # the trace's cache: a step's time grows by GROWTH from an empty to a full cache
GROWTH = 0.3


class Trace:
    """Synthetic decode: step time = times[team] x (1 + GROWTH x cache fill) x noise, with rare
    slow hiccups (a daemon waking up) on an idle machine and wide noise on a busy one."""

    def __init__(self, seed=0, full=2, growth=GROWTH):
        self.rng, self.full, self.used, self.growth = random.Random(seed), full, 0, growth
        self.policy = TeamPolicy(full)
        self.ns: list[int] = []     # the policy's current team after each step

    def first_step_on(self, team, since=0):
        """How many steps after step `since` the policy moved to `team`."""
        return next(i for i, n in enumerate(self.ns[since:]) if n == team)

    def step_time(self, team, times, busy):
        t = times[team] * (1 + self.growth * self.used / CAP)
        if busy:
            return t * self.rng.lognormvariate(0, 0.5)
        t *= self.rng.uniform(0.9, 1.1)
        return t * self.rng.uniform(1.5, 3) if self.rng.random() < 0.01 else t

    def run(self, times, steps, busy=False):
        """Runs `steps` steps; returns the team of each."""
        teams = []
        for _ in range(steps):
            team = self.policy.choose()
            self.policy.record(team, self.step_time(team, times, busy))
            teams.append(team)
            self.ns.append(self.policy.n)
            self.used = (self.used + 1) % CAP
        return teams


def _probe_steps_bound(steps):
    """The most steps that the periodic probes of `steps` steps can run off the team (each at
    most PROBE_STEPS; the first after 2 x NEIGHBOURS steps, then PROBE_FIRST, 2x, 4x ...)."""
    n, at, every = 0, 2 * DT.NEIGHBOURS, DT.PROBE_FIRST
    while at < steps:
        n, at, every = n + 1, at + every + DT.PROBE_STEPS + DT.NEIGHBOURS + 1, min(DT.PROBE_MAX, 2 * every)
    return n * DT.PROBE_STEPS


@pytest.mark.parametrize("seed", range(4))
def test_an_idle_machine_never_switches(seed):
    """Noise, hiccups and a step time that grows 30% with the cache: no team change; the only
    one-thread steps are the probes, ever more rarely."""
    tr = Trace(seed)
    teams = tr.run(IDLE, 3000)
    assert tr.policy.switches == 0 and tr.policy.n == 2
    assert teams.count(1) <= _probe_steps_bound(3000) and teams[-1000:].count(1) <= 4 * DT.PROBE_STEPS


def test_an_idle_machine_with_one_thread_as_fast_never_switches():
    """Where the second thread adds little (5%), a probe down still does not win."""
    tr = Trace(1)
    tr.run({1: 2.1e-3, 2: 2.0e-3}, 3000)
    assert tr.policy.switches == 0


@pytest.mark.parametrize("seed", range(2))
def test_a_step_time_that_grows_fast_with_the_cache_never_switches(seed):
    """A long-context decode: a step 5x slower at the end of the cache than at its start, one
    thread only 10% slower than two. A probe is judged against the steps just before and just
    after it, so the growth neither wins nor loses it."""
    tr = Trace(seed, growth=4.0)
    tr.run({1: 2.2e-3, 2: 2.0e-3}, 3000)
    assert tr.policy.switches == 0


def test_a_transient_slowdown_costs_a_probe_not_the_team():
    """30 steps at 3x on either team (another job for a moment): the slowdown starts a probe
    down, which loses against the steps around it."""
    tr = Trace(2)
    tr.run(IDLE, 300)
    probes = tr.policy.probes
    tr.run({t: 3 * s for t, s in IDLE.items()}, 30)
    tr.run(IDLE, 100)
    assert tr.policy.switches == 0 and tr.policy.n == 2 and tr.policy.probes > probes


def test_a_slowdown_that_one_thread_does_not_beat_is_the_new_normal():
    """Both teams 2x slower (a slower memory clock, say): one probe, then no probe storm."""
    tr = Trace(3)
    tr.run(IDLE, 300)
    probes = tr.policy.probes
    tr.run({t: 2 * s for t, s in IDLE.items()}, 300)
    assert tr.policy.switches == 0 and tr.policy.probes - probes <= 3


@pytest.mark.parametrize("seed", range(4))
def test_a_sustained_slowdown_drops_within_a_few_dozen_steps(seed):
    tr = Trace(seed)
    tr.run(IDLE, 500)
    teams = tr.run(BUSY, 500, busy=True)
    assert tr.first_step_on(1, since=500) < DT.WINDOW + DT.PROBE_STEPS + DT.NEIGHBOURS + 1
    assert tr.policy.n == 1 and tr.policy.switches == 1 and teams[-300:].count(1) >= 295


def test_a_machine_busy_from_the_first_step_is_found_by_the_first_probe():
    tr = Trace(4)
    teams = tr.run(BUSY, 300, busy=True)
    assert teams.index(1) == 2 * DT.NEIGHBOURS
    assert tr.first_step_on(1) == 2 * DT.NEIGHBOURS + DT.PROBE_STEPS + DT.NEIGHBOURS
    assert tr.policy.switches == 1 and tr.policy.n == 1


@pytest.mark.parametrize("seed", range(4))
def test_probes_of_the_full_team_beside_busy_processes_are_rare_and_cost_one_step(seed):
    """On one thread beside busy processes, each probe up ends after its first step (far
    slower), and they come ever more rarely: 16, 32, ... 256 steps apart."""
    tr = Trace(seed)
    tr.run(BUSY, 100, busy=True)
    assert tr.policy.n == 1
    probes = tr.policy.probes
    teams = tr.run(BUSY, 3000, busy=True)
    new = tr.policy.probes - probes
    assert 5 <= new <= 18 and teams.count(2) <= new + 2 * DT.PROBE_STEPS and tr.policy.n == 1


@pytest.mark.parametrize("seed", range(4))
def test_the_full_team_comes_back_when_the_machine_is_idle_again(seed):
    tr = Trace(seed)
    tr.run(IDLE, 200)
    tr.run(BUSY, 3000, busy=True)                                # probes now PROBE_MAX apart
    assert tr.policy.n == 1
    tr.run(IDLE, 2 * DT.PROBE_MAX)
    assert tr.first_step_on(2, since=3200) <= DT.PROBE_MAX + DT.PROBE_STEPS + DT.NEIGHBOURS
    assert tr.policy.n == 2 and tr.policy.switches == 2


def test_more_threads_halve_step_by_step_and_stop_at_the_best():
    tr = Trace(5, full=8)
    tr.run({8: 1e-3, 4: 1.3e-3, 2: 2e-3, 1: 3.5e-3}, 200)
    assert tr.policy.n == 8 and tr.policy.switches == 0
    busy = {8: 40e-3, 4: 15e-3, 2: 3e-3, 1: 4.5e-3}              # fewer is better, down to 2
    teams = tr.run(busy, 600, busy=True)
    assert tr.policy.n == 2 and 4 in teams and 1 in teams         # 1 was tried and is slower
    assert teams[-100:].count(2) >= 90


def test_the_policy_checks_its_inputs():
    with pytest.raises(ValueError, match=r"full = 0; expected an int >= 1"):
        TeamPolicy(0)
    p = TeamPolicy(2)
    with pytest.raises(ValueError, match=r"seconds = -1.0; expected a step time >= 0"):
        p.record(2, -1.0)
    with pytest.raises(ValueError, match=r"seconds = nan"):
        p.record(2, float("nan"))
    with pytest.raises(ValueError, match=r"team = 1; expected the current team 2"):
        p.record(1, 1e-3)


def test_a_new_shape_or_thread_setting_starts_over():
    dt = DecodeThreads(enabled=True)
    rng = random.Random(0)
    for _ in range(100):
        team = dt.choose(2, 1)
        dt.record(team, 2, BUSY[team] * rng.uniform(0.9, 1.1))
    assert dt.n == 1 and dt.switches == 1
    assert dt.choose(2, key=4) == 2 and dt.n == 2                 # another batch size
    assert dt.choose(4, key=4) == 4 and dt.n == 4                 # another full team
    assert dt.switches == 1


@pytest.mark.parametrize("full", [1, 2])
def test_disabled_or_one_thread_never_changes_the_team(full):
    for dt in (DecodeThreads(enabled=False), DecodeThreads(enabled=True)):
        if dt.enabled and full == 2:
            continue
        rng = random.Random(1)
        for _ in range(200):
            team = dt.choose(full, 1)
            assert team == full
            dt.record(team, full, BUSY[team] * rng.uniform(0.9, 1.1))
        assert dt.switches == 0


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("1", True), ("on", True),
                                       ("TRUE", True), ("0", False), ("off", False), ("false", False)])
def test_the_environment_variable_forces_it_either_way(value, on, monkeypatch):
    if value is None:
        monkeypatch.delenv(DT.ENV, raising=False)
    else:
        monkeypatch.setenv(DT.ENV, value)
    assert DecodeThreads().enabled is on and enabled_from_env() is on


def test_an_unknown_environment_value_is_an_error():
    with pytest.raises(ValueError, match=r"MOE_ENGINE_ADAPT_THREADS='maybe'; expected 1/on/true or 0/off/false"):
        enabled_from_env({DT.ENV: "maybe"})


needs_cpu = pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")


@needs_cpu
def test_run_sets_the_team_for_the_step_and_restores_it():
    mod = backends.native_module("cpu")
    before = mod.kernel_threads(0)
    mod.kernel_threads(2)
    try:
        dt = DecodeThreads(enabled=True)
        dt.choose(2, 7)
        dt.policy.n = 1                                            # as after a drop
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


def test_contention_bench_computes_the_targets_against_the_fixed_idle_row():
    """bench/contention.py's verdicts: ratios against the fixed team's idle row."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "contention", Path(__file__).resolve().parents[1] / "bench" / "contention.py")
    contention = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(contention)
    row = lambda tok_s, p90: {"tok_s": tok_s, "p90_ms": p90}
    rows = {("fixed", 0): row(400.0, 3.0), ("adaptive", 0): row(390.0, 3.1),
            ("fixed", 4): row(30.0, 60.0), ("adaptive", 4): row(140.0, 12.0), ("adaptive", 1): row(300.0, 4.0)}
    got = {what: (round(value, 4), met) for what, value, _, met in contention.targets(rows)}
    assert got["adaptive idle speed / fixed idle speed"] == (0.975, True)
    assert got["adaptive beside 4: speed / fixed idle speed"] == (0.35, True)
    assert got["adaptive beside 4: p90 / fixed idle p90"] == (4.0, True)
    assert got["fixed beside 4: speed / fixed idle speed"] == (0.075, False)
    assert got["fixed beside 4: p90 / fixed idle p90"] == (20.0, False)
    assert got["adaptive beside 1: speed / fixed idle speed"] == (0.75, None)   # no target beside 1
    assert got["adaptive beside 4: speed / its own idle speed"] == (round(140 / 390, 4), None)
    rows[("adaptive", 0)] = row(380.0, 3.0)
    assert dict((w, m) for w, _, _, m in contention.targets(rows))["adaptive idle speed / fixed idle speed"] is False
    assert contention.targets({("adaptive", 4): row(1.0, 1.0)}) == []               # no idle row: no verdict
    # the pool's idle speed against the OpenMP regions' (MOE_ENGINE_POOL=0), when both are measured
    assert "fixed idle speed / fixed-omp idle speed" not in dict((w, m) for w, _, _, m in contention.targets(rows))
    rows[("fixed-omp", 0)], rows[("fixed-omp", 4)] = row(410.0, 3.0), row(20.0, 80.0)
    got = {what: (round(value, 4), met) for what, value, _, met in contention.targets(rows)}
    assert got["fixed idle speed / fixed-omp idle speed"] == (round(400 / 410, 4), True)
    assert got["fixed-omp beside 4: speed / fixed idle speed"] == (0.05, False)
    rows[("fixed-omp", 0)] = row(420.0, 3.0)
    assert dict((w, m) for w, _, _, m in contention.targets(rows))["fixed idle speed / fixed-omp idle speed"] is False
