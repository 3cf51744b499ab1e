"""lens capture: a corpus streamed to safetensors shards with corpus-wide row ids, equal to
capturing each sample alone, and resumable after an interruption with identical results."""
from __future__ import annotations

import json

import pytest
import torch
from _lens_helpers import load, routing_dir  # noqa: F401

from moe_engine import Capture, TapRequest, lens
from moe_engine.lens.__main__ import main as lens_main

TAPS = ["blocks.*.moe.hook_topk_ids", "blocks.2.hook_resid_post"]


def _domains(model):
    enc = model.tokenizer.encode
    return {"a": [enc("first text of domain a"), enc("second one"), enc("a third text here")],
            "b": [enc("domain b has two"), enc("short texts")]}


def test_capture_matches_per_sample_forward(tiny_fp32_dir, tmp_path):
    model = load(tiny_fp32_dir)
    doms = _domains(model)
    lens.capture_corpus(model, doms, TAPS, tmp_path, shard_bytes=3000, batch_tokens=24,
                        progress=False)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["shards"]) >= 2 and index["complete"]
    assert index["done"] == {"a": 3, "b": 2}
    for name in ("blocks.1.moe.hook_topk_ids", "blocks.2.hook_resid_post"):
        v, rows = lens.read_taps(tmp_path, name, rows=True)
        want_v, want_rows = [], []
        for di, samples in enumerate(doms.values()):
            for si, ids in enumerate(samples):
                cap = Capture(TapRequest(TAPS))
                model.forward(torch.tensor(ids), capture=cap)
                want_v.append(cap[name])
                pos = cap.rows(name)[:, 1]
                want_rows.append(torch.stack([torch.full_like(pos, di), torch.full_like(pos, si),
                                              torch.full_like(pos, si), pos], 1))
        torch.testing.assert_close(v, torch.cat(want_v), rtol=1e-5, atol=1e-5)
        assert torch.equal(rows, torch.cat(want_rows))


def test_capture_resumes_after_interruption(tiny_fp32_dir, tmp_path, monkeypatch):
    model = load(tiny_fp32_dir)
    doms = _domains(model)
    kw = dict(shard_bytes=1, batch_tokens=8, progress=False)      # a shard per batch
    lens.capture_corpus(model, doms, TAPS, tmp_path / "ref", **kw)
    calls = {"n": 0}
    forward = model.forward

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("interrupted")
        return forward(*a, **k)
    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        lens.capture_corpus(model, doms, TAPS, tmp_path / "run", **kw)
    part = json.loads((tmp_path / "run" / "index.json").read_text())
    assert not part["complete"] and len(part["shards"]) == 3
    calls["n"] = -100
    lens.capture_corpus(model, doms, TAPS, tmp_path / "run", **kw)
    assert calls["n"] == -100 + (len(json.loads((tmp_path / "ref" / "index.json").read_text())
                                     ["shards"]) - 3)               # only the missing batches
    for name in ("blocks.2.moe.hook_topk_ids", "blocks.2.hook_resid_post"):
        a, ra = lens.read_taps(tmp_path / "ref", name, rows=True)
        b, rb = lens.read_taps(tmp_path / "run", name, rows=True)
        assert torch.equal(a, b) and torch.equal(ra, rb)
    with pytest.raises(ValueError, match="other settings"):
        lens.capture_corpus(model, doms, TAPS[:1], tmp_path / "run", **kw)


def test_capture_cli(routing_dir, tmp_path):
    (tmp_path / "d.txt").write_text("0123456789" * 5)
    out = tmp_path / "out"
    argv = ["capture", "--model", str(routing_dir), "--out", str(out), "--backend", "torch",
            "--dtype", "float32", "--no-progress", "--taps", "blocks.*.moe.hook_topk_ids",
            "--positions", "last", str(tmp_path / "d.txt")]
    assert lens_main(argv) == 0
    ids, rows = lens.read_taps(out, "blocks.1.moe.hook_topk_ids", rows=True)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] and rows[0, :3].tolist() == [0, 0, 0]
    assert lens_main(argv) == 0                       # complete: a rerun changes nothing
    assert json.loads((out / "index.json").read_text())["complete"]
