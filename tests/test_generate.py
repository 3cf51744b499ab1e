"""Generation: greedy determinism, seeded sampling, stop strings, streaming, and the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_engine
from moe_engine.generate import SamplingParams, _stop_prefix_len, parse_expert_mask, sample


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return moe_engine.load(tiny_dir, backend="torch", progress=False)


def test_greedy_is_deterministic_and_batch_consistent(tiny):
    a = tiny.generate(["hello world", "def f"], max_new_tokens=8)
    b = tiny.generate("hello world", max_new_tokens=8)[0]
    assert a[0].token_ids == b.token_ids and len(b.token_ids) == 8
    assert a[0].reason == "length"


def test_seeded_sampling_reproducible(tiny):
    s = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123)
    x = tiny.generate("hello", max_new_tokens=10, sampling=s)[0].token_ids
    y = tiny.generate("hello", max_new_tokens=10, sampling=s)[0].token_ids
    z = tiny.generate("hello", max_new_tokens=10, sampling=SamplingParams(1.0, 0.9, 50, seed=124))[0].token_ids
    assert x == y and x != z


def test_streamed_text_equals_decoded_ids(tiny):
    events = list(tiny.iter_generate("hello", max_new_tokens=12))
    text = "".join(e.text for e in events)
    ids = [e.token_id for e in events if e.reason != "eos"]
    assert text == tiny.tokenizer.decode(ids)
    assert events[-1].finished


def test_stop_string_ends_generation_and_is_not_emitted(tiny):
    full = tiny.generate("hello", max_new_tokens=12)[0].text
    stop = full[3:6]
    assume = stop and full.find(stop) >= 0
    if not assume:
        pytest.skip("the random model produced too little text for a stop string")
    out = tiny.generate("hello", max_new_tokens=12, stop=[stop])[0]
    assert out.reason == "stop" and out.text == full[:full.find(stop)]


def test_interventions_change_generation(tiny):
    base = tiny.generate("hello", max_new_tokens=10)[0].token_ids
    k0 = tiny.generate("hello", max_new_tokens=10, topk=0)[0].token_ids
    assert base != k0
    assert k0 == tiny.generate("hello", max_new_tokens=10, topk=0)[0].token_ids


def test_sampling_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, SamplingParams(1.0, top_p=0.7, seed=0), g)) for _ in range(200)}
    assert seen == {0, 1}


def test_stop_prefix_hold_back():
    assert _stop_prefix_len("abc<en", ["<end>"]) == 3
    assert _stop_prefix_len("abc", ["<end>"]) == 0


def test_parse_expert_mask():
    assert parse_expert_mask("1:0,3;2:5", 3) == {1: [0, 3], 2: [5]}
    assert parse_expert_mask("*:7", 2) == {0: [7], 1: [7]}
    with pytest.raises(ValueError, match="LAYER"):
        parse_expert_mask("1-3", 3)


def _cli(*args):
    # Run from outside the checkout (`python -m` puts the cwd first on sys.path) and import the
    # same moe_engine this test process imported.
    pkg_parent = str(Path(moe_engine.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "moe_engine.generate", *args], capture_output=True,
                          text=True, timeout=300, cwd="/", env=env)


def test_cli_streams_tokens_and_interventions_change_output(tiny_dir):
    base = _cli("--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "16", "--backend", "torch")
    assert base.returncode == 0, base.stderr
    assert "16 tokens" in base.stderr and "tok/s" in base.stderr
    again = _cli("--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "16", "--backend", "torch")
    k1 = _cli("--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "16", "--topk", "1", "--backend", "torch")
    masked = _cli("--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "16",
                  "--expert-mask", "*:0,1,2", "--backend", "torch")
    assert base.stdout == again.stdout
    assert len({base.stdout, k1.stdout, masked.stdout}) == 3


def test_cli_errors_name_the_problem(tiny_dir, tmp_path):
    r = _cli("--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _cli("--model", str(tiny_dir), "--prompt", "hi", "--topk", "99", "--backend", "torch")
    assert r.returncode == 2 and "topk" in r.stderr and "99" in r.stderr
