"""Quantize a DeepSeekMoE checkpoint to GPTQ format (round to nearest; docs/quantization.md).

    python -m moe_engine.quantize SRC OUT --bits 8|4 [--group-size 32|64|128] [--sym] [--lm-head]
        [--max-shard-size GB] [--no-progress]

SRC: a bf16/fp16/fp32 checkpoint directory (Hugging Face layout). OUT (new or empty) gets sharded
safetensors with every quantizable linear (quant.QUANTIZABLE: attention projections, dense MLP,
routed and shared experts) as `.qweight/.qzeros/.scales/.g_idx` and everything else copied as
stored, config.json with `quantization_config`, and the tokenizer and other files of SRC.
Streaming: one source tensor is read, quantized and written at a time, so resident memory stays
near the largest tensor of the model whatever its size. The result is exactly what
`moe_engine.load(SRC, quant="int8"|"int4", group_size=..., sym=...)` holds (same function).
Default: asymmetric, group size 128. --lm-head also quantizes the lm_head, to 8 bits with the same
group size and symmetry (quant.lm_head_spec; `"lm_head": true` in config.json), the same bits as
`load(..., quant_lm_head=True)`.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .config import ConfigError, ModelConfig
from .loader import (CONFIG_FILE, INDEX_FILE, SINGLE_FILE, CheckpointError, _check_checkpoint, read_tensor,
                     _data_start, read_safetensors_header)
from .quant import LM_HEAD, QUANTIZABLE, QuantError, QuantSpec, group_index, lm_head_spec, quantize

_ST_DTYPE = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_ST_ITEMSIZE = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}


def _spec_of(name: str, spec: QuantSpec, head: QuantSpec | None) -> QuantSpec | None:
    """The format tensor `name` is written in (None: copied as stored)."""
    return head if name == LM_HEAD else spec if QUANTIZABLE.fullmatch(name) else None


def _plan(ckpt: Path, config: ModelConfig, spec: QuantSpec, head: QuantSpec | None):
    """[(out name, safetensors dtype, shape, source name)] in the source's layout order."""
    weight_map, to_load, headers = _check_checkpoint(ckpt, config)
    plan = []
    for name in to_load:
        shard = weight_map[name]
        info = headers[shard][name]
        sp = _spec_of(name, spec, head)
        if sp is not None:
            N, K = info.shape
            p, G = sp.pack, -(-K // sp.group_size)
            if K % p or N % p:
                raise QuantError(f"{shard}: {name} [N, K] = {[N, K]}: both must be multiples of {p} "
                                 f"for {sp.bits}-bit GPTQ packing")
            base = name[: -len(".weight")]
            plan += [(base + ".qweight", "I32", (K // p, N), name), (base + ".qzeros", "I32", (G, N // p), name),
                     (base + ".scales", "F16", (G, N), name), (base + ".g_idx", "I32", (K,), name)]
        else:
            plan.append((name, info.dtype, info.shape, name))
    return weight_map, plan


def _shards(plan, max_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for entry in plan:
        nbytes = math.prod(entry[2]) * _ST_ITEMSIZE[entry[1]]
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(entry)
        size += nbytes
    return shards + [cur] if cur else shards


def _write_shard(path: Path, entries, tensor: Callable[[str, str], torch.Tensor], bar) -> None:
    """One .safetensors file, its tensors produced and written one at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape, _ in entries:
        n = math.prod(shape) * _ST_ITEMSIZE[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dt, shape, src in entries:
            t = tensor(name, src).contiguous()
            if _ST_DTYPE[t.dtype] != dt or tuple(t.shape) != tuple(shape):  # a bug, not a user error
                raise AssertionError(f"{name}: produced {t.dtype} {list(t.shape)}, planned {dt} {list(shape)}")
            f.write(t.view(torch.uint8).numpy().data)
            bar.update(1)


def quantize_checkpoint(src: str | Path, out: str | Path, spec: QuantSpec, *,
                        max_shard_bytes: int = 4 * 10 ** 9, progress: bool = True,
                        lm_head: bool = False) -> Path:
    """Write the GPTQ checkpoint of `src` to `out` (module doc); lm_head: quantize the lm_head
    too (quant.lm_head_spec of `spec`). Raises ConfigError, CheckpointError, QuantError or
    OSError naming what is wrong."""
    src, out = Path(src), Path(out)
    if not (src / CONFIG_FILE).is_file():
        raise CheckpointError(f"{src}: not a checkpoint directory (no {CONFIG_FILE})")
    config = ModelConfig.from_json(src / CONFIG_FILE)
    if "quantization_config" in config.extra:
        raise QuantError(f"{src / CONFIG_FILE}: already quantized (has quantization_config); "
                         "quantize the unquantized checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory; choose a new OUT")
    if out.resolve() == src.resolve():
        raise FileExistsError(f"{out}: OUT must differ from SRC")
    head = lm_head_spec(spec) if lm_head else None
    if head is not None and config.tie_word_embeddings:
        raise QuantError(f"{src / CONFIG_FILE}: the lm_head is tied to the embedding (tie_word_embeddings); "
                         "--lm-head cannot quantize a tied lm_head")
    weight_map, plan = _plan(src, config, spec, head)
    shards = _shards(plan, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    handles: dict[Path, tuple] = {}  # shard -> (open file, data start, checked header)
    last: dict = {}  # the four GPTQ tensors of the linear being written (they may span shards)

    def read(source: str) -> torch.Tensor:
        """One source tensor, read with plain file reads as the loader reads (no memory map: a
        source truncated while it is read is a short read, a CheckpointError, never SIGBUS)."""
        shard = weight_map[source]
        try:
            if shard not in handles:
                header = read_safetensors_header(shard)
                handles[shard] = (open(shard, "rb"), _data_start(shard), header)
            f, start, header = handles[shard]
            return read_tensor(f, start, header[source], shard, source)
        except OSError as e:
            raise CheckpointError(f"{shard}: cannot read tensor {source} ({e})") from None

    def tensor(name: str, source: str) -> torch.Tensor:
        if name == source:
            return read(source)
        if last.get("source") != source:
            last.clear()
            qw = quantize(read(source), _spec_of(source, spec, head))
            last.update(source=source, qweight=qw.qweight, qzeros=qw.qzeros, scales=qw.scales,
                        g_idx=group_index(qw.Din, qw.group_size))
        return last[name.rsplit(".", 1)[1]]

    try:
        with tqdm(total=len(plan), desc=f"quantizing to {spec.bits}-bit", unit="tensor",
                  disable=not progress) as bar:
            for fname, entries in zip(files, shards):
                _write_shard(out / fname, entries, tensor, bar)
    finally:
        for f, _, _ in handles.values():
            f.close()
        handles.clear()
    if len(shards) > 1:
        total = sum(math.prod(e[2]) * _ST_ITEMSIZE[e[1]] for e in plan)
        index = {"metadata": {"total_size": total},
                 "weight_map": {e[0]: f for f, entries in zip(files, shards) for e in entries}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    cfg = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg["quantization_config"] = spec.to_config(lm_head=head)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for f in src.iterdir():  # tokenizer, generation config, remote code, model card, ...
        if f.is_file() and not (f.name.endswith(".safetensors") or f.name in (INDEX_FILE, CONFIG_FILE)):
            shutil.copy2(f, out / f.name)
    ModelConfig.from_json(out / CONFIG_FILE)  # what we wrote must read back
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_engine.quantize", description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="unquantized checkpoint directory")
    ap.add_argument("out", type=Path, help="output directory (new or empty)")
    ap.add_argument("--bits", type=int, required=True, choices=[8, 4])
    ap.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128])
    ap.add_argument("--sym", action="store_true", help="symmetric (zero point 2^(bits-1)); default asymmetric")
    ap.add_argument("--lm-head", action="store_true",
                    help="also quantize the lm_head, to 8 bits with the same group size and symmetry")
    ap.add_argument("--max-shard-size", type=float, default=4.0, metavar="GB",
                    help="largest shard in GB (default 4)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if not args.max_shard_size > 0:
            raise ValueError(f"--max-shard-size {args.max_shard_size}: expected a positive size in GB")
        spec = QuantSpec(args.bits, args.group_size, args.sym)
        out = quantize_checkpoint(args.src, args.out, spec, max_shard_bytes=int(args.max_shard_size * 1e9),
                                  progress=not args.no_progress and sys.stderr.isatty(), lm_head=args.lm_head)
    except (ConfigError, CheckpointError, QuantError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {args.bits}-bit, group size {args.group_size}, "
          f"{'sym' if args.sym else 'asym'}{', 8-bit lm_head' if args.lm_head else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
