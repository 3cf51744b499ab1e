"""torch.distributed on this machine (Gloo): 2 and 3 processes spawned by the test with torchrun's
variables (a free port each time), compared with the same computation in this process.

* expert parallelism: logits, taps, usage counters, a patch and greedy decoding equal one
  process (tests/tolerances.py, "expert_parallel": fp32 tight, bf16 looser; the expert rows are
  computed in other groupings, so not bit for bit), under every intervention;
* corpus parallelism: every corpus analysis and the prune perplexity equal one process exactly
  (counts and float sums: the same bits, the JSON compared with ==);
* a rank that dies makes the others exit with a clear error within the timeout, never hang.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _cases
import moe_engine
from moe_engine.synthetic import make_checkpoint
from tolerances import assert_close

WORKER = Path(__file__).with_name("_worker.py")
HERE = Path(__file__).parent
TIMEOUT_S = 20      # MOE_ENGINE_DIST_TIMEOUT of the spawned processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(W: int, task: str, out: Path, *args: str, limit: float = 120) -> list[subprocess.CompletedProcess]:
    """Run _worker.py TASK in W processes; returns each one's result (killed past `limit`)."""
    port = _free_port()
    procs = []
    for r in range(W):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(W),
               "LOCAL_WORLD_SIZE": str(W), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "MOE_ENGINE_DIST_TIMEOUT": str(TIMEOUT_S),
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), task, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    deadline = time.monotonic() + limit
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{task}: a process ran past {limit} s (a hang)") from None
        results.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return results


def _ok(results):
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} exited {res.returncode}: {res.stderr[-2000:]}"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    return {"float32": make_checkpoint(d / "fp32", "tiny", seed=3, dtype="float32"),
            "bfloat16": make_checkpoint(d / "bf16", "tiny", seed=3)}


@pytest.mark.parametrize("W,dtype,quant", [pytest.param(2, "float32", "", marks=pytest.mark.slow),
                                           (3, "float32", ""), (2, "bfloat16", ""),
                                           pytest.param(3, "bfloat16", "int8", marks=pytest.mark.slow)])
def test_expert_parallel_equals_one_process(ckpts, tmp_path, W, dtype, quant):
    """8 experts over 2 ranks (4 + 4) or 3 ranks (2 + 3 + 3, uneven); int8: the quantized
    expert kernels on the received rows."""
    torch.set_num_threads(1)
    out = tmp_path / "ep.pt"
    _ok(spawn(W, "ep", out, str(ckpts[dtype]), dtype, quant))
    got = torch.load(out)
    want = _cases.forward_cases(moe_engine.load(ckpts[dtype], dtype=dtype, progress=False,
                                                quant=quant or None))
    assert sorted(got) == sorted(want)
    dt = getattr(torch, dtype)
    for name in want:
        if want[name].dtype.is_floating_point:
            assert_close(got[name], want[name], "expert_parallel", dt, case=name)
        else:   # ids, usage counts, decoded tokens
            assert torch.equal(got[name], want[name]), name


def test_expert_parallel_loads_only_its_experts(ckpts):
    """The loader's filter: rank r of W reads experts [r*E//W, (r+1)*E//W) only."""
    from moe_engine import distributed
    from moe_engine.loader import load_checkpoint
    for W in (2, 3):
        for r in range(W):
            lo, hi = distributed.expert_range(8, r, W)
            _, w = load_checkpoint(ckpts["float32"], dtype="float32", progress=False,
                                   experts=lambda E: distributed.expert_range(E, r, W))
            _, full = load_checkpoint(ckpts["float32"], dtype="float32", progress=False)
            for lw, fw in zip(w.layers, full.layers):
                if hasattr(lw.mlp, "experts_down"):
                    assert lw.mlp.experts_down.shape[0] == hi - lo
                    assert torch.equal(lw.mlp.experts_down, fw.mlp.experts_down[lo:hi])
    with pytest.raises(ValueError, match="cannot be split over 9 ranks"):
        distributed.expert_range(8, 0, 9)


def test_expert_parallel_needs_torchrun(ckpts, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        moe_engine.load(ckpts["float32"], expert_parallel=True, progress=False)


@pytest.mark.parametrize("W", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_corpus_parallel_equals_one_process(tmp_path, W):
    torch.set_num_threads(1)
    out = tmp_path / "corpus.pt"
    _ok(spawn(W, "corpus", out))
    got = torch.load(out)
    want = _cases.corpus_results(moe_engine.load(progress=False, dtype="float32"))
    for name in want:
        assert got[name] == want[name], name


def test_dead_rank_fails_the_others_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    res = spawn(2, "die", tmp_path / "none", limit=TIMEOUT_S + 60)
    assert res[1].returncode == 3
    assert res[0].returncode == 2, res[0].stderr
    assert "error: rank 0: all_reduce failed, so another rank died" in res[0].stderr
    assert time.monotonic() - t0 < TIMEOUT_S + 60
