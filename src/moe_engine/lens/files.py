"""Lens output files: every file is written whole or not at all, and an output directory is
checked before a run starts (issue 13: an analysis of an hour must not end in 'cannot write', and
a crash or a full disk must never leave half a file where a reader looks).

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))   # any writer that takes a path
    write_text(path, text)
    check_out_dir(out, "--out")                                     # before the run
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) into a fresh temporary file beside `path`, then rename it over `path` (atomic
    on one file system: readers see the old file or the new one). The temporary file is removed
    if `write` fails; `path` is then untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_out_dir(out: str | Path, what: str) -> Path:
    """`out` as a writable directory (made if missing), else a ValueError naming `what` (the flag
    or argument) and the reason: called before a run, so nothing is computed for nowhere."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} is a file; expected a directory for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{what} {out} is not a writable directory ({e.strerror or e})") from None
    return out
