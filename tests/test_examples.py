"""The three scripts in examples/ run on the bundled small model, and what they print holds
together (each script's main() is called in-process: no second interpreter start)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, argv: list[str], capsys) -> str:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(argv)
    return capsys.readouterr().out


def test_routing_by_domain(capsys, tmp_path):
    out = _run("routing_by_domain", ["--layer", "1", "--out", str(tmp_path)], capsys)
    lines = out.splitlines()
    assert lines[0].startswith("layer 1 (uniform share")
    assert [l.split()[0] for l in lines[1:]] == ["english", "french", "math", "code"]
    assert (tmp_path / "routing.csv").exists() and (tmp_path / "routing_layer01.png").exists()


def test_ablate_expert(capsys):
    out = _run("ablate_expert", [], capsys)
    loss = {m.group(1).strip(): float(m.group(2))
            for m in re.finditer(r"loss, (.*?):\s+([0-9.]+)", out)}
    assert set(loss) == {"full model", "expert masked (zero   )", "expert masked (reroute)",
                         "output zeroed by a hook"}
    # zeroing the expert's output by hook is the kernel's "zero" mask, computed another way
    assert loss["output zeroed by a hook"] == pytest.approx(loss["expert masked (zero   )"],
                                                            abs=2e-4)
    assert loss["expert masked (zero   )"] != loss["full model"]


def test_attribute_last_token(capsys):
    out = _run("attribute_last_token", ["--top", "3", "--text", "x = a +"], capsys)
    assert out.count("layer ") >= 4
    m = re.search(r"changes the logit by ([-+0-9.]+) \(gradient x activation said ([-+0-9.]+)\)",
                  out)
    ablation, gradient = float(m.group(1)), float(m.group(2))
    assert ablation == pytest.approx(gradient, rel=0.5, abs=1e-3)     # first order, same size
