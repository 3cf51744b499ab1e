"""Corpus-scale tap capture: stream a corpus of any size through the model and write the
requested taps to safetensors shards, with corpus-wide row ids, resumably.

    python -m moe_engine.lens capture --taps "blocks.*.moe.hook_topk_ids" --out taps/ en.txt code/
    lens.capture_corpus(model, {"en": "en.txt"}, ["blocks.3.hook_resid_post"], "taps/")
    ids, rows = lens.read_taps("taps/", "blocks.3.moe.hook_topk_ids", rows=True)

Each shard `shard-NNNNN.safetensors` holds, per tap X, its rows `X` and `X::rows` int64 [n, 4]:
(domain index, document, sample, position) -- the domain's index in the order given, the
document and sample (chunk) numbers within the domain counted from the corpus start, and the
token's position in its sample. `index.json` lists the shards and, per tap, its row shape,
dtype and total rows (the layout lens.read_taps / iter_taps read). Memory holds at most one
shard (`shard_bytes`) of taps on the host.

Resuming: a shard is written (to a temporary name, then renamed) only at a batch boundary, and
`index.json` then records how many samples of each domain the shards hold. Run the same command
again after an interruption and it skips those samples (they are read and tokenised, not run
through the model) and appends new shards; a run with other taps, positions, model or corpus
is refused rather than mixed in (delete the directory to start over).
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import distributed
from ..model import Model
from ..taps import Capture, TapRequest
from . import corpus
from .analyses import BATCH_TOKENS, _bar, _batches, get_preset
from .files import atomic_write, check_out_dir, write_text
from .store import INDEX

SHARD_BYTES = 256 << 20


@torch.no_grad()
def capture_corpus(model: Model, domains, taps: Sequence[str], out_dir: str | Path, *,
                   positions: str = "all", layers="all", shard_bytes: int = SHARD_BYTES,
                   preset="notes", max_len: int | None = None,
                   batch_tokens: int = BATCH_TOKENS, split: str | None = None,
                   max_samples: int | None = None, max_tokens: int | None = None,
                   progress: bool = True, **intervention_kwargs) -> Path:
    """Capture `taps` (fnmatch patterns) over every sample of every domain into `out_dir`;
    returns the path of index.json. See the module docstring for the layout and resuming."""
    if not taps:
        raise ValueError("give at least one tap pattern")
    if distributed.world() > 1:  # it writes shards as batches come: one writer, every batch
        raise ValueError("capture_corpus runs in one process, not under torchrun")
    if positions not in ("all", "last"):
        raise ValueError(f"positions = {positions!r}; expected 'all' or 'last'")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes = {shard_bytes}; expected a positive size")
    doms = corpus.as_domains(domains)
    out = check_out_dir(out_dir, "capture_corpus: out_dir")  # before the corpus runs
    p = get_preset(preset)
    config = {"taps": list(taps), "positions": positions, "layers": layers
              if isinstance(layers, str) else list(layers), "model": str(model.path),
              "domains": [d.name for d in doms], "preset": p.name, "max_len": max_len,
              "split": split, "interventions": sorted(intervention_kwargs)}
    index_path = out / INDEX
    index = {"config": config, "shards": [], "taps": {}, "done": {d.name: 0 for d in doms},
             "complete": False}
    if index_path.exists():
        old = json.loads(index_path.read_text())
        if old.get("config") != config:
            raise ValueError(f"{out} holds a capture with other settings ({old.get('config')}); "
                             f"use another --out or delete it")
        index = old
        if index.get("complete"):
            return index_path
    for stale in out.glob("shard-*.safetensors"):
        if stale.name not in index["shards"]:
            stale.unlink()                       # written after the last index update
    pending: dict[str, list[torch.Tensor]] = defaultdict(list)
    pending_rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    size = 0
    done = dict(index["done"])                   # samples per domain held in pending + shards

    def flush():
        nonlocal size
        if not pending:
            index["done"] = dict(done)
            write_text(index_path, json.dumps(index, indent=1))
            return
        tensors = {}
        for name, vs in pending.items():
            v = torch.cat(vs).contiguous()
            tensors[name] = v
            tensors[name + "::rows"] = torch.cat(pending_rows[name]).contiguous()
            m = index["taps"].setdefault(name, {"row_shape": list(v.shape[1:]), "rows": 0,
                                                "dtype": str(v.dtype).replace("torch.", "")})
            m["rows"] += v.shape[0]
        fname = f"shard-{len(index['shards']):05d}.safetensors"
        atomic_write(out / fname, lambda tmp: save_file(tensors, str(tmp)))
        index["shards"].append(fname)
        index["done"] = dict(done)
        write_text(index_path, json.dumps(index, indent=1))
        pending.clear()
        pending_rows.clear()
        size = 0

    corpus_kw = dict(max_len=max_len, batch_tokens=batch_tokens, split=split,
                     max_samples=max_samples, max_tokens=max_tokens)
    for di, dom in enumerate(doms):
        skip = index["done"][dom.name]
        seen = 0                                 # samples of this domain read so far
        with _bar(dom, "capture", progress) as bar:
            for b in _batches(model, dom, bar, preset=p, bos="every", **corpus_kw):
                n = len(b.lengths)
                first, seen = seen, seen + n
                if seen <= skip:
                    continue
                if first < skip:                 # a batch straddling the resume point
                    raise ValueError(f"cannot resume {out}: batches differ from the first run "
                                     f"(use the same --batch-tokens and --max-len)")
                cap = Capture(TapRequest(list(taps), layers, positions))
                model.forward(b.input_ids, attention_mask=b.attention_mask, capture=cap,
                              logits="last", **intervention_kwargs)
                sample = torch.arange(first, seen)
                for name in cap.keys():
                    v = cap[name].cpu()
                    r = cap.rows(name).cpu()              # (sequence in batch, position, step)
                    seq = r[:, 0]
                    ids = torch.stack([torch.full_like(seq, di), b.doc[seq], sample[seq],
                                       r[:, 1]], 1)
                    pending[name].append(v)
                    pending_rows[name].append(ids)
                    size += v.numel() * v.element_size() + ids.numel() * 8
                done[dom.name] = seen
                if size >= shard_bytes:
                    flush()
        done[dom.name] = max(done[dom.name], seen)
    flush()
    index["complete"] = True
    write_text(index_path, json.dumps(index, indent=1))
    return index_path
