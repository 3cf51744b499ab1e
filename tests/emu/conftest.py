"""Builds the standalone emulated kernel test programs of tests/emu/cpp once per session.

Each program is one translation unit that #includes the kernel .cu files it tests and is
compiled as plain C++ through the CPU emulator (csrc/emu, via csrc/cuda/common.cuh):
    g++ -std=c++20 -O2 -DMOE_EMU -I<cuda>/include -Icsrc -Icsrc/cuda
The binary is cached under build/emu_tests by a hash of the flags, the program and every file
under csrc/ and tests/emu/cpp/, so an unchanged tree reuses it across sessions.
"""
import hashlib
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CPP = ROOT / "tests" / "emu" / "cpp"
CACHE = ROOT / "build" / "emu_tests"


def cuda_include_dir():
    """The CUDA headers (cuda_bf16.h builds under g++), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(pathlib.Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (pathlib.Path(c) / "include" / "cuda_bf16.h").is_file():
            return pathlib.Path(c) / "include"
    return None


def _digest(parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def emu_program():
    """emu_program(name, *extra_flags) -> path of tests/emu/cpp/<name>.cpp built for the emulator."""
    inc = cuda_include_dir()
    cxx = os.environ.get("CXX", "g++")
    if inc is None or shutil.which(cxx) is None:
        pytest.skip("the emulated kernel tests need the CUDA headers (cuda_bf16.h) and a C++20 compiler")
    if not (CSRC / "cuda" / "common.cuh").is_file():
        pytest.skip("csrc/cuda/common.cuh (the emulator entry point) is not in this tree")
    built = {}

    def build(name, *extra):
        key = (name, extra)
        if key in built:
            return built[key]
        src = CPP / f"{name}.cpp"
        flags = ["-std=c++20", "-O2", "-DMOE_EMU", f"-I{inc}", f"-I{CSRC}", f"-I{CSRC / 'cuda'}", *extra]
        files = sorted(p for d in (CSRC, CPP) for p in d.rglob("*") if p.is_file())
        digest = _digest([cxx, *flags, *(f"{p}\0".encode() + p.read_bytes() for p in files)])
        exe = CACHE / f"{name}-{digest}"
        if not exe.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = exe.with_suffix(f".tmp{os.getpid()}")
            r = subprocess.run([cxx, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
            if r.returncode:
                pytest.fail(f"building {src.name} failed:\n{r.stderr[-6000:]}", pytrace=False)
            tmp.replace(exe)
        built[key] = exe
        return exe

    return build
