"""tools/gpu_check.sh (the one command for a lent GPU): on a machine without a GPU its dry run
stops at the first GPU step with a clear message, after recording what ran in its results file.
Cannot show: that the later steps work on a GPU, or their time (the script's header estimates it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_check.sh"


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU driver is present: the dry run would run")
def test_dry_run_stops_at_the_first_gpu_step(tmp_path):
    results = tmp_path / "results.txt"
    r = subprocess.run([str(SCRIPT), "--no-build", str(results)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "error: no GPU here" in out, out
    text = results.read_text()
    assert "== gpu: FAILED" in text and "== stopped" in text, text
    assert "== tests" not in text and "== kernels" not in text, text  # nothing after the first GPU step ran
