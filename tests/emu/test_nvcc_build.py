"""Every CUDA kernel compiles for sm_80 and sm_90a with zero register spills (docs/design.md §8).

Runs `nvcc -c -Xptxas -v` per file and architecture and parses ptxas's report: every kernel entry
must show "0 bytes spill stores, 0 bytes spill loads" (and no stack frame from spilling). The
report is printed (pytest -s) as the register table. This is the only place the GPU build is
checked on machines without a GPU; the emulated tests cannot see registers or spills.
"""
import importlib.util
import pathlib
import shutil
import subprocess

import pytest

from emu_harness import sanitize_mode, tolerances_header

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

# One parser of ptxas reports: tools/check_ptxas.py (also the CLI that prints the whole table).
_spec = importlib.util.spec_from_file_location("check_ptxas", ROOT / "tools" / "check_ptxas.py")
check_ptxas = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_ptxas)
ARCHS = list(check_ptxas.ARCHS)

# nvcc's output does not depend on the emulator's sanitizer: the plain tests/emu run (the README
# test command) checks it; the sanitizer steps (tools/run_emu_tests.sh) would only compile it all
# again, ~7 CPU-minutes of CI.
pytestmark = pytest.mark.skipif(sanitize_mode() != "none",
                                reason="nvcc build: checked in the run without MOE_EMU_SANITIZE")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the GPU build cannot be checked here")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CUDA_FILES, ids=lambda p: p.name)
def test_compiles_without_spills(src, arch, tmp_path):
    report, cmd, rc = check_ptxas.compile_one(src, arch, tmp_path)
    assert rc == 0, f"{cmd}\n{report.partition(check_ptxas.PTX_MARK)[0][-6000:]}"
    rows = check_ptxas.parse(report)
    for r in rows:
        print(f"{src.name:22s} {arch:7s} regs {r.get('regs', 0):3d} stack {r.get('frame', 0):3d} "
              f"spill st/ld {r.get('spill_st', 0)}/{r.get('spill_ld', 0)} bounds {r.get('maxntid', '-')}"
              f"x{r.get('minctas', 1)} CTA/SM {r.get('ctas_per_sm', '-')}  {r['name']}")
    if "__global__" in src.read_text():
        assert any(r["entry"] for r in rows), f"{src.name}: no kernel report for {arch}"
    spilled = [r for r in rows if r.get("spill_st", 0) or r.get("spill_ld", 0)]
    assert not spilled, f"{src.name} ({arch}): register spills in {spilled}"
    over = {r["name"]: check_ptxas.bounds_problems(r) for r in rows if check_ptxas.bounds_problems(r)}
    assert not over, f"{src.name} ({arch}): registers against __launch_bounds__: {over}"


PTX_SAMPLE = """
.visible .entry bounded(
\t.param .u64 p
)
.maxntid 256, 1, 1
.minnctapersm 2
{
\t.reg .b32 \t%r<4>;
\tmov.u32 \t%r1, 0;
\tcp.async.cg.shared.global [%r1], [%r2], 16, %r3;
\tret;
}
.visible .entry unbounded(
\t.param .u64 p
)
{
\tret;
}
"""


@pytest.mark.parametrize("regs, ok", [(128, True), (129, False), (255, False)])
def test_register_check_against_launch_bounds(regs, ok):
    """The ptxas/PTX parser ties registers to __launch_bounds__: 256 threads x 2 CTAs per SM fit
    65536 registers at <= 128 per thread (allocation unit 8); more would make such a launch fail
    on a GPU. A kernel with no launch bounds is flagged. Runs without nvcc (a fixed PTX text)."""
    report = (f"ptxas info    : Compiling entry function 'bounded' for 'sm_80'\n"
              f"ptxas info    : Function properties for bounded\n"
              f"    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
              f"ptxas info    : Used {regs} registers, used 1 barriers, 52 bytes smem, 424 bytes cmem[0]\n"
              f"ptxas info    : Compiling entry function 'unbounded' for 'sm_80'\n"
              f"ptxas info    : Used 8 registers, 360 bytes cmem[0]\n"
              f"{check_ptxas.PTX_MARK}\n{PTX_SAMPLE}")
    rows = {r["name"]: r for r in check_ptxas.parse(report)}
    assert rows["bounded"]["maxntid"] == 256 and rows["bounded"]["minctas"] == 2
    assert rows["bounded"]["ptx_instr"] == 3 and rows["bounded"]["ptx_cp_async"] == 1
    assert (check_ptxas.bounds_problems(rows["bounded"]) == []) == ok
    assert "no __launch_bounds__" in check_ptxas.bounds_problems(rows["unbounded"])[0]


def _gpu_present():
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


GPU_PROGRAMS = {  # test program -> one case to run when a GPU is present
    "expert_gemm_test": ["129", "6", "8", "136", "72", "64", "uniform", "1"],
    "moe_decode_test": ["16", "6", "16", "136", "72", "sentinel", "1"],
    "moe_decode_q_test": ["16", "6", "16", "136", "72", "4", "128", "0", "fp16", "sentinel", "1"],
    "expert_gemm_q_test": ["129", "6", "8", "136", "72", "64", "4", "128", "0", "fp16", "sentinel", "1"],
    "shared_expert_test": ["129", "136", "144", "144", "1"],
}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the GPU build cannot be checked here")
@pytest.mark.parametrize("name", list(GPU_PROGRAMS))
def test_kernel_tests_build_for_the_gpu(name, tmp_path):
    """The emulated test programs are plain CUDA too: they build with nvcc unchanged, and where a
    GPU is present one case runs on it (the only check of the mma / ldmatrix fragment layouts
    and the cp.async ring against hardware)."""
    exe = tmp_path / name
    (tmp_path / "test_tolerances.h").write_text(tolerances_header())
    cmd = ["nvcc", "-x", "cu", "-std=c++20", "-O2", "-arch=sm_80", f"-I{ROOT / 'csrc'}", f"-I{tmp_path}",
           str(ROOT / "tests" / "emu" / "cpp" / f"{name}.cu"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-6000:]}"
    if _gpu_present():
        run = subprocess.run([str(exe), *GPU_PROGRAMS[name]], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
