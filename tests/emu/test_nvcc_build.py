"""Every CUDA kernel file compiles for sm_80 and sm_90a with zero register spills (DESIGN.md 8).

Runs `nvcc -c -Xptxas -v` per file and architecture and parses ptxas's report: every kernel entry
must show "0 bytes spill stores, 0 bytes spill loads" (and no stack frame from spilling). The
report is printed (pytest -s) as the register table. This is the only place the GPU build is
checked on machines without a GPU; the emulated tests cannot see registers or spills.
"""
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ["sm_80", "sm_90a"]

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the GPU build cannot be checked here")
@pytest.mark.parametrize("src", CUDA_FILES, ids=lambda p: p.name)
def test_compiles_without_spills(src, tmp_path):
    """One nvcc run per file for both architectures (one front-end pass, two ptxas reports)."""
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    cmd = ["nvcc", "-std=c++20", "-O3", "-c", *gencode, "-Xptxas", "-v",
           f"-I{ROOT / 'csrc'}", str(src), "-o", str(tmp_path / "k.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-6000:]}"
    lines = r.stderr.splitlines()
    kernels = []
    for i, line in enumerate(lines):
        m = ENTRY.search(line)
        if not m:
            continue
        spill = next((SPILL.search(l) for l in lines[i + 1:i + 4] if SPILL.search(l)), None)
        regs = next((REGS.search(l) for l in lines[i + 1:i + 4] if REGS.search(l)), None)
        assert spill and regs, f"no ptxas report for {m.group(1)}:\n" + "\n".join(lines[i:i + 4])
        kernels.append((m.group(2), m.group(1), int(regs.group(1)), *map(int, spill.groups())))
    for arch, name, regs, stack, stores, loads in kernels:
        print(f"{src.name:22s} {arch:7s} regs {regs:3d} stack {stack:3d} spill st/ld {stores}/{loads}  {name}")
    if "__global__" in src.read_text():
        assert {k[0] for k in kernels} == set(ARCHS), f"{src.name}: no kernel report for some of {ARCHS}"
    spilled = [k for k in kernels if k[4] or k[5]]
    assert not spilled, f"{src.name}: register spills in {spilled}"


def _gpu_present():
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


GPU_PROGRAMS = {  # test program -> one case to run when a GPU is present
    "expert_gemm_test": ["129", "6", "8", "136", "72", "64", "uniform", "1"],
    "moe_decode_test": ["16", "6", "16", "136", "72", "sentinel", "1"],
    "shared_expert_test": ["129", "136", "144", "144", "1"],
}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the GPU build cannot be checked here")
@pytest.mark.parametrize("name", list(GPU_PROGRAMS))
def test_kernel_tests_build_for_the_gpu(name, tmp_path):
    """The emulated test programs are plain CUDA too: they build with nvcc unchanged, and where a
    GPU is present one case runs on it (the only check of the mma / ldmatrix fragment layouts
    and the cp.async ring against hardware)."""
    exe = tmp_path / name
    cmd = ["nvcc", "-x", "cu", "-std=c++20", "-O2", "-arch=sm_80", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "emu" / "cpp" / f"{name}.cu"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-6000:]}"
    if _gpu_present():
        run = subprocess.run([str(exe), *GPU_PROGRAMS[name]], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
