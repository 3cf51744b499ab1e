"""Build and run the emulated C++ test programs under tests/emu/cpp/ (fixtures: conftest.py).

Each program is compiled once per session with g++ against csrc/emu (the CPU emulator) and cached
by a hash of its sources, every header under csrc/, the compiler flags and the compiler version, so
reruns only link what changed.

Environment:
  MOE_EMU_SANITIZE   unset/0: -O2 | 1 or "address": -fsanitize=address,undefined (the fibers'
                     switches carry ASan's fiber annotations) | "thread": -fsanitize=thread
                     and the threads backend (a missing barrier becomes a reported data race)
  MOE_EMU_ORDERS     comma list of thread orders the order-parametrised tests run in
                     (default "forward,reverse,random")
  MOE_EMU_BUILD_DIR  where binaries are cached (default <repo>/build/emu-tests)
  CXX                compiler (default g++)

The programs' tolerances come from tests/tolerances.py, the suite's one table: the builder writes
its C++ form (tolerances.cpp_header) as <build dir>/include/test_tolerances.h, and the header's
text is part of every binary's cache key.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CPP = Path(__file__).resolve().parent / "cpp"
ORDERS = [o for o in os.environ.get("MOE_EMU_ORDERS", "forward,reverse,random").split(",") if o]


def cuda_include() -> str:
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        candidates.append(real.parent.parent / "include")
        # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where it lives
        try:
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
            for line in out.splitlines():
                if "TOP=" in line:
                    candidates.append(Path(line.split("TOP=", 1)[1].strip()) / "include")
        except OSError:
            pass
    candidates += [Path("/usr/local/cuda/include")]
    for c in candidates:
        if (c / "cuda_bf16.h").exists():
            return str(c)
    pytest.skip("no CUDA toolkit headers (cuda_bf16.h) found")


def sanitize_mode() -> str:
    v = os.environ.get("MOE_EMU_SANITIZE", "0").strip().lower()
    return {"": "none", "0": "none", "1": "address", "address": "address", "asan": "address",
            "thread": "thread", "tsan": "thread"}.get(v, "address")


def compile_flags() -> list[str]:
    flags = ["-std=c++20", "-DMOE_EMU", f"-I{cuda_include()}", f"-I{REPO / 'csrc'}", "-Wall", "-Wextra",
             "-Wno-unused-parameter", "-pthread"]
    mode = sanitize_mode()
    if mode == "address":
        flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]
    elif mode == "thread":
        flags += ["-O1", "-g", "-fsanitize=thread"]
    else:
        flags += ["-O2"]
    return flags


def tolerances_header() -> str:
    """tests/tolerances.py's table as C++ (loaded by path: tests/emu may run on its own)."""
    spec = importlib.util.spec_from_file_location("tolerances", REPO / "tests" / "tolerances.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cpp_header()


def write_if_changed(path: Path, text: str) -> None:
    """Atomic, and untouched when equal (pytest-xdist workers write it side by side)."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Builder:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.cxx = os.environ.get("CXX", "g++")
        header = tolerances_header()
        write_if_changed(out_dir / "include" / "test_tolerances.h", header)
        self.flags = [*compile_flags(), f"-I{out_dir / 'include'}"]
        version = subprocess.run([self.cxx, "--version"], capture_output=True, text=True).stdout
        h = hashlib.sha256(version.encode() + " ".join(self.flags).encode() + header.encode())
        for p in sorted((REPO / "csrc").rglob("*")):
            if p.suffix in {".h", ".cuh", ".cu", ".cpp"} and p.is_file():
                h.update(str(p.relative_to(REPO)).encode() + p.read_bytes())
        self.common_hash = h.hexdigest()

    def build(self, name: str, sources: list[Path]) -> Path:
        h = hashlib.sha256(self.common_hash.encode())
        for s in sources:
            h.update(str(s).encode() + s.read_bytes())
        exe = self.out_dir / f"{name}-{sanitize_mode()}-{h.hexdigest()[:16]}"
        if exe.exists():
            return exe
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # pytest-xdist workers that need the same program at once: one compiles it, the others
        # wait for it (an ASan build of a kernel test takes minutes; compiling it twice doubled that)
        with open(self.out_dir / f".{name}-{sanitize_mode()}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if exe.exists():  # built by another worker while this one waited
                return exe
            tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
            cmd = [self.cxx, *self.flags, "-x", "c++", *map(str, sources), "-o", str(tmp)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"compiling {name} failed:\n{' '.join(cmd)}\n{r.stderr[-8000:]}")
            tmp.rename(exe)
            for old in self.out_dir.glob(f"{name}-{sanitize_mode()}-*"):  # superseded builds
                if old != exe and not old.name.endswith(".tmp"):
                    old.unlink(missing_ok=True)
        return exe


def make_builder() -> Builder:
    return Builder(Path(os.environ.get("MOE_EMU_BUILD_DIR", REPO / "build" / "emu-tests")))


def run_program(exe: Path, *args: str, order: str = "forward", backend: str | None = None,
                seed: int | None = None, timeout: float = 300, env_extra: dict | None = None):
    env = dict(os.environ)
    env["MOE_EMU_ORDER"] = order
    if backend:
        env["MOE_EMU_BACKEND"] = backend
    if seed is not None:
        env["MOE_EMU_SEED"] = str(seed)
    if sanitize_mode() == "address":
        # abort() in a negative test is the expected outcome, not a leak report
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    if env_extra:
        env.update(env_extra)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=timeout)


def util_tag() -> str:
    """The binary cache hashes csrc/ and the listed sources but not headers beside them; name
    the kernel test binaries after moe_test_util.h's content so an edit there rebuilds them."""
    return hashlib.sha256((CPP / "moe_test_util.h").read_bytes()).hexdigest()[:8]


def check_program(exe: Path, *args, order: str = "forward", seed=None) -> str:
    """Run one case of a kernel test program, which prints one line per checked tensor and
    exits 0 when all pass; assert it passed without emulator warnings."""
    timeout = 300 if sanitize_mode() == "none" else 1500  # TSan runs are ~100x slower
    r = run_program(exe, *map(str, args), order=order, seed=seed, timeout=timeout)
    assert r.returncode == 0, (f"{exe.name} {' '.join(map(str, args))} (order {order}): rc={r.returncode}\n"
                               f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    assert "moe_emu: warning" not in r.stderr, r.stderr[-4000:]
    return r.stdout
