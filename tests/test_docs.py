"""Docs that run: every ```bash and ```python block of README.md, docs/*.md and bench/README.md is
executed, so a snippet cannot rot. Every fenced block must say its language (```text for
diagrams), so a new snippet cannot slip past this test unlabelled.

What is changed before running (and nothing else):
- model paths (`/path/to/deepseek-moe-16b-*`, `--model DIR`) become the bundled small model;
- a snippet needing a GPU (`--device cuda`, `--backend cuda`, `tools/gpu_check.sh`, `device="cuda"` outside comments) is skipped without one;
- speed, only where a command would take more than a few seconds: the bench scripts get small
  token counts (throughput.py: `--prompt-len 16 --gen-len 4 --reps 1`, `--moe-tokens 1,8`;
  kernels.py: `--tokens 1`; contention.py: `--seconds 1 --burners 0,1`; distributed.py: 1 and 2 processes, one short rep) and the shapes that
  need gigabytes (`16b-layer`, `--shape 16b`) become bench-small, and the synthetic checkpoint
  that throughput.py and contention.py build for each command becomes the `tiny` preset (the
  doc's command line, flags and output are what is checked; bench-small's 420 MB checkpoint,
  written anew by each command, made these blocks the slowest tests of CI);
- `torchrun` runs as `python -m torch.distributed.run` of this interpreter (its console script
  may belong to another environment);
- the README's "Set up and run" commands are skipped here: `.ci/run` runs them verbatim (the
  second one is this very test suite), and so is the llama.cpp recipe (network and a 15-minute
  build; bench/README.md says how to run it).
Shell blocks run in a temporary directory holding `bench/` and `tools/` (links to this checkout)
and small corpora under the names the docs use (en.txt, fr_qa.json, gsm8k.jsonl, code/,
corpus/en, corpus/fr, data/...); the Python blocks of one file run in order in one namespace,
as a reader would type them.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_engine
from moe_engine import default_model_dir

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
BUNDLED = str(default_model_dir())
HAVE_GPU = torch.cuda.is_available()
GPU_WORDS = ("--device cuda", "--backend cuda", "tools/gpu_check.sh")  # a command that needs a GPU
SKIP_BLOCKS = {  # the start of a block's first command -> why the block is not run here
    "pip install torch==2.13.0": "the README's set-up commands are run verbatim by .ci/run",
    "pip download --no-deps --no-binary :all: -d /tmp/llp llama-cpp-python":
        "the llama.cpp recipe needs the network and a 15-minute build",
    "cmake --build /tmp/llb": "the llama.cpp side-by-side needs the build of the recipe above",
}
MODEL_PATHS = [(re.compile(r"/?path/to/deepseek-moe-16b-[\w.-]+"), BUNDLED),
               (re.compile(r"--model DIR\b"), f"--model {BUNDLED}")]
FAST = [  # (applies to commands matching, pattern, replacement); see the module docstring
    ("bench/throughput.py", re.compile(r"--moe-tokens \S+"), "--moe-tokens 1,8"),
    ("bench/throughput.py", re.compile(r"16b-layer"), "bench-small"),
    ("bench/throughput.py", re.compile(r"$"), " --prompt-len 16 --gen-len 4 --reps 1"),
    ("bench/kernels.py", re.compile(r" --tokens \S+"), ""),
    ("bench/kernels.py", re.compile(r"--shape 16b\b"), "--shape bench-small"),
    ("bench/kernels.py", re.compile(r"$"), " --tokens 1"),
    ("bench/throughput.py", re.compile(r"--preset bench-small\b"), "--preset tiny"),
    ("bench/throughput.py", re.compile(r"^(?!.*--(preset|model) )(.*)$"), r"\2 --preset tiny"),
    ("bench/contention.py", re.compile(r"$"), " --seconds 1 --burners 0,1 --preset tiny"),
    ("bench/distributed.py", re.compile(r"$"), " --procs 1,2 --batch 1 --prompt-len 8 --gen-len 2 --reps 1"),
    ("bench/soak.py", re.compile(r" --max-seconds \S+"), ""),
    ("bench/soak.py", re.compile(r"$"), " --tokens 100 --chunk 25 --calls 40 --windows 4 --max-seconds 20"),
]


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, text, line) of every fenced block."""
    out, lang, buf, start = [], None, [], 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, buf, start = line[3:].strip(), [], n
            else:
                out.append((lang, "\n".join(buf) + "\n", start))
                lang = None
        elif lang is not None:
            buf.append(line)
    return out


def commands(block: str) -> list[str]:
    """One shell command per line (a trailing backslash continues it); comments dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            cmd = re.sub(r"\s+#.*$", "", cur).strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
            cur = ""
    return out


def prepare(cmd: str) -> str:
    for pat, rep in MODEL_PATHS:
        cmd = pat.sub(rep, cmd)
    for script, pat, rep in FAST:
        if script in cmd:
            cmd = pat.sub(rep, cmd, count=1)
    cmd = re.sub(r"(^|&& |; )torchrun ", lambda m: m.group(1) + "python -m torch.distributed.run ", cmd)
    return re.sub(r"(^|&& |; )python3? ", lambda m: m.group(1) + sys.executable + " ", cmd)


def _ids(items):
    return [f"{p.relative_to(ROOT)}:{line}" for p, _, line in items]


SHELL = [(p, text, line) for p in DOCS for lang, text, line in fenced_blocks(p) if lang in ("bash", "sh")]
PYTHON = [p for p in DOCS if any(lang == "python" for lang, _, _ in fenced_blocks(p))]


def test_every_block_says_its_language():
    for p in DOCS:
        for lang, _, line in fenced_blocks(p):
            assert lang in ("bash", "sh", "python", "text", "json"), \
                f"{p.relative_to(ROOT)}:{line}: fenced block without a known language ({lang!r})"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with the corpora the docs name, and bench/ and tools/ of this checkout."""
    d = tmp_path_factory.mktemp("docs")
    for name in ("bench", "tools"):
        (d / name).symlink_to(ROOT / name)
    en = "The cat sat on the mat. It was a sunny day and the children played outside.\n" * 3
    fr = "Le chat est sur le tapis. Il fait beau et les enfants jouent dehors.\n" * 3
    code = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    squad = {"data": [{"paragraphs": [{"context": fr, "qas": [
        {"question": "Où est le chat ?", "answers": [{"text": "sur le tapis"}]}]}]}]}
    gsm = [{"question": "Tom has 3 apples and buys 2 more. How many?", "answer": "3 + 2 = 5. #### 5"}] * 2
    for sub in ("", "data"):
        (d / sub).mkdir(exist_ok=True)
        (d / sub / "en.txt").write_text(en)
        (d / sub / "fr_qa.json").write_text(json.dumps(squad))
        (d / sub / "gsm8k.jsonl").write_text("\n".join(json.dumps(r) for r in gsm) + "\n")
    for sub, text in (("code", code), ("corpus/en", en), ("corpus/fr", fr)):
        (d / sub).mkdir(parents=True)
        (d / sub / "sample.txt").write_text(text)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("path,block,line", SHELL, ids=_ids(SHELL))
def test_shell_block_runs(path, block, line, workdir):
    pkg_parent = str(Path(moe_engine.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))}
    cmds = commands(block)
    why = next((w for start, w in SKIP_BLOCKS.items() if cmds and cmds[0].startswith(start)), None)
    if why is not None:
        pytest.skip(why)
    ran = 0
    for cmd in cmds:
        if not HAVE_GPU and any(w in cmd for w in GPU_WORDS):
            continue  # needs a GPU
        r = subprocess.run(["bash", "-c", prepare(cmd)], cwd=workdir, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{path.relative_to(ROOT)}:{line}: {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        ran += 1
    if ran == 0:
        pytest.skip("every command of this block needs a GPU")


def _needs_gpu(code: str) -> bool:
    return any('device="cuda"' in line.split("#")[0] for line in code.splitlines())


@pytest.mark.parametrize("path", PYTHON, ids=[str(p.relative_to(ROOT)) for p in PYTHON])
def test_python_blocks_run(path, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    ns: dict = {"__name__": "__doc_snippet__"}
    for lang, code, line in fenced_blocks(path):
        if lang != "python":
            continue
        if _needs_gpu(code) and not HAVE_GPU:
            pytest.skip(f"{path.relative_to(ROOT)}:{line} needs a GPU")
        for pat, rep in MODEL_PATHS:
            code = pat.sub(rep, code)
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), ns)
