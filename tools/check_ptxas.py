#!/usr/bin/env python3
"""Compile every csrc/cuda/*.cu for sm_80 and sm_90a with `-Xptxas -v` and fail on register spills.

Usage: tools/check_ptxas.py [-j JOBS] [files...]      (default: every csrc/cuda/*.cu)

Prints one row per kernel and architecture: registers, stack frame, spill stores / loads, static
shared memory, the kernel's __launch_bounds__ (from the PTX .maxntid / .minnctapersm), the CTAs
per SM its registers and threads allow, and its PTX instruction count (static, whole kernel; a
proxy for issue pressure: this toolkit has no SASS disassembler). Exit status 1 when any kernel
spills (the bar in docs/design.md §8), declares no __launch_bounds__, uses more registers than
its launch bounds allow (a launch of that many threads would fail with "too many resources
requested"), or when a file does not compile. Needs nvcc only (no GPU). Flags match the _C build:
-std=c++20 -O3. Dynamic shared memory is not in ptxas's report: the kernels' headers give it.
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


# Per-SM limits of compute capability 8.0 and 9.0 (the same for these: 64K registers, 2048
# threads, 32 CTAs); registers are allocated per warp in units of 256 (8 per thread).
REGS_PER_SM, THREADS_PER_SM, CTAS_PER_SM, REG_UNIT = 65536, 2048, 32, 8

MAXNTID = re.compile(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)")
MINCTA = re.compile(r"\.minnctapersm\s+(\d+)")
PTX_ENTRY = re.compile(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+(\S+?)\(", re.M)


def compile_one(src: Path, arch: str, outdir: Path) -> tuple[str, str, int]:
    """Compile `src` for `arch`; returns (ptxas report with the PTX appended, command, status)."""
    keep = outdir / f"{src.stem}.{arch}.keep"
    keep.mkdir(parents=True, exist_ok=True)
    # -cubin: the device code only (ptxas's report and the PTX are the same as for -c; the host
    # half of the compile, ~half the time, is the package build's business)
    cmd = ["nvcc", "-cubin", "-std=c++20", "-O3", "--expt-relaxed-constexpr", *ARCHS[arch], "-Xptxas", "-v",
           "--keep", f"--keep-dir={keep}", f"-I{REPO / 'csrc'}", str(src), "-o", str(outdir / f"{src.stem}.{arch}.cubin")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    ptx = "".join(p.read_text() for p in sorted(keep.glob("*.ptx")))
    return r.stdout + r.stderr + "\n" + PTX_MARK + "\n" + ptx, " ".join(cmd), r.returncode


PTX_MARK = "#### PTX"


def parse_ptx(ptx: str) -> dict[str, dict]:
    """Launch bounds and instruction counts of each .entry in a PTX file."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in PTX_ENTRY.finditer(ptx)]
    for i, (pos, name) in enumerate(starts):
        body = ptx[pos:starts[i + 1][0] if i + 1 < len(starts) else len(ptx)]
        info = {}
        head = body[:body.find("{")] if "{" in body else body
        if m := MAXNTID.search(head):
            info["maxntid"] = int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        if m := MINCTA.search(head):
            info["minctas"] = int(m.group(1))
        code = body[body.find("{"):] if "{" in body else ""
        instr = [l.strip() for l in code.splitlines()
                 if l.strip().endswith(";") and not l.strip().startswith((".", "//", "{", "}"))]
        info["ptx_instr"] = len(instr)
        info["ptx_cp_async"] = sum("cp.async.cg" in l or "cp.async.ca" in l for l in instr)
        info["ptx_mma"] = sum(l.startswith("mma.") or "\tmma." in l or " mma." in l for l in instr)
        out[name] = info
    return out


def occupancy(regs: int, threads: int) -> int:
    """CTAs per SM that registers and threads allow (shared memory not counted)."""
    warps = -(-threads // 32)
    regs_cta = -(-max(regs, 1) // REG_UNIT) * REG_UNIT * 32 * warps
    return min(REGS_PER_SM // regs_cta, THREADS_PER_SM // (warps * 32), CTAS_PER_SM)


def bounds_problems(r: dict) -> list[str]:
    """What is wrong with an entry's registers against its __launch_bounds__ (empty: nothing)."""
    if not r.get("entry"):
        return []
    if "maxntid" not in r:
        return ["declares no __launch_bounds__ (ptxas may then use registers a large block cannot get)"]
    need = max(r.get("minctas", 1), 1)
    have = occupancy(r.get("regs", 0), r["maxntid"])
    if have < need:
        return [f"{r.get('regs', 0)} registers x {r['maxntid']} threads allow {have} CTAs per SM; "
                f"__launch_bounds__ asks for {need}"]
    return []


def parse(report: str) -> list[dict]:
    report, _, ptx = report.partition(PTX_MARK)
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
    info = parse_ptx(ptx)
    for r in rows:
        r.update(info.get(r["name"], {}))
        if r["entry"] and "maxntid" in r:
            r["ctas_per_sm"] = occupancy(r.get("regs", 0), r["maxntid"])
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
          f"{'smem':>6} {'bounds':>7} {'CTA/SM':>6} {'ptx ins':>7}")
    for r in sorted(rows, key=lambda r: (r["file"], short(names[r["name"]]), r["arch"])):
        spills = r.get("spill_st", 0) + r.get("spill_ld", 0)
        problems = (["SPILLS"] if spills else []) + bounds_problems(r)
        flag = "  <-- " + "; ".join(problems) if problems else ""
        failed |= bool(problems)
        bounds = f"{r['maxntid']}x{r.get('minctas', 1)}" if "maxntid" in r else "-"
        print(f"{r['file']:<12} {short(names[r['name']]):<{w}} {r['arch']:<7} {r.get('regs', 0):>4} "
              f"{r.get('frame', 0):>5} {r.get('spill_st', 0):>8} {r.get('spill_ld', 0):>8} {r.get('smem', 0):>6}"
              f" {bounds:>7} {r.get('ctas_per_sm', '-'):>6} {r.get('ptx_instr', '-'):>7}{flag}")
    print("check_ptxas: " + ("FAIL (spills, launch bounds or compile errors)" if failed else
                             f"OK: {len(rows)} kernels x arch, zero spills, registers within launch bounds"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
