#!/usr/bin/env python3
"""Compile every csrc/cuda/*.cu for sm_80 and sm_90a with `-Xptxas -v` and fail on register spills.

Usage: tools/check_ptxas.py [-j JOBS] [files...]      (default: every csrc/cuda/*.cu)

Prints one row per kernel and architecture: registers, stack frame, spill stores / loads, static
shared memory. Exit status 1 when any kernel spills (the bar in docs/design.md §8) or when a
file does not compile. Needs nvcc only (no GPU). Flags match the _C build: -std=c++20 -O3.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHS = {"sm_80": ["-arch=sm_80"], "sm_90a": ["-gencode", "arch=compute_90a,code=sm_90a"]}

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def compile_one(src: Path, arch: str, outdir: Path) -> tuple[str, str, int]:
    cmd = ["nvcc", "-c", "-std=c++20", "-O3", "--expt-relaxed-constexpr", *ARCHS[arch], "-Xptxas", "-v",
           f"-I{REPO / 'csrc'}", str(src), "-o", str(outdir / f"{src.stem}.{arch}.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.stdout + r.stderr, " ".join(cmd), r.returncode


def parse(report: str) -> list[dict]:
    rows, cur = [], None
    for line in report.splitlines():
        if m := ENTRY.search(line):
            cur = {"name": m.group(1), "arch": m.group(2), "entry": True}
            rows.append(cur)
        elif m := PROPS.search(line):
            name = m.group(1)
            cur = next((r for r in rows if r["name"] == name and "frame" not in r), None)
            if cur is None:  # a non-inlined device function: spills there count too
                cur = {"name": name, "arch": rows[-1]["arch"] if rows else "?", "entry": False}
                rows.append(cur)
        elif (m := FRAME.search(line)) and cur is not None:
            cur["frame"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        elif (m := USED.search(line)) and cur is not None:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    return rows


def demangle(names: list[str]) -> dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::|moe::", "", name)
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args()
    if not shutil.which("nvcc"):
        print("check_ptxas: nvcc not found", file=sys.stderr)
        return 2
    files = args.files or sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    if not files:
        print("check_ptxas: no .cu files", file=sys.stderr)
        return 2
    jobs = [(f, a) for f in files for a in ARCHS]
    failed = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda fa: (fa, compile_one(fa[0], fa[1], Path(tmp))), jobs))
    for (src, arch), (report, cmd, rc) in results:
        if rc != 0:
            failed = True
            print(f"check_ptxas: {src.name} ({arch}) does not compile:\n{cmd}\n{report}", file=sys.stderr)
            continue
        for r in parse(report):
            r["file"] = src.name
            rows.append(r)
    names = demangle(sorted({r["name"] for r in rows}))
    w = max([len(short(names[r["name"]])) for r in rows] + [6])
    print(f"{'file':<12} {'kernel':<{w}} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8} "
          f"{'smem':>6}")
    for r in sorted(rows, key=lambda r: (r["file"], short(names[r["name"]]), r["arch"])):
        spills = r.get("spill_st", 0) + r.get("spill_ld", 0)
        flag = "  <-- SPILLS" if spills else ""
        failed |= spills > 0
        print(f"{r['file']:<12} {short(names[r['name']]):<{w}} {r['arch']:<7} {r.get('regs', 0):>4} "
              f"{r.get('frame', 0):>5} {r.get('spill_st', 0):>8} {r.get('spill_ld', 0):>8} {r.get('smem', 0):>6}"
              f"{flag}")
    print("check_ptxas: " + ("FAIL (spills or compile errors)" if failed else
                             f"OK: {len(rows)} kernels x arch, zero spills"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
