"""Faults do not lose or corrupt work, and inputs that used to crash now work or are refused
(issue 13, items 4 and 6; the leftovers after the first reliability pass).

- `python -m moe_engine.quantize` reads its source with plain file reads: a source truncated
  while it is read is a CheckpointError (through safetensors' memory map it was SIGBUS).
- every lens output (JSON, CSV, plots, TapWriter and capture shards and index) is written to a
  temporary file and renamed: a writer that fails leaves no partial file and the old one intact;
  output directories are checked before anything runs.
- generate() with a tokenizer that has no EOS stops on max_new_tokens and stop strings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

import moe_engine
from moe_engine import quantize
from moe_engine.lens import TapWriter, files
from moe_engine.lens import plots
from moe_engine.lens.capture import capture_corpus
from moe_engine.lens.export import write_csv
from moe_engine.loader import CheckpointError
from moe_engine.quant import QuantSpec
from moe_engine.taps import TapRequest


# -- quantize: a source truncated while it is read -----------------------------------------------

def test_quantize_of_a_source_truncated_while_reading_is_a_checkpoint_error(tiny_ckpt, copy_ckpt,
                                                                            tmp_path, monkeypatch):
    """The source shrinks after its headers were checked and the first tensor was read (another
    process rewriting it): the next read comes up short and says so, naming the file."""
    src = copy_ckpt(tiny_ckpt)
    real, calls = quantize.quantize, []

    def quantize_then_truncate(w, spec):
        if not calls:
            f = src / "model.safetensors"
            os.truncate(f, f.stat().st_size // 3)
        calls.append(1)
        return real(w, spec)

    monkeypatch.setattr(quantize, "quantize", quantize_then_truncate)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .*the file ended after \d+ bytes"):
        quantize.quantize_checkpoint(src, tmp_path / "q", QuantSpec(8), progress=False)
    assert calls, "the source was never truncated: the test did not run what it names"


def test_quantize_cli_truncated_source_is_one_error_line(tiny_ckpt, copy_ckpt, tmp_path, capsys):
    src = copy_ckpt(tiny_ckpt)
    f = src / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    assert quantize.main([str(src), str(tmp_path / "q"), "--bits", "8", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model.safetensors" in err[0], err


def test_quantize_still_matches_quantize_on_load(tiny_ckpt, tmp_path):
    """Reading without the memory map changes nothing in what is written."""
    out = quantize.quantize_checkpoint(tiny_ckpt, tmp_path / "q", QuantSpec(8), progress=False)
    a = moe_engine.load(out, backend="torch")
    b = moe_engine.load(tiny_ckpt, backend="torch", quant="int8", sym=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(a.forward(ids), b.forward(ids))


# -- lens: atomic outputs, directories checked first ---------------------------------------------

class _Boom(RuntimeError):
    pass


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")

    def half(tmp: Path):
        tmp.write_text("half a fi")
        raise _Boom

    with pytest.raises(_Boom):
        files.atomic_write(path, half)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []
    files.write_text(path, "new")
    assert path.read_text() == "new" and _leftovers(tmp_path) == []


def test_plot_that_fails_leaves_no_partial_png(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    fig = plt.figure()

    def savefig(fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise _Boom

    monkeypatch.setattr(fig, "savefig", savefig)
    with pytest.raises(_Boom):
        plots._save(fig, path)
    assert not path.exists() and _leftovers(tmp_path) == []
    fig = plt.figure()
    assert plots._save(fig, path).read_bytes().startswith(b"\x89PNG")  # the format follows the suffix


def test_csv_that_fails_midway_leaves_no_partial_file(tmp_path):
    def rows():
        yield [1, 2]
        raise _Boom

    with pytest.raises(_Boom):
        write_csv(tmp_path / "t", {"columns": ["a", "b"], "rows": rows()})
    assert list(tmp_path.iterdir()) == []
    assert write_csv(tmp_path / "t", {"columns": ["a", "b"], "rows": [[1, 2]]})[0].read_text() == "a,b\n1,2\n"


def test_tap_writer_shard_that_fails_leaves_no_shard(tmp_path, monkeypatch):
    import moe_engine.lens.store as store
    model = moe_engine.load(backend="cpu")
    w = TapWriter(tmp_path, TapRequest(["logits"]))
    model.forward(torch.tensor([[5, 6]]), capture=w)

    def save_half(tensors, fname):
        Path(fname).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "save_file", save_half)
    with pytest.raises(OSError):
        w.flush()
    assert not list(tmp_path.glob("taps-*")) and _leftovers(tmp_path) == []
    monkeypatch.undo()
    w.close()
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["shards"] == ["taps-00000.safetensors"] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("make", ["file", "under-a-file"])
def test_tap_writer_and_capture_check_the_directory_first(tmp_path, make):
    f = tmp_path / "f"
    f.write_text("x")
    out = f if make == "file" else f / "sub"
    want = r"is a file" if make == "file" else r"is not a writable directory"
    with pytest.raises(ValueError, match=r"TapWriter: out_dir .*" + want):
        TapWriter(out, TapRequest(["logits"]))
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n")
    # model=None: the check must come before the model is touched
    with pytest.raises(ValueError, match=r"capture_corpus: out_dir .*" + want):
        capture_corpus(None, {"c": str(corpus)}, ["logits"], out)


# -- generate without an EOS token ---------------------------------------------------------------

@pytest.fixture(scope="module")
def no_eos_model(tiny_ckpt, tmp_path_factory):
    import shutil
    d = Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("noeos") / "ckpt"))
    for name, keys in (("tokenizer_config.json", ["eos_token", "pad_token"]),
                       ("config.json", ["eos_token_id", "pad_token_id"]),
                       ("generation_config.json", ["eos_token_id", "pad_token_id"])):
        cfg = json.loads((d / name).read_text())
        for k in keys:
            if name == "tokenizer_config.json":
                cfg.pop(k, None)
            else:
                cfg[k] = None  # absent, config.json would mean the default id
        (d / name).write_text(json.dumps(cfg))
    m = moe_engine.load(d, backend="cpu")
    assert m.tokenizer.eos_id is None
    return m


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}], ids=["greedy", "sampled"])
def test_generate_without_eos_stops_on_length(no_eos_model, sampling):
    outs = no_eos_model.generate(["The", "a b c"], max_new_tokens=7, **sampling)
    assert [len(o.token_ids) for o in outs] == [7, 7] and {o.reason for o in outs} == {"length"}


def test_generate_without_eos_stops_on_a_stop_string(no_eos_model):
    """One sequence of the batch stops early on a stop string while the other runs on: the
    finished row keeps stepping (the batch moves together) and, with no EOS to feed it, is fed
    its last token (this step raised before)."""
    from moe_engine import SamplingParams
    free = no_eos_model.generate("The", max_new_tokens=6)[0]
    stop = free.text[:1]
    assert stop, "the model generated no text to stop on"
    outs = no_eos_model.generate(["The", "a b c"], [SamplingParams(max_new_tokens=6, stop=[stop]),
                                                   SamplingParams(max_new_tokens=6)])
    assert outs[0].reason == "stop" and outs[0].text == ""
    assert outs[1].reason == "length" and len(outs[1].token_ids) == 6 > len(outs[0].token_ids)
