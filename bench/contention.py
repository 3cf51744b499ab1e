"""Decode speed on a busy machine: alone, beside 1 and beside N CPU-burning processes.

    python bench/contention.py                       # bench-small bf16, 2 threads, 0 / 1 / 4 burners
    python bench/contention.py --burners 0,4 --seconds 5 --env OMP_WAIT_POLICY=active --json

For each burner count it measures the decode teams of --modes one right after the other: `fixed`
(every step on --threads threads, MOE_ENGINE_ADAPT_THREADS=0) and `adaptive` (the team follows the
machine, src/moe_engine/decode_threads.py, MOE_ENGINE_ADAPT_THREADS=1), both on the cpu kernels'
thread pool (csrc/cpu/pool.h); `fixed-omp` and `adaptive-omp` are the same with MOE_ENGINE_POOL=0
(the same chunks as OpenMP regions, which wait at a barrier for every thread: the kernels before
the pool). Then it prints issue 12's targets as ratios against the fixed team's idle row: the
adaptive idle speed (>= 0.97), the pool's idle speed against OpenMP's (>= 0.97, when fixed-omp
is measured), and beside 4 the speed (>= 0.35) and the p90 step (<= 4x).
Every measurement runs in a fresh Python process (OpenMP reads its wait settings once, when torch
loads it), times single-sequence decode steps of the cpu backend for --seconds, and reports
tokens/s, the p50 / p90 step time, how often the decode step changed its thread team and the share
of its steps on fewer threads (warm-up and probes included), and the machine's 1-minute load
average before the burners start (other jobs: the measurement means little when it is high).
Burners are plain busy loops, started before the measurement and killed after it; the whole run
takes about (modes) x (burner counts) x (--repeat) x (--seconds + load time). `--env NAME=VALUE`
(repeatable) sets variables for the measured process only, e.g. to compare with the OpenMP default
(`OMP_WAIT_POLICY=active`, or `MOE_ENGINE_SPIN=default`, which leaves libgomp's own settings; see
src/moe_engine/__init__.py). The last line under --json is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, sys, time
import moe_engine, torch
path, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(threads)
m = moe_engine.load(path, backend="cpu")
ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
tok = torch.tensor([[9]])
steps, cap = [], 256
def fresh():
    c = m.new_cache(1, cap)
    m.forward(ids, cache=c, logits="last")
    return c
cache = fresh()
for _ in range(8):                      # warm-up
    m.forward(tok, cache=cache, logits="last")
t_end = time.perf_counter() + seconds
while time.perf_counter() < t_end:
    if cache.used >= cap:
        cache = fresh()
    t = time.perf_counter()
    m.forward(tok, cache=cache, logits="last")
    steps.append(time.perf_counter() - t)
ctl = m._cpu_weights().threads
print(json.dumps({"steps": steps, "switches": ctl.switches, "teams": ctl.teams}))
"""


def _burn() -> None:
    while True:
        pass


def measure(path: str, threads: int, seconds: float, burners: int, env: dict[str, str]) -> dict:
    procs = [mp.Process(target=_burn, daemon=True) for _ in range(burners)]
    load = os.getloadavg()[0]  # the machine's own load, before the burners start
    try:
        for p in procs:
            p.start()
        out = subprocess.run([sys.executable, "-c", _CHILD, path, str(threads), str(seconds)],
                             env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=seconds + 300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit(f"error: could not run the measurement beside {burners} burners: {e}") from None
    finally:
        for p in procs:
            if p.pid is not None:
                p.kill()
                p.join()
    if out.returncode != 0:
        raise SystemExit(f"error: the measuring process failed:\n{out.stderr[-2000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    steps = sorted(child["steps"])
    if len(steps) < 2:  # a p90 needs two; the table shows how few there were
        raise SystemExit(f"error: {len(steps)} decode step(s) beside {burners} burners; "
                         f"expected >= 2 (raise --seconds)")
    q = statistics.quantiles(steps, n=10)
    teams = {int(k): v for k, v in child["teams"].items()}
    fewer = sum(v for k, v in teams.items() if k < threads)
    return {"burners": burners, "steps": len(steps), "tok_s": len(steps) / sum(steps),
            "p50_ms": 1e3 * statistics.median(steps), "p90_ms": 1e3 * q[8],
            "switches": child["switches"], "fewer": fewer / max(1, sum(teams.values())), "load": load}


def _median_rows(runs: list[dict]) -> dict:
    """One row from --repeat runs of the same measurement: the median of each number."""
    row = dict(runs[0])
    for k in ("tok_s", "p50_ms", "p90_ms", "switches", "fewer", "load", "steps"):
        row[k] = statistics.median(r[k] for r in runs)
    row["runs"] = [r["tok_s"] for r in runs]
    return row


def targets(rows: dict[tuple[str, int], dict]) -> list[tuple[str, float, str, bool | None]]:
    """Issue 12's targets from the rows {(mode, burners): row}: (what, value, target, met; None
    where the issue sets no target, e.g. beside 1); ratios whose rows are missing are left out. Speeds and p90s of the busy rows are measured against the FIXED team's
    idle row (today's default before the adaptive team), and the adaptive team's idle speed
    against it too."""
    out = []
    fixed0, adapt0, omp0 = rows.get(("fixed", 0)), rows.get(("adaptive", 0)), rows.get(("fixed-omp", 0))
    if fixed0 and adapt0:
        r = adapt0["tok_s"] / fixed0["tok_s"]
        out.append(("adaptive idle speed / fixed idle speed", r, ">= 0.97", r >= 0.97))
    if fixed0 and omp0:
        r = fixed0["tok_s"] / omp0["tok_s"]
        out.append(("fixed idle speed / fixed-omp idle speed", r, ">= 0.97", r >= 0.97))
    for mode in MODES:
        for n in sorted({b for (m, b) in rows if m == mode and b}):
            row = rows[(mode, n)]
            if fixed0:
                r = row["tok_s"] / fixed0["tok_s"]
                out.append((f"{mode} beside {n}: speed / fixed idle speed", r, ">= 0.35" if n == 4 else "", r >= 0.35 if n == 4 else None))
                r = row["p90_ms"] / fixed0["p90_ms"]
                out.append((f"{mode} beside {n}: p90 / fixed idle p90", r, "<= 4" if n == 4 else "", r <= 4 if n == 4 else None))
            own = rows.get((mode, 0))
            if own and mode.startswith("adaptive"):
                out.append((f"{mode} beside {n}: speed / its own idle speed", row["tok_s"] / own["tok_s"], "", None))
    return out


# the environment of the measured process per mode (MOE_ENGINE_POOL=0: OpenMP regions, pool.h)
MODES = {"fixed": {"MOE_ENGINE_ADAPT_THREADS": "0"},
         "adaptive": {"MOE_ENGINE_ADAPT_THREADS": "1"},
         "fixed-omp": {"MOE_ENGINE_ADAPT_THREADS": "0", "MOE_ENGINE_POOL": "0"},
         "adaptive-omp": {"MOE_ENGINE_ADAPT_THREADS": "1", "MOE_ENGINE_POOL": "0"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench-small", help="synthetic checkpoint preset (default: %(default)s)")
    ap.add_argument("--model", help="a checkpoint directory instead of --preset (default: none)")
    ap.add_argument("--threads", type=int, default=2, help="decode threads; up to 4x the core count, to measure oversubscription (default: %(default)s)")
    ap.add_argument("--burners", default="0,1,4", help="numbers of busy processes beside it (default: %(default)s)")
    ap.add_argument("--modes", default="fixed,adaptive",
                    help="decode teams to measure: fixed (every step on --threads), adaptive "
                         "(src/moe_engine/decode_threads.py), fixed-omp and adaptive-omp (the same "
                         "on OpenMP regions instead of the thread pool) (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed decode per measurement (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measurements per row, alternating the modes' order; rows show medians (default: %(default)s)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the measured process, repeatable (default: none)")
    ap.add_argument("--json", action="store_true", help="end with one JSON object (default: off)")
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.burners.split(",")]
        env = dict(e.split("=", 1) for e in args.env)
    except ValueError:
        ap.error(f"--burners {args.burners!r} / --env {args.env}: expected '0,1,4' and NAME=VALUE")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        ap.error(f"--modes {args.modes!r}: expected a comma-separated subset of {', '.join(MODES)}")
    for name in ("MOE_ENGINE_ADAPT_THREADS", "MOE_ENGINE_POOL"):
        if name in env:
            ap.error(f"--env {name}: set by --modes (fixed, adaptive, fixed-omp, adaptive-omp)")
    if any(n < 0 for n in counts) or not 1 <= args.repeat <= 10:
        ap.error(f"--burners {args.burners!r} / --repeat {args.repeat}: expected counts >= 0 and 1..10 repeats")
    if not 0 < args.seconds <= 60 or not 1 <= args.threads <= 4 * (os.cpu_count() or 1):
        ap.error(f"--seconds {args.seconds} / --threads {args.threads}: expected 0 < s <= 60 and "
                 f"1..{4 * (os.cpu_count() or 1)} threads")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from moe_engine.synthetic import make_checkpoint
            path = str(make_checkpoint(tmp, args.preset))
        rows: dict[tuple[str, int], dict] = {}
        print(f"{'team':>12} {'beside':>6} {'tok/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'steps':>6} "
              f"{'switches':>8} {'fewer':>6} {'load':>5}   env {env or 'default'}")
        for n in counts:
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            for rep in range(args.repeat):
                # alternate the order so that a drift of the machine's load favours neither mode
                for mode in (modes if (rep + n) % 2 == 0 else modes[::-1]):
                    runs[mode].append(measure(path, args.threads, args.seconds, n, {**env, **MODES[mode]}))
            for mode in modes:
                r = rows[(mode, n)] = {"mode": mode, **_median_rows(runs[mode])}
                print(f"{mode:>12} {n:>6} {r['tok_s']:8.1f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} "
                      f"{int(r['steps']):6d} {r['switches']:8g} {100 * r['fewer']:5.1f}% {r['load']:5.1f}", flush=True)
    checks = targets(rows)
    for what, value, target, met in checks:
        verdict = "" if met is None else ("  met" if met else "  NOT met")
        print(f"{what:48s} {value:6.2f}  {target:>7s}{verdict}")
    # only the idle rows: a row beside burners inherits the previous row's burners in the 1-minute average
    busiest = max((r["load"] for (mode, n), r in rows.items() if n == 0), default=0.0)
    if checks and busiest > (os.cpu_count() or 1):
        print(f"note: the load average before an idle row reached {busiest:.1f} on {os.cpu_count()} cores: other "
              f"jobs were running, so the 'beside 0' rows were busy rows and the verdicts say little")
    if args.json:
        print(json.dumps({"threads": args.threads, "env": env, "rows": list(rows.values()),
                          "targets": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
