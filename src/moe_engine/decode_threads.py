"""How many threads a one-call decode step runs on, chosen step by step from its own timings.

Why: a decode step of the cpu backend is dozens of short OpenMP parallel regions, each ending in
a barrier that waits for every thread of the team. When other processes hold the cores, the
scheduler takes one of the step's threads off for a time slice and the whole step waits for it
at the next barrier; no OpenMP wait policy changes that (bench/README.md, contention.py). One
thread has no barrier to wait at: it runs whenever it holds a core. So when steps at the full
team become much slower than they were, the step drops to half the team (and halves again while
halving helps, down to one thread). Every so often one step tries the next larger or smaller
team ("probe"): every 16 steps at first, ever more rarely while probes lose (up to every 256);
a probe clearly faster than the current team's recent steps moves there. The probes down find a
machine that was busy before the first step; the probes up find it idle again. On an idle
machine the full team's steps stay near their recent best, and the only steps on fewer threads
are the rare probes (about 0.4 % of the steps after the first few hundred).

Bits: the kernels give the same bits for any thread count (the fixed summation order of
csrc/cpu; tests/test_ops.py), so the choice changes only the speed.

Scope: the thread count of the calling thread's OpenMP regions (`_C.kernel_threads`), set for the
step and restored after it; torch's own setting and other threads are not touched. Opt-in:
MOE_ENGINE_ADAPT_THREADS=1 in the environment (read when a model is loaded); without it every step
runs on the full team. Not the default because on an idle machine it measured 25-30% slower than
the fixed team (its probes and its noise-triggered drops cost more than they save there; numbers
in bench/README.md, bench/contention.py).
"""
from __future__ import annotations

import os
import statistics
import time
from collections import deque

SLOW = 1.5          # a team's recent median step this many times its best one: the machine is busy
WINDOW = 8          # steps in "recent"
HISTORY = 64        # steps whose best is "its best" (short: a step slows as the cache grows)
RETURN = 0.9        # a probe must beat the current team's recent median by this factor to move
PROBE_FIRST = 16    # steps on a team before its first probe; doubled after each probe that loses,
PROBE_MAX = 256     # up to this


class DecodeThreads:
    """One per model (its forward lock keeps steps sequential). `run(mod, key, step)` calls
    step() with the chosen team size; `key` (e.g. the batch size) resets the state when it changes,
    as step times of another shape say nothing about these."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = os.environ.get("MOE_ENGINE_ADAPT_THREADS", "0") in ("1", "on", "true")
        self.enabled = enabled
        self._key = self._full = None
        self.n = 0                      # team of the coming steps (0: the full team, not yet known)
        self.switches = 0               # team changes so far (for benchmarks and tests)

    def _reset(self, full: int) -> None:
        self._full, self.n = full, full
        self._times: deque[float] = deque(maxlen=HISTORY)  # steps at team self.n since it was chosen
        self._until_probe = self._probe_every = PROBE_FIRST
        self._dropped_from: float | None = None
        self._up_next = True            # where the next probe goes when both ways are open

    def choose(self, full: int, key) -> int:
        """The team for the next step, given the full team (the caller's thread setting)."""
        if not self.enabled or full <= 1:
            return full
        if key != self._key or full != self._full:
            self._key = key
            self._reset(full)
        if self._until_probe > 0:
            return self.n
        up, down = min(full, 2 * self.n), max(1, self.n // 2)  # a probe of the next team
        if up == self.n or (down != self.n and not self._up_next):
            return down
        return up

    def record(self, team: int, full: int, seconds: float) -> None:
        """The step that `choose` sized took `seconds`."""
        if not self.enabled or full <= 1 or full != self._full:
            return
        if team == self.n:
            self._times.append(seconds)
            self._until_probe -= 1
            if self.n > 1 and len(self._times) >= WINDOW:
                recent = statistics.median(list(self._times)[-WINDOW:])
                if len(self._times) == WINDOW and self._dropped_from and recent < RETURN * self._dropped_from:
                    self._switch(max(1, self.n // 2), recent)  # halving helped: try the next half
                elif recent > SLOW * min(self._times):
                    self._switch(max(1, self.n // 2), recent)  # much slower than of late: busy
            return
        # a probe of the next larger or smaller team
        self._up_next = not self._up_next
        recent = statistics.median(list(self._times)[-WINDOW:])
        if seconds < RETURN * recent:
            self._switch(team, recent if team < self.n else None)
            self._times.append(seconds)
        else:
            self._probe_every = min(PROBE_MAX, 2 * self._probe_every)
            self._until_probe = self._probe_every

    def _switch(self, team: int, dropped_from: float | None) -> None:
        """To `team`; dropped_from: the recent median step of the larger team left (None: up)."""
        self.n, self.switches, self._dropped_from = team, self.switches + 1, dropped_from
        self._times.clear()
        self._until_probe = self._probe_every = PROBE_FIRST

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
