"""How many threads a one-call decode step runs on, chosen step by step from its own timings.

Why: a decode step of the cpu backend is dozens of short parallel regions. Run as OpenMP regions
(MOE_ENGINE_POOL=0), each ends in a barrier that waits for every thread of the team: when other
processes hold the cores, the scheduler takes one of the step's threads off for a time slice and
the whole step waits for it at the next barrier; no OpenMP wait policy changes that
(bench/README.md, contention.py). The kernels' own pool (csrc/cpu/pool.h, the default) waits
only for chunks in flight, but a chunk whose thread loses its core still holds its job up. One
thread waits for nobody: it runs whenever it holds a core. So the step's team follows the
machine: the full team while it is fastest, half of it (down to one thread) while that is
faster.

The rule (`TeamPolicy`, a pure function of the step times it is given; no clock):
- A team is only ever left for another after a *probe*: a few steps on the other team (the next
  larger or smaller one) whose median beats the median of the current team's steps just before
  and just after the probe: by a clear margin to go down (WIN_DOWN: the full team is the idle
  machine's best, and a wrong drop costs the most), by a small one to go up (WIN_UP). The two medians are of neighbouring steps,
  so the cache length (a step slows as the KV cache grows) and slow drifts of the machine cancel;
  the first step on either side of a team change is not counted (it pays for the change), and one
  noisy step moves no median. A probe whose steps so far are far slower than the steps before it
  (ABORT) ends as lost at once, so a probe of the full team beside busy processes costs one step.
- The first probe comes after 8 steps, the next 16 steps later, then ever more rarely while they
  lose (up to every 256 steps; a win starts over at 16): the down probes find a machine that was busy before the first step, the up probes find it idle
  again.
- A sustained slowdown of the current team (the median of its last WINDOW steps SLOW times its
  settled step time) starts a down probe at once instead of waiting for the next one. A slowdown
  alone never switches: on an idle machine a noisy stretch costs one probe, never a team.

Bits: the kernels give the same bits for any thread count (the fixed summation order of
csrc/cpu; tests/test_ops.py), so the choice changes only the speed.

Scope: the team of the calling thread's parallel regions (`_C.kernel_threads`), set for the
step and restored after it; torch's own setting and other threads are not touched. Off by
default since the kernels run on their own pool: on a quiet machine the pool's full team was as
fast as the rule or faster beside 0, 1 and 4 busy processes (bench/README.md, "The kernels' own
thread pool"). MOE_ENGINE_ADAPT_THREADS=1 (read when a model is loaded) turns it on, =0 or unset
keeps every step on the full team. Measurements: bench/contention.py, bench/README.md.
"""
from __future__ import annotations

import os
import statistics
import time
from collections import deque

WINDOW = 8          # steps in "recent": five slow steps of eight move its median
HISTORY = 64        # steps of the current team whose lower quartile is its settled step time
SLOW = 1.5          # recent median this many times the settled step: a sustained slowdown
CHECK = 4           # steps between checks for a slowdown
PROBE_STEPS = 5     # steps of a probe on the other team; the first (the change) is not counted
NEIGHBOURS = 4      # counted steps of the current team before and after a probe, compared with it
WIN_DOWN = 0.85     # a probe's median must be below this x its neighbours' median to move down,
WIN_UP = 0.95       # this x to move up
ABORT = 2.5         # a probe's steps so far this many times (median) the steps before it: it has lost
PROBE_FIRST = 16    # steps on a team before its first probe; doubled after each probe that loses,
PROBE_MAX = 256     # up to this

ENV = "MOE_ENGINE_ADAPT_THREADS"


def enabled_from_env(environ=None) -> bool:
    """MOE_ENGINE_ADAPT_THREADS: unset or empty -> off (the default); 1/on/true -> on;
    0/off/false -> off; anything else raises ValueError naming the value."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if value in ("1", "on", "true"):
        return True
    if value in ("", "0", "off", "false"):
        return False
    raise ValueError(f"{ENV}={value!r}; expected 1/on/true or 0/off/false (unset: off)")


def _quantile(times, q: float) -> float:
    """The q-quantile of times (the element at that rank; plain sorting: this runs after every
    few steps, on caches the step has just evicted, so it stays small)."""
    s = sorted(times)
    return s[min(len(s) - 1, int(q * len(s)))]


class TeamPolicy:
    """The decision rule, fed with step times only (tests drive it with synthetic traces).

    `choose()` gives the team of the next step, `record(team, seconds)` the time that step took;
    calls alternate. `full` is the largest team; the state starts on it."""

    def __init__(self, full: int):
        if not isinstance(full, int) or full < 1:
            raise ValueError(f"full = {full!r}; expected an int >= 1 (the caller's thread setting)")
        self.full = full
        self.n = full                   # the current team
        self.switches = 0               # team changes so far (for benchmarks and tests)
        self.probes = 0                 # probes started so far
        self._times: deque[float] = deque(maxlen=HISTORY)  # counted steps of team n
        # the first probe comes early: a machine busy before the first step is found in tens of
        # steps, not hundreds
        self._probe_every, self._until_probe = PROBE_FIRST, 2 * NEIGHBOURS
        self._up_next = True            # where the next probe goes when both ways are open
        self._probe: int | None = None  # team of the probe under way, or None
        self._probe_times: list[float] = []
        self._before: list[float] = []  # the current team's counted steps just before the probe
        self._after: list[float] | None = None  # its steps after the probe (None: probe running)

    # ---- the team of the next step
    def choose(self) -> int:
        if self._probe is not None and self._after is None:
            return self._probe
        if self._probe is None and self._until_probe <= 0 and len(self._times) >= NEIGHBOURS:
            self._start_probe(self._next_probe_team())
            return self._probe
        return self.n

    def _next_probe_team(self) -> int:
        up, down = min(self.full, 2 * self.n), max(1, self.n // 2)
        if up == self.n or (down != self.n and not self._up_next):
            return down
        return up

    def _start_probe(self, team: int) -> None:
        self._up_next = team < self.n   # the next periodic probe goes the other way
        self._probe, self._probe_times, self._after = team, [], None
        self._before = list(self._times)[-NEIGHBOURS:]
        self.probes += 1

    # ---- the time of the step just run
    def record(self, team: int, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"seconds = {seconds!r}; expected a step time >= 0")
        if self._probe is not None:
            if self._after is None:
                if team != self._probe:
                    raise ValueError(f"team = {team}; expected the probe's team {self._probe}")
                self._probe_times.append(seconds)
                if statistics.median(self._probe_times) > ABORT * statistics.median(self._before):
                    self._end_probe(won=False)      # far slower: not worth finishing
                elif len(self._probe_times) == PROBE_STEPS:
                    self._after = []
                return
            if team != self.n:
                raise ValueError(f"team = {team}; expected the current team {self.n}")
            self._after.append(seconds)
            if len(self._after) == NEIGHBOURS + 1:  # the first one, back from the probe, not counted
                neighbours = self._before + self._after[1:]
                win = WIN_UP if self._probe > self.n else WIN_DOWN
                won = statistics.median(self._probe_times[1:]) < win * statistics.median(neighbours)
                self._end_probe(won)
            return
        if team != self.n:
            raise ValueError(f"team = {team}; expected the current team {self.n}")
        self._times.append(seconds)
        self._until_probe -= 1
        # a sustained slowdown (checked every CHECK steps: a slowdown takes WINDOW / 2 steps to
        # show in the median anyway): is a smaller team faster? The settled step time is the lower
        # quartile of the team's history (a few fast outliers or a slow stretch move it little).
        if self.n > 1 and len(self._times) >= 2 * WINDOW and self._until_probe % CHECK == 0:
            recent = [self._times[-i] for i in range(1, WINDOW + 1)]
            if _quantile(recent, 0.5) > SLOW * _quantile(self._times, 0.25):
                self._start_probe(max(1, self.n // 2))

    def _end_probe(self, won: bool) -> None:
        team, probe_times, after = self._probe, self._probe_times, self._after or []
        self._probe, self._after = None, None
        if won:
            self.n, self.switches = team, self.switches + 1
            self._times.clear()
            self._times.extend(probe_times[1:])
            self._probe_every = self._until_probe = PROBE_FIRST
            return
        # the settled time is learnt again from here (a slowdown that the smaller team does not
        # beat is the new normal, not a reason to probe again at once)
        self._times.clear()
        self._times.extend(self._before + after[1:])
        self._probe_every = min(PROBE_MAX, 2 * self._probe_every)
        self._until_probe = self._probe_every


class DecodeThreads:
    """One per model (its forward lock keeps steps sequential). `run(mod, key, step)` calls
    step() with the chosen team size; `key` (e.g. the batch size) starts a new TeamPolicy when it
    changes, as step times of another shape say nothing about these."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled_from_env() if enabled is None else bool(enabled)  # None: the environment
        self._key = None
        self.policy: TeamPolicy | None = None
        self.switches = 0               # team changes so far, over every policy (benchmarks, tests)
        self.teams: dict[int, int] = {}  # steps run per team size (benchmarks)

    @property
    def n(self) -> int:
        """The current team (0 before the first step)."""
        return self.policy.n if self.policy is not None else 0

    def choose(self, full: int, key) -> int:
        """The team for the next step, given the full team (the caller's thread setting)."""
        if not self.enabled or full <= 1:
            return full
        if self.policy is None or key != self._key or full != self.policy.full:
            self._key, self.policy = key, TeamPolicy(full)
        return self.policy.choose()

    def record(self, team: int, full: int, seconds: float) -> None:
        """The step that `choose` sized took `seconds`."""
        self.teams[team] = self.teams.get(team, 0) + 1
        if not self.enabled or full <= 1 or self.policy is None or full != self.policy.full:
            return
        before = self.policy.switches
        self.policy.record(team, seconds)
        self.switches += self.policy.switches - before

    def run(self, mod, key, step):
        """step() on the team chosen for this step (mod: the cpu module, whose kernel_threads sets
        the calling thread's team); records its time. Returns step()'s result."""
        full = mod.kernel_threads(0)
        team = self.choose(full, key)
        if team != full:
            mod.kernel_threads(team)
        t0 = time.perf_counter()
        try:
            out = step()
        finally:
            seconds = time.perf_counter() - t0
            if team != full:
                mod.kernel_threads(full)
        self.record(team, full, seconds)
        return out
