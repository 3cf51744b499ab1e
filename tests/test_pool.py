"""The cpu kernels' thread pool (csrc/cpu/pool.h), through its test hook `_C.pool_check`.

Every chunk must run exactly once whatever the team, whatever thread is slow, and the pool must
survive what a process does to it: a chunk that throws, a kernel called from inside a chunk
(nested), two Python threads at once, a fork. Bits of the kernels across team sizes are pinned
by tests/test_ops.py and the decode-step tests; this file checks the pool's own bookkeeping.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moe_engine import _C

TEAMS = [1, 2, 3, 8]  # 8: more than this machine's cores, workers then share them


@pytest.fixture(params=TEAMS)
def team(request):
    before = _C.kernel_threads(request.param)
    yield request.param
    _C.kernel_threads(before)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 1000])
def test_every_chunk_runs_once(team, n):
    runs, threads = _C.pool_check(n)
    assert runs == [1] * n
    assert threads <= max(1, team)


def test_team_comes_from_kernel_threads(team):
    _C.pool_check(16)
    if team > 1 and os.environ.get("MOE_ENGINE_POOL") != "0":
        assert _C.pool_threads() >= team  # the pool grew to the team (the caller + team - 1 workers)
    runs, threads = _C.pool_check(64, slow_chunk=0, slow_ms=20)
    assert runs == [1] * 64
    assert threads <= team  # never more threads than the team, even with spare workers


def test_a_slow_chunk_does_not_lose_or_repeat_chunks(team):
    for slow in (0, 5, 31):
        runs, _ = _C.pool_check(32, slow_chunk=slow, slow_ms=30)
        assert runs == [1] * 32


def test_an_exception_in_a_chunk_reaches_the_caller(team):
    with pytest.raises(RuntimeError, match="chunk 5 threw"):
        _C.pool_check(40, throw_chunk=5)
    # the pool is usable afterwards and runs every chunk again
    assert _C.pool_check(40)[0] == [1] * 40


def test_an_exception_beside_a_slow_chunk(team):
    with pytest.raises(RuntimeError, match="chunk 1 threw"):
        _C.pool_check(16, slow_chunk=0, slow_ms=30, throw_chunk=1)
    assert _C.pool_check(16)[0] == [1] * 16


def test_nested_calls_run_serially_inside_the_chunk(team):
    runs, _ = _C.pool_check(24, nested=True)
    assert runs == [3] * 24  # every inner chunk of every outer chunk, once


def test_two_python_threads_at_once():
    """pool_check releases the GIL: the second caller finds the pool busy and runs its chunks on
    its own thread; every call still runs every chunk once."""
    before = _C.kernel_threads(2)
    errors: list[BaseException] = []

    def call():
        try:
            for i in range(30):
                runs, _ = _C.pool_check(50, slow_chunk=i % 5, slow_ms=1)
                assert runs == [1] * 50
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        _C.kernel_threads(before)
    assert not any(t.is_alive() for t in threads), "a pool call hung"
    assert not errors, errors[0]


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="fork")
@pytest.mark.skipif(os.environ.get("MOE_ENGINE_POOL") == "0",
                    reason="MOE_ENGINE_POOL=0 runs OpenMP regions, and libgomp hangs in a fork's child "
                           "once its threads exist in the parent")
def test_fork_child_gets_a_working_pool():
    """The parent's workers do not exist in a fork's child: its first job must not wait for them."""
    before = _C.kernel_threads(2)
    try:
        assert _C.pool_check(32)[0] == [1] * 32  # the parent's pool has started its workers
        pid = os.fork()
        if pid == 0:  # child: exit status says whether the jobs ran; never return into pytest
            ok = False
            try:
                signal.alarm(60)  # a child that hangs is killed, and its status says so
                ok = all(_C.pool_check(64)[0] == [1] * 64 for _ in range(5))
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _C.pool_check(32)[0] == [1] * 32  # and the parent's pool still works
    finally:
        _C.kernel_threads(before)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n=-1"):
        _C.pool_check(-1)


ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.slow  # compiles a program under ThreadSanitizer (tens of seconds on a busy machine)
@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_pool_stress_program_under_tsan(tmp_path):
    """tests/cpp/pool_stress.cpp against csrc/cpu/pool.cpp alone, under ThreadSanitizer:
    thousands of back-to-back jobs of varying size and team (late workers must never run a chunk
    twice or touch the next job), exceptions, two callers at once, nested jobs; TSan reports any
    access of a chunk's output or of the pool's bookkeeping not ordered by the protocol. What it
    cannot show: races inside the kernels' chunks (their outputs are disjoint by construction;
    tests/test_ops.py checks their bits across team sizes), and schedules it did not meet."""
    exe = tmp_path / "pool_stress"
    sanitize = "thread"
    flags = [f"-fsanitize={sanitize}", "-g"]
    build = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", *flags, f"-I{ROOT / 'csrc'}",
                            str(ROOT / "csrc/cpu/pool.cpp"), str(ROOT / "tests/cpp/pool_stress.cpp"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip(f"the compiler cannot build with -fsanitize={sanitize}: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "MOE_ENGINE_POOL"}  # the pool, not its fallback
    env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    assert "pool_stress: ok" in run.stdout
