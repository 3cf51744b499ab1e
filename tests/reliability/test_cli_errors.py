"""Every bad input to the lens CLI is one `error: ...` line and a non-zero exit, never a
traceback, and is refused before the analysis runs (issue 13, items 4, 6, 7). The rows run
`main()` in-process (fast); the last test runs a few through a real interpreter to see that
nothing but the one line reaches stderr. The lens corpus readers' bounds are tested at the end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_engine.lens import corpus
from moe_engine.lens.__main__ import main

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world. The cat sat on the mat.\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "squad_bad.json").write_text(json.dumps({"data": 5}))
    (tmp_path / "ints.json").write_text(json.dumps([1, 2, 3]))
    (tmp_path / "records.jsonl").write_text('{"title": "no text here"}\n')
    os.mkfifo(tmp_path / "fifo.txt")
    return tmp_path


# (id, argv with {d} for the files' directory, message pattern); every row exits 2
CASES = [
    ("max-samples-0", "routing --out {d}/o {d}/a.txt --max-samples 0", r"--max-samples 0: expected an integer >= 1"),
    ("max-tokens-neg", "routing --out {d}/o {d}/a.txt --max-tokens -1", r"--max-tokens -1: expected an integer >= 2"),
    ("max-len-0", "similarity --out {d}/o {d}/a.txt --max-len 0", r"--max-len 0: expected an integer >= 2"),
    ("top-0", "early-decode --out {d}/o {d}/a.txt --top 0", r"--top 0: expected an integer >= 1"),
    ("plot-layers-99", "routing --out {d}/o {d}/a.txt --plot-layers 99",
     r"--plot-layers 99: not an MoE layer of this model; expected some of \[1, 2, 3\]"),
    ("topk-too-big", "routing --out {d}/o {d}/a.txt --topk 99", r"--topk 99: expected 0..\d+"),
    ("ks-negative", "topk-sweep --out {d}/o {d}/a.txt --ks=-1", r"--ks -1: expected non-negative"),
    ("threads-huge", "routing --out {d}/o {d}/a.txt --threads 100000", r"threads = 100000; expected an integer in 1.."),
    ("out-is-file", "routing --out {d}/afile {d}/a.txt", r"--out .*afile is a file; expected a directory"),
    ("dev-zero", "routing --out {d}/o /dev/zero", r"corpus path /dev/zero is a device"),
    ("fifo", "routing --out {d}/o {d}/fifo.txt", r"fifo.txt is a FIFO"),
    ("missing", "routing --out {d}/o {d}/nope.txt", r"corpus path .*nope.txt does not exist"),
    ("squad-shape", "routing --out {d}/o {d}/squad_bad.json", r"not a SQuAD-format file \('data' is not a list\)"),
    ("json-ints", "routing --out {d}/o {d}/ints.json", r"ints.json: a record without text"),
    ("jsonl-no-text", "routing --out {d}/o {d}/records.jsonl", r"records.jsonl:1: a record without text"),
    ("model-is-file", "routing --out {d}/o --model {d}/afile {d}/a.txt", r"is a file, not a checkpoint directory"),
]


@pytest.mark.parametrize("argv,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lens_cli_refuses(files, capsys, argv, pattern):
    code = main(argv.format(d=files).split() + ["--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    import re
    assert re.search(pattern, err[0]), err[0]
    assert not (files / "o" / "routing.json").exists()  # refused before the analysis wrote anything


def test_not_writable_out_is_refused_before_the_analysis(files, capsys, monkeypatch):
    import moe_engine.lens.__main__ as cli
    import moe_engine.lens.files as lens_files
    ran = []
    monkeypatch.setattr(cli.analyses, "route_corpus", lambda *a, **k: ran.append(1))
    monkeypatch.setattr(lens_files.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    code = main(f"routing --out {files}/o {files}/a.txt --no-progress".split())
    assert code == 2 and not ran
    assert "is not a writable directory (Permission denied)" in capsys.readouterr().err


def test_empty_corpus_writes_valid_json(files, capsys):
    """No tokens: the perplexities are undefined; the JSON says null, never bare NaN."""
    assert main(f"topk-sweep --out {files}/o {files}/empty.txt --no-progress --ks 1,2".split()) == 0
    text = (files / "o" / "topk_sweep.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert "null" in text
    assert not list((files / "o").glob(".*.tmp"))  # the atomic write left no temp file


def test_cli_errors_in_a_real_process(files):
    env = dict(os.environ, PYTHONPATH=str(SRC))
    for argv in (["routing", "--out", f"{files}/o", "/dev/zero"], ["early-decode", "--out", f"{files}/o", "--top", "0",
                                                                   f"{files}/a.txt"]):
        r = subprocess.run([sys.executable, "-m", "moe_engine.lens", *argv], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


# ---- the corpus readers stay bounded --------------------------------------------------------------

class _Tok:
    """Counts what it is asked to encode: one id per character."""
    bos_id, add_bos_token = 1, True

    def __init__(self):
        self.longest = 0

    def encode(self, text, add_bos=False):
        self.longest = max(self.longest, len(text))
        return [7] * len(text)


@pytest.mark.parametrize("split", corpus.SPLITS)
def test_one_huge_line_streams_in_blocks(tmp_path, monkeypatch, split):
    monkeypatch.setattr(corpus, "READ_BLOCK", 1000)
    f = tmp_path / "line.txt"
    f.write_text("word " * 3000)  # 15000 characters, no newline
    tok = _Tok()
    d = corpus.domain_from_path(f)
    samples = list(corpus.iter_samples(d, tok, 512, split=split, max_tokens=4000))
    assert sum(map(len, samples)) == 4000           # stops at max_tokens
    assert tok.longest <= 1000                      # never more than a block at a time
    whole = list(corpus.iter_samples(d, _Tok(), 512, split=split))
    assert sum(len(s) - 1 for s in whole) == 15000  # and every character arrives, once


@pytest.mark.parametrize("kw,pattern", [({"max_samples": 0}, r"max_samples = 0"), ({"max_tokens": -1}, r"max_tokens = -1"),
                                        ({"max_tokens": 1.5}, r"max_tokens = 1.5")])
def test_iter_samples_refuses_bounds(tmp_path, kw, pattern):
    f = tmp_path / "a.txt"
    f.write_text("abc")
    with pytest.raises(ValueError, match=pattern):
        list(corpus.iter_samples(corpus.domain_from_path(f), _Tok(), 16, **kw))
