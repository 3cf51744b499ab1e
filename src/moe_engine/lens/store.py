"""Taps streamed to disk: a Capture that moves each forward call's taps to host memory and
writes them as safetensors shards once `shard_bytes` have gathered, so a capture over a large
run needs memory for one shard, not for the run.

    with TapWriter("taps/", TapRequest(["blocks.*.moe.hook_topk_ids"])) as w:
        for batch in batches:
            model.forward(batch, capture=w)
    ids = read_taps("taps/", "blocks.3.moe.hook_topk_ids")      # or iter_taps(...) per shard

Layout: taps-00000.safetensors, taps-00001.safetensors, ... each holding, per tap name `X`,
the rows it gathered (`X`) and their (sequence, position, step) (`X::rows`, int64 [n, 3]);
index.json lists the shards and, per tap, its shape per row, dtype and total rows. Sequence
indices are those of each forward call (add your own batch offset through `step` or keep a
side table if you need corpus-wide ids). Writing a shard synchronises with the device: this is
for offline capture, not for the decode loop.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..taps import Capture, Patch, TapRequest
from .files import atomic_write, check_out_dir, write_text

INDEX = "index.json"
SHARD_BYTES = 256 << 20


class TapWriter(Capture):
    def __init__(self, out_dir: str | Path, *requests: TapRequest, shard_bytes: int = SHARD_BYTES,
                 patches: tuple[Patch, ...] = ()):
        super().__init__(*requests, patches=patches)
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes = {shard_bytes!r}; expected a positive int")
        self.out_dir = check_out_dir(out_dir, "TapWriter: out_dir")  # before any tap is gathered
        for old in self.out_dir.glob("taps-*.safetensors"):
            old.unlink()  # a stale shard would be read as part of this run
        self.shard_bytes = shard_bytes
        self._pending: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._pending_rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._pending_bytes = 0
        self._shards: list[str] = []
        self._meta_out: dict[str, dict] = {}
        self._closed = False

    def end(self) -> None:
        super().end()
        for name in list(self._values):
            for v, r in zip(self._values[name], self._meta[name]):
                v, r = v.cpu(), r.cpu()
                self._pending[name].append(v)
                self._pending_rows[name].append(r)
                self._pending_bytes += v.numel() * v.element_size() + r.numel() * 8
        self.clear()
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        tensors = {}
        for name, vs in self._pending.items():
            v = torch.cat(vs).contiguous()
            tensors[name] = v
            tensors[name + "::rows"] = torch.cat(self._pending_rows[name]).contiguous()
            m = self._meta_out.setdefault(name, {"row_shape": list(v.shape[1:]), "rows": 0,
                                                  "dtype": str(v.dtype).replace("torch.", "")})
            m["rows"] += v.shape[0]
        fname = f"taps-{len(self._shards):05d}.safetensors"
        # whole or not at all (lens/files.py): a crash never leaves half a shard
        atomic_write(self.out_dir / fname, lambda tmp: save_file(tensors, str(tmp)))
        self._shards.append(fname)
        self._pending.clear()
        self._pending_rows.clear()
        self._pending_bytes = 0
        self._write_index()

    def _write_index(self) -> None:
        index = {"shards": self._shards, "taps": self._meta_out}
        write_text(self.out_dir / INDEX, json.dumps(index, indent=1))  # the old index or the new, never half

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._write_index()
            self._closed = True

    def __enter__(self) -> "TapWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_taps(path: str | Path, name: str, rows: bool = False) -> Iterator:
    """One tensor per shard holding `name` (with its [n, 3] rows when rows=True)."""
    path = Path(path)
    index = json.loads((path / INDEX).read_text())
    if name not in index["taps"]:
        raise KeyError(f"tap {name!r} is not in {path}; it holds {sorted(index['taps'])[:8]}")
    for shard in index["shards"]:
        t = load_file(str(path / shard))
        if name in t:
            yield (t[name], t[name + "::rows"]) if rows else t[name]


def read_taps(path: str | Path, name: str, rows: bool = False):
    """All rows of one tap, concatenated (use iter_taps when they do not fit in memory)."""
    parts = list(iter_taps(path, name, rows=True))
    v = torch.cat([p[0] for p in parts])
    return (v, torch.cat([p[1] for p in parts])) if rows else v
