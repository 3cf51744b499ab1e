"""Every repository path that the docs, comments and docstrings name exists, nothing cites
design notes that live outside the repository, and no source file carries a machine's
throughput figures, which belong in bench/README.md (docs/design.md §14).

Scanned: README.md, docs/*.md, bench/README.md, CMakeLists.txt, pyproject.toml, .ci/run, and
every source file under src/, csrc/, tests/, tools/, bench/ (whole text: a path in a code line
must exist just as one in a comment). A reference is a word starting with a top-level folder
(`src/`, `csrc/`, `tests/`, `tools/`, `docs/`, `bench/`, `.ci/`), or `moe_engine/...` (read as
src/moe_engine/...), or a file under one of the package's or csrc's sub-folders (`cpu/x.cpp`,
`ops/route.py`, read relative to csrc/, src/moe_engine/ or the citing file's folder). Brace
forms `a/{b,c}.cu` expand; `*` and `{name}` placeholders must match at least one file. A bare
file name (`oracle.py`) must be the name of some file in the repository. This file is not
scanned: its examples are made up on purpose.
"""
import glob
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TOP_DOCS = ["README.md", "CMakeLists.txt", "pyproject.toml", ".ci/run", "bench/README.md"]
SOURCE_DIRS = ["src", "csrc", "tests", "tools", "bench", "docs"]
SOURCE_SUFFIXES = {".py", ".h", ".cpp", ".cu", ".cuh", ".sh", ".md", ".txt", ".toml"}
SKIP_PARTS = {"__pycache__", "build", ".pytest_cache"}
SELF = Path(__file__).resolve().relative_to(ROOT)  # not scanned: its examples are made up

# Folders at the repository root, and the sub-folders a reference may start with.
TOP = ("src", "csrc", "tests", "tools", "docs", "bench", ".ci")
SUB = ("moe_engine", "cpu", "cuda", "emu", "ops", "lens", "assets")
FILE_EXT = re.compile(r"\.(py|cpp|h|cu|cuh|sh|md|txt|json|toml|safetensors|png)$")

# A bare file name (`test_nvcc_build.py`) must name some file of the repository; `.h` is left out
# because C++ member expressions (`out.h`) look the same.
_BARE = re.compile(r"(?<![\w./<>{}-])([A-Za-z][\w-]*\.(?:py|cpp|cu|cuh|md|sh))\b")
EXTERNAL_NAMES = {"llama.cpp", "modeling_deepseek.py"}  # files of other projects
_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w.{},*/-]*)" % "|".join(re.escape(p) for p in TOP + SUB))
# Citations of notes kept outside the repository.
FORBIDDEN = [re.compile(r"(?<![\w.-])" + "notes" + r"[/]"),
             re.compile(r"(?<![\w.-])" + "shared" + r"[/]"),
             re.compile("DESIGN" + r"[.]md")]


def scanned_files(root: Path = ROOT) -> list[Path]:
    files = [root / f for f in TOP_DOCS if (root / f).is_file()]
    for d in SOURCE_DIRS:
        for p in sorted((root / d).rglob("*")):
            rel = p.relative_to(root)
            if (p.is_file() and p.suffix in SOURCE_SUFFIXES and not SKIP_PARTS & set(rel.parts)
                    and p not in files and rel != SELF):
                files.append(p)
    return files


def expand_braces(s: str) -> list[str]:
    """`a/{b,c}.cu` -> [a/b.cu, a/c.cu]; a brace without a comma (`{name}`) is a placeholder."""
    m = re.search(r"\{([^{}]*)\}", s)
    if not m:
        return [s]
    options = m.group(1).split(",") if "," in m.group(1) else ["*"]
    return [x for o in options for x in expand_braces(s[:m.start()] + o + s[m.end():])]


def candidates(word: str) -> list[str]:
    """Trim the punctuation a sentence puts after a path."""
    if "{" not in word:
        word = word.split(",")[0]
    word = word.rstrip(".,:;")
    if word.count("{") != word.count("}"):
        return []
    return expand_braces(word)


def exists(path: str, citing: Path, root: Path) -> bool:
    top = path.split("/")[0]
    if top in TOP:
        bases = [root]
    elif top == "moe_engine":
        bases = [root / "src"]
    else:
        # cpu/, cuda/, ops/, ...: only a file name counts (prose says "cpu/cuda backends")
        bases = [root / "csrc", root / "src" / "moe_engine", citing.parent]
    for base in bases:
        target = str(base / path)
        if glob.has_magic(target) and glob.glob(target):
            return True
        if not glob.has_magic(target) and Path(target).exists():
            return True
    return False


def repo_file_names(root: Path) -> set[str]:
    names = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_PARTS and not x.startswith((".git", ".venv", "build"))]
        names.update(files)
    return names


def scan(files, root: Path = ROOT):
    """-> (number of path references checked, [problem lines "file:line: ..."])."""
    n, problems = 0, []
    names = repo_file_names(root)
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        rel = f.relative_to(root)
        for lineno, line in enumerate(text.splitlines(), 1):
            for pat in FORBIDDEN:
                for m in pat.finditer(line):
                    problems.append(f"{rel}:{lineno}: cites '{m.group(0)}', which is not in the "
                                    f"repository (write what it says into docs/ and cite that)")
            for m in _PATH.finditer(line):
                for path in candidates(m.group(1)):
                    if path.split("/")[0] in SUB[1:] and not FILE_EXT.search(path):
                        continue
                    if path.rstrip("/") in TOP + SUB or "**" in path:  # a folder; an exclude pattern
                        continue
                    n += 1
                    if not exists(path, f, root):
                        problems.append(f"{rel}:{lineno}: '{path}' does not exist")
            for m in _BARE.finditer(line):
                if m.group(1) not in EXTERNAL_NAMES and not any(f.search(m.group(1)) for f in FORBIDDEN):
                    n += 1
                    if m.group(1) not in names:
                        problems.append(f"{rel}:{lineno}: no file is named '{m.group(1)}'")
    return n, problems


# A throughput figure (digits then a rate unit) or "this box": measurements of one machine.
MACHINE_NUMBERS = re.compile(r"\d+(?:\.\d+)? ?(?:GB/s|TB/s|GFLOP/s|TFLOP/s|tok/s|tokens/s)\b"
                             r"|\bthis (?:2-core )?box\b")


def machine_numbers(files, root: Path = ROOT) -> list[str]:
    return [f"{f.relative_to(root)}:{i}: {m.group(0)!r}"
            for f in files if f.suffix != ".md"
            for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            for m in MACHINE_NUMBERS.finditer(line)]


def test_every_named_path_exists():
    files = scanned_files()
    # Guard against a scan that silently reads nothing.
    assert len(files) > 60, [str(f) for f in files]
    n, problems = scan(files)
    assert n > 150, f"only {n} path references found: the scanner is broken"
    assert not problems, "\n".join(["references to files that are not in the repository:"] + problems)


def test_no_machine_numbers_in_sources():
    found = machine_numbers(scanned_files())
    assert not found, "\n".join(["move these measurements to bench/README.md (keep the reason):"] + found)


def test_machine_numbers_are_flagged(tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("// On this 2-core box it runs at 85-105 GFLOP/s, 3.35 TB/s.\n"
                   "// prints {rate:.1f} tok/s; GB/s of the bytes moved\n")
    assert machine_numbers([src], tmp_path) == [
        "k.cpp:1: 'this 2-core box'", "k.cpp:1: '105 GFLOP/s'", "k.cpp:1: '3.35 TB/s'"]


def test_scanner_flags_a_made_up_path(tmp_path):
    (tmp_path / "src" / "moe_engine").mkdir(parents=True)
    (tmp_path / "src" / "moe_engine" / "real.py").write_text("")
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "a.cu").write_text("")
    doc = tmp_path / "doc.md"
    forbidden = "DESIGN" + ".md"
    doc.write_text("See src/moe_engine/real.py and moe_engine/real.py.\n"
                   "Also tests/test_" + "nothing_here.py, and csrc/cuda/{a,b}.cu.\n"
                   "Kernels: cuda/a.cu, cpu/gone.cpp; the cpu/cuda backends; real.py, gone.py.\n"
                   f"As {forbidden} decision 3 says.\n")
    n, problems = scan([doc], tmp_path)
    assert n == 9
    assert problems == [
        "doc.md:2: 'tests/test_nothing_here.py' does not exist",
        "doc.md:2: 'csrc/cuda/b.cu' does not exist",
        "doc.md:3: 'cpu/gone.cpp' does not exist",
        "doc.md:3: no file is named 'gone.py'",
        f"doc.md:4: cites '{forbidden}', which is not in the repository (write what it says into "
        "docs/ and cite that)",
    ]


@pytest.mark.parametrize("word, expected", [
    ("csrc/cuda/{align,expert_gemm}.cu,", ["csrc/cuda/align.cu", "csrc/cuda/expert_gemm.cu"]),
    ("tests/test_x.py,", ["tests/test_x.py"]),
    ("docs/{name}.md.", ["docs/*.md"]),
    ("src/{a,b}/{c,d}.py", ["src/a/c.py", "src/a/d.py", "src/b/c.py", "src/b/d.py"]),
])
def test_candidates(word, expected):
    assert candidates(word) == expected
