"""Decode speed on a busy machine: alone, beside 1 and beside N CPU-burning processes.

    python bench/contention.py                       # bench-small bf16, 2 threads, 0 / 1 / 4 burners
    python bench/contention.py --burners 0,4 --seconds 5 --env OMP_WAIT_POLICY=active --json

Every measurement runs in a fresh Python process (OpenMP reads its wait settings once, when torch
loads it), times single-sequence decode steps of the cpu backend for --seconds, and reports
tokens/s, the p50 / p90 step time, how often the decode step changed its thread team
(src/moe_engine/decode_threads.py; opt-in with --env MOE_ENGINE_ADAPT_THREADS=1) and the machine's
1-minute load average before the burners start (other jobs: the measurement means little when it
is high). Burners are plain busy loops, started before the measurement and killed after it;
the whole run takes about (burner counts) x (--seconds + load time). `--env NAME=VALUE` (repeatable) sets variables for the measured process only, e.g. to
compare with the OpenMP default (`OMP_WAIT_POLICY=active`, or `MOE_ENGINE_SPIN=default`, which
leaves libgomp's own settings; see src/moe_engine/__init__.py). The last line under --json is one
JSON object.
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
print(json.dumps({"steps": steps, "switches": m._cpu_weights().threads.switches}))
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
    q = statistics.quantiles(steps, n=10)
    return {"burners": burners, "steps": len(steps), "tok_s": len(steps) / sum(steps),
            "p50_ms": 1e3 * statistics.median(steps), "p90_ms": 1e3 * q[8],
            "switches": child["switches"], "load": load}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench-small", help="synthetic checkpoint preset (default: %(default)s)")
    ap.add_argument("--model", help="a checkpoint directory instead of --preset (default: none)")
    ap.add_argument("--threads", type=int, default=2, help="decode threads (default: %(default)s)")
    ap.add_argument("--burners", default="0,1,4", help="numbers of busy processes beside it (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed decode per measurement (default: %(default)s)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the measured process, repeatable (default: none)")
    ap.add_argument("--json", action="store_true", help="end with one JSON object (default: off)")
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.burners.split(",")]
        env = dict(e.split("=", 1) for e in args.env)
    except ValueError:
        ap.error(f"--burners {args.burners!r} / --env {args.env}: expected '0,1,4' and NAME=VALUE")
    if not 0 < args.seconds <= 60 or not 1 <= args.threads <= (os.cpu_count() or 1):
        ap.error(f"--seconds {args.seconds} / --threads {args.threads}: expected 0 < s <= 60 and "
                 f"1..{os.cpu_count()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from moe_engine.synthetic import make_checkpoint
            path = str(make_checkpoint(tmp, args.preset))
        rows = []
        print(f"{'beside':>6} {'tok/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'steps':>6} {'teams':>6} {'load':>5}"
              f"   env {env or 'default'}")
        for n in counts:
            r = measure(path, args.threads, args.seconds, n, env)
            rows.append(r)
            print(f"{n:>6} {r['tok_s']:8.1f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['steps']:6d} "
                  f"{r['switches']:6d} {r['load']:5.1f}", flush=True)
    idle = next((r for r in rows if r["burners"] == 0), None)
    if idle:
        for r in rows:
            if r["burners"]:
                print(f"beside {r['burners']}: {100 * r['tok_s'] / idle['tok_s']:.0f}% of idle speed, "
                      f"p90 {r['p90_ms'] / idle['p90_ms']:.1f}x idle")
    if args.json:
        print(json.dumps({"threads": args.threads, "env": env, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
