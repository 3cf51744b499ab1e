"""Load a Hugging Face DeepSeekMoE checkpoint into packed, contiguous torch tensors.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards named by
`model.safetensors.index.json` (shards split layers in the middle, so every tensor is found through
the weight map, never by guessing its shard). Before reading any data the loader checks every
shard header itself (length, JSON, dtypes, shapes, data offsets against the file size) and checks
the set of tensor names and shapes against `checkpoint_layout(config)`, so a truncated download or
a checkpoint of another shape fails at once with a `CheckpointError` naming the file and tensor,
not half way through a 32 GB load or inside safetensors.

Then tensors are read one at a time with plain file reads at the offsets the checked header gives
(no memory map: a file truncated while it is being read gives a short read, a CheckpointError,
where a mapped read would die of SIGBUS), cast to the requested dtype and copied into
preallocated destinations: each expert's gate/up/down lands in its slice of the packed
[E, 2F, D] / [E, D, F] tensors, so peak memory is the model plus one tensor. Every weight is
checked for NaN/Inf as it lands (one vectorised pass; `allow_nonfinite=True` skips it), so a
damaged weight is refused by name instead of turning every logit into NaN.
Files must be regular files inside the checkpoint directory (a FIFO would block the loader; an
index naming `../x` or an absolute path would load weights from elsewhere).

Quantized weights (docs/quantization.md): a GPTQ checkpoint (quantization_config in config.json)
stores each quantized linear as `.qweight/.qzeros/.scales/.g_idx`; those are read as they are into
`quant.QuantizedWeight`s (never a bf16 copy), every tensor's shape and dtype checked against the
config first. `load_weights(..., quant=QuantSpec)` quantizes an unquantized checkpoint's linears
as they are read, with the same function `python -m moe_engine.quantize` uses, so both give the
same bits. Fields that may hold a QuantizedWeight instead of a Tensor: q, k, v, o, a dense MLP's
or the shared experts' gate_up / down, experts_gate_up / experts_down, and lm_head when it is
quantized (a checkpoint with `"lm_head": true`, or `lm_head=` on load). Once the cpu backend has
packed a model, every linear (these, the routers and an untied lm_head) holds a
cpu_weights.PackedRows view of its panels instead: the panels are the only copy, and
dequantized_layer / cpu_weights.dense make tensors from them when a path asks.

Shapes: V vocab, D hidden, L layers, H heads, Hkv kv heads, hd head dim, E routed experts,
F expert width (moe_intermediate_size), S shared width (F * n_shared_experts), I dense width
(intermediate_size; a dense layer's DenseMLPWeights uses F = I).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError, ModelConfig
from .quant import (GPTQ_SUFFIXES, LM_HEAD, LM_HEAD_BITS, QUANTIZABLE, QuantError, QuantizedWeight, QuantSpec,
                    group_index, lm_head_spec, lm_head_spec_of, quant_spec_of, quantize)

Tensor = torch.Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# dtypes a checkpoint may store (cast at load time) and byte sizes of every safetensors dtype,
# needed to check data offsets even for tensors we would refuse.
LOADABLE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# what read() can return: the float weights above and the int32 GPTQ tensors (qweight, qzeros, g_idx)
READ_DTYPES = {**LOADABLE_DTYPES, "I32": torch.int32}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
# Buffers some HF exports save next to the weights; recomputed by the model, so skipped.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LOAD_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float32": torch.float32, "fp32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, corrupt, or does not match its config."""


# ---- the packed weights -----------------------------------------------------------------------

@dataclass
class DenseMLPWeights:
    """SwiGLU MLP `down(silu(gate(x)) * up(x))`: a dense layer's MLP (F = I) or the shared
    experts (F = S)."""

    gate_up: Tensor  # [2F, D]: rows [0:F] = gate_proj, rows [F:2F] = up_proj
    down: Tensor     # [D, F]


@dataclass
class MoEWeights:
    router: Tensor                   # [E, D] (mlp.gate.weight)
    experts_gate_up: Tensor          # [E, 2F, D]: per expert gate rows first, then up rows
    experts_down: Tensor             # [E, D, F]
    shared: DenseMLPWeights | None   # F = S; None when n_shared_experts == 0
    ep: object = None                # expert parallelism: this rank's distributed.ExpertShard
                                     # (the experts above are then its [lo, hi) only)


@dataclass
class LayerWeights:
    input_norm: Tensor       # [D]
    post_attn_norm: Tensor   # [D]
    q: Tensor                # [H*hd, D]
    k: Tensor                # [Hkv*hd, D]
    v: Tensor                # [Hkv*hd, D]
    o: Tensor                # [D, H*hd]
    mlp: DenseMLPWeights | MoEWeights


@dataclass
class ModelWeights:
    embed: Tensor              # [V, D]
    layers: list[LayerWeights]  # L
    final_norm: Tensor         # [D]
    lm_head: Tensor            # [V, D]; the same tensor as embed when tie_word_embeddings; a
                               # QuantizedWeight (or PackedRows) when quantized


# ---- the published tensor layout --------------------------------------------------------------

def checkpoint_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF DeepSeekMoE layout for `config`, name -> shape [out, in], in the
    order the published checkpoint stores them. `lm_head.weight` is listed even when tied (HF
    checkpoints may or may not store it then)."""
    c = config
    D, hd = c.hidden_size, c.head_dim
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, D)}
    for l in range(c.num_hidden_layers):
        p = f"model.layers.{l}."
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "post_attention_layernorm.weight"] = (D,)
        out[p + "self_attn.q_proj.weight"] = (H * hd, D)
        out[p + "self_attn.k_proj.weight"] = (Hkv * hd, D)
        out[p + "self_attn.v_proj.weight"] = (Hkv * hd, D)
        out[p + "self_attn.o_proj.weight"] = (D, H * hd)
        if c.is_moe_layer(l):
            F = c.moe_intermediate_size
            out[p + "mlp.gate.weight"] = (c.n_routed_experts, D)
            for e in range(c.n_routed_experts):
                out.update(_mlp_layout(f"{p}mlp.experts.{e}.", D, F))
            if c.shared_width:
                out.update(_mlp_layout(p + "mlp.shared_experts.", D, c.shared_width))
        else:
            out.update(_mlp_layout(p + "mlp.", D, c.intermediate_size))
    out["model.norm.weight"] = (D,)
    out["lm_head.weight"] = (c.vocab_size, D)
    return out


def _mlp_layout(prefix: str, D: int, F: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (F, D), prefix + "up_proj.weight": (F, D),
            prefix + "down_proj.weight": (D, F)}


# ---- safetensors headers, checked before safetensors sees the file ----------------------------

@dataclass(frozen=True)
class TensorInfo:
    dtype: str                 # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # relative to the end of the header, as in the file


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and check a .safetensors header: its length against the file size, its JSON, and
    every tensor's shape, dtype and data offsets against the file size. Raises CheckpointError."""
    path = Path(path)
    _regular_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            raw = f.read(n) if n is not None and 8 + n <= size and n <= _MAX_HEADER_BYTES else b""
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    if n is None:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: {size} bytes, "
                              "too short for the 8-byte header length")
    if n > _MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: header length {n} "
                              f"bytes runs beyond the file size of {size} bytes")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            ok = (isinstance(dtype, str) and all(type(s) is int and s >= 0 for s in shape)
                  and type(begin) is int and type(end) is int and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has a "
                                  f"malformed entry {entry!r}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file: tensor {name!r} data ends at "
                f"byte {8 + n + end} but the file has only {size} bytes")
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r} {dtype} {list(shape)} needs "
                f"{math.prod(shape) * _ITEMSIZE[dtype]} bytes but its data_offsets span "
                f"{end - begin}")
        infos[name] = TensorInfo(dtype, shape, (begin, end))
    return infos


def _regular_file(path: Path) -> None:
    """Refuse what is not a regular file (a FIFO blocks open(), a device reads forever)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a regular safetensors file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable (permission denied)")


def read_tensor(f, start: int, info: "TensorInfo", shard: Path, name: str) -> Tensor:
    """Tensor `name` of an open safetensors file f (data section at `start`) into fresh memory,
    with plain reads: no memory map, so a file truncated while it is read is a short read and a
    CheckpointError, never SIGBUS. The loader and `python -m moe_engine.quantize` read this way."""
    begin, end = info.data_offsets
    raw = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    view, got = memoryview(raw.numpy()), 0
    while got < len(view):  # one read() returns at most ~2 GiB
        n = f.readinto(view[got:got + (1 << 28)])
        if not n:
            raise CheckpointError(f"{shard}: tensor {name}: the file ended after {start + begin + got} bytes, "
                                  f"{end - begin - got} bytes short (truncated while it was read?)")
        got += n
    return raw.view(READ_DTYPES[info.dtype]).view(info.shape)


def _data_start(path: Path) -> int:
    """Byte offset of a .safetensors file's data section (8 + header length)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# ---- locating and validating the tensors ------------------------------------------------------

def _weight_map(ckpt: Path) -> tuple[Path, dict[str, Path]]:
    """(the file that lists the tensors, tensor name -> shard path)."""
    index = ckpt / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            ok = isinstance(weight_map, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not ok:
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        root = ckpt.resolve()
        shards = {}
        for shard in set(weight_map.values()):
            # a shard is a file of this directory: an absolute path or ../ would read weights
            # from elsewhere (a symlinked checkpoint directory is fine: resolve both sides)
            where = (ckpt / shard).resolve()
            if Path(shard).is_absolute() or root not in where.parents:
                raise CheckpointError(f"{index}: shard path {shard!r} points outside the checkpoint "
                                      f"directory {ckpt}; shards must be files inside it")
            shards[shard] = ckpt / shard
        return index, {name: shards[shard] for name, shard in weight_map.items()}
    single = ckpt / SINGLE_FILE
    if single.exists() or single.is_symlink():
        return single, {name: single for name in read_safetensors_header(single)}
    found = sorted(p.name for p in ckpt.glob("*.safetensors"))
    raise CheckpointError(f"{ckpt}: no {SINGLE_FILE} and no {INDEX_FILE}"
                          + (f" (found {', '.join(found[:3])}, but no index naming them)"
                             if found else ""))


def _few(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def _check_checkpoint(ckpt: Path, config: ModelConfig):
    """Validate names, shards, shapes and dtypes; returns (name -> shard, names to load,
    shard -> its checked header)."""
    listing, weight_map = _weight_map(ckpt)
    by_shard: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    headers: dict[Path, dict[str, TensorInfo]] = {}
    for shard, names in by_shard.items():
        if not shard.exists():
            raise CheckpointError(f"{listing}: shard {shard.name} is missing from {ckpt} "
                                  f"(it should hold tensor {names[0]} and {len(names) - 1} more)")
        headers[shard] = read_safetensors_header(shard)
        absent = [n for n in names if n not in headers[shard]]
        if absent:
            raise CheckpointError(
                f"{listing}: names shard {shard.name} for tensor {absent[0]}, but {shard} does "
                f"not hold it ({len(absent)} tensor(s) affected)")

    layout, dtypes = _expected_layout(config, weight_map)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [n for n in layout if n not in weight_map and n not in optional]
    if missing:
        raise CheckpointError(
            f"{listing}: missing tensor {missing[0]} (expected shape {list(layout[missing[0]])} "
            f"from {config.source}); {len(missing)} missing in all: {_few(missing)}")
    unexpected = [n for n in weight_map if n not in layout and not _IGNORED.fullmatch(n)]
    if unexpected:
        raise CheckpointError(
            f"{weight_map[unexpected[0]]}: unexpected tensor {unexpected[0]} not in the "
            f"DeepSeekMoE layout of {config.source}; {len(unexpected)} unexpected in all: "
            f"{_few(unexpected)}")
    for name, shape in layout.items():
        if name not in weight_map:
            continue
        shard = weight_map[name]
        info = headers[shard][name]
        if info.shape != shape:
            raise CheckpointError(f"{shard}: tensor {name} has shape {list(info.shape)}, expected "
                                  f"{list(shape)} from {config.source}")
        allowed = dtypes.get(name, LOADABLE_DTYPES)
        if info.dtype not in allowed:
            raise CheckpointError(f"{shard}: tensor {name} has unsupported dtype {info.dtype}; "
                                  f"supported: {', '.join(allowed)}")
    to_load = [n for n in layout if n in weight_map and n not in optional]
    return weight_map, to_load, headers


def checkpoint_quant_spec(config: ModelConfig) -> QuantSpec | None:
    """The checkpoint's quantization (None: unquantized); a bad quantization_config is a CheckpointError."""
    try:
        return quant_spec_of(config)
    except QuantError as e:
        raise CheckpointError(str(e)) from None


def checkpoint_lm_head_spec(config: ModelConfig) -> QuantSpec | None:
    """The format of the checkpoint's quantized lm_head (None: stored unquantized)."""
    try:
        spec = lm_head_spec_of(config)
    except QuantError as e:
        raise CheckpointError(str(e)) from None
    if spec is not None and config.tie_word_embeddings:
        raise CheckpointError(f"{config.source}: quantization_config.lm_head is true but the lm_head is "
                              "tied to the embedding (tie_word_embeddings); a quantized tied lm_head is not supported")
    return spec


def lm_head_option(path: str | Path, quant: QuantSpec | None, group_size: int = 128,
                   sym: bool = False) -> QuantSpec:
    """The format `load(..., quant_lm_head=True)` quantizes the lm_head to (quant.lm_head_spec):
    8 bits with the group size and symmetry of `quant`, else of the checkpoint's own
    quantization_config, else `group_size` / `sym`. So quantizing on load and loading a
    checkpoint quantized with `--lm-head` give the same bits."""
    base = quant
    if base is None and (Path(path) / CONFIG_FILE).is_file():
        base = checkpoint_quant_spec(ModelConfig.from_json(Path(path) / CONFIG_FILE))
    try:
        return lm_head_spec(base if base is not None else QuantSpec(LM_HEAD_BITS, group_size, sym))
    except QuantError as e:
        raise CheckpointError(str(e)) from None


def _expected_layout(config: ModelConfig, weight_map: dict) -> tuple[dict, dict]:
    """checkpoint_layout, with every quantizable linear of a GPTQ checkpoint replaced by its four
    GPTQ tensors (a linear a GPTQ tool left unquantized keeps its `.weight`); and the dtypes each
    GPTQ tensor may have (name -> allowed safetensors dtypes; the rest: LOADABLE_DTYPES)."""
    layout = checkpoint_layout(config)
    model_spec, head_spec = checkpoint_quant_spec(config), checkpoint_lm_head_spec(config)
    if model_spec is None:
        return layout, {}
    out, dtypes = {}, {}
    for name, shape in layout.items():
        base = name[: -len(".weight")]
        spec = head_spec if name == LM_HEAD else model_spec if QUANTIZABLE.fullmatch(name) else None
        if spec is None or (name in weight_map and base + ".qweight" not in weight_map):
            out[name] = shape
            continue
        N, K = shape
        p, G = spec.pack, -(-K // spec.group_size)
        if K % p or N % p:
            raise CheckpointError(f"{config.source}: {name} [N, K] = {[N, K]} cannot be stored in "
                                  f"{spec.bits}-bit GPTQ (both must be multiples of {p})")
        for suffix, shp, dt in (("qweight", (K // p, N), ("I32",)), ("qzeros", (G, N // p), ("I32",)),
                                ("scales", (G, N), ("F16", "BF16")), ("g_idx", (K,), ("I32",))):
            out[f"{base}.{suffix}"] = shp
            dtypes[f"{base}.{suffix}"] = dt
    return out, dtypes


def dequantized_layer(lw: "LayerWeights", dtype: torch.dtype, keep=None) -> "LayerWeights":
    """The layer with every linear that is not a Tensor (a QuantizedWeight, or the cpu backend's
    cpu_weights.PackedRows view of its panels) replaced by a tensor in `dtype`: dequantized, or
    unpacked exactly from bf16/fp32 panels (what the PyTorch reference and the other backends
    read, made when asked and not kept); `lw` itself when every linear is a Tensor.
    keep(w) -> True leaves w as it is (the parts cuda_weights.py runs quantized)."""
    from .cpu_weights import dense_all  # (cpu_weights imports this module)

    def kept(w) -> bool:
        return isinstance(w, Tensor) or (keep is not None and keep(w))

    m = lw.mlp
    parts = [lw.q, lw.k, lw.v, lw.o]
    if isinstance(m, MoEWeights):
        parts += [m.router, m.experts_gate_up, m.experts_down]
        if m.shared is not None:
            parts += [m.shared.gate_up, m.shared.down]
    else:
        parts += [m.gate_up, m.down]
    if all(kept(w) for w in parts):
        return lw
    made = iter(dense_all([w for w in parts if not kept(w)], dtype))
    d = iter([w if kept(w) else next(made) for w in parts])  # in the order of `parts`
    q, k, v, o = next(d), next(d), next(d), next(d)
    if isinstance(m, MoEWeights):
        router, gate_up, down = next(d), next(d), next(d)
        shared = None if m.shared is None else DenseMLPWeights(next(d), next(d))
        new_mlp = MoEWeights(router, gate_up, down, shared, m.ep)
    else:
        new_mlp = DenseMLPWeights(next(d), next(d))
    return LayerWeights(lw.input_norm, lw.post_attn_norm, q, k, v, o, new_mlp)


def _as_load_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _LOAD_DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {', '.join(_LOAD_DTYPES)}")
        return _LOAD_DTYPES[dtype]
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype} not supported; use torch.bfloat16 or torch.float32")
    return dtype


# ---- loading ----------------------------------------------------------------------------------

def _check_dir(ckpt: Path) -> None:
    """A checkpoint directory that exists, is a directory, and can be listed and read."""
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: is a file, not a checkpoint directory (pass the directory "
                              "holding config.json)")
    if not os.access(ckpt, os.R_OK | os.X_OK):
        raise CheckpointError(f"{ckpt}: checkpoint directory is not readable (permission denied)")


def load_weights(path: str | Path, config: ModelConfig, dtype: torch.dtype | str = torch.bfloat16,
                 device: str | torch.device = "cpu", progress: bool = True,
                 quant: QuantSpec | None = None, allow_nonfinite: bool = False,
                 experts=None, lm_head: QuantSpec | None = None) -> ModelWeights:
    """Read the checkpoint directory `path` for `config`, cast to `dtype` (bf16 or fp32) on
    `device`, experts packed. Every problem raises CheckpointError naming the file and tensor.
    A GPTQ checkpoint's quantized linears come back as QuantizedWeights; `quant` quantizes an
    unquantized checkpoint's linears (quant.QUANTIZABLE) as they are read; `lm_head` quantizes
    an lm_head stored unquantized (quant.lm_head_spec gives the option's format). experts: a function
    E -> (lo, hi): only routed experts lo..hi-1 of each MoE layer are read (expert parallelism,
    distributed.expert_range; the others are never read into memory)."""
    ckpt = Path(path)
    _check_dir(ckpt)
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite must be a bool, got {type(allow_nonfinite).__name__}")
    dtype, device = _as_load_dtype(dtype), torch.device(device)
    if quant is not None and not isinstance(quant, QuantSpec):
        raise TypeError(f"quant must be a quant.QuantSpec or None, got {type(quant).__name__}")
    on_disk, head_on_disk = checkpoint_quant_spec(config), checkpoint_lm_head_spec(config)
    if lm_head is not None and not isinstance(lm_head, QuantSpec):
        raise TypeError(f"lm_head must be a quant.QuantSpec or None, got {type(lm_head).__name__}")
    if lm_head is not None and head_on_disk is not None:
        raise CheckpointError(f"{ckpt}: the lm_head is already quantized ({head_on_disk.bits}-bit GPTQ); "
                              "load it without quantizing the lm_head again")
    if lm_head is not None and config.tie_word_embeddings:
        raise CheckpointError(f"{ckpt}: the lm_head is tied to the embedding (tie_word_embeddings); "
                              "a quantized tied lm_head is not supported")
    if quant is not None and on_disk is not None:
        raise CheckpointError(f"{ckpt}: already quantized ({on_disk.bits}-bit GPTQ); load it "
                              "without quant=, or quantize the unquantized checkpoint")
    weight_map, to_load, headers = _check_checkpoint(ckpt, config)
    lo, hi = 0, config.n_routed_experts
    if experts is not None:
        lo, hi = experts(config.n_routed_experts)
        if not 0 <= lo < hi <= config.n_routed_experts:
            raise ValueError(f"experts {lo}..{hi - 1}: expected a non-empty range within "
                             f"0..{config.n_routed_experts - 1}")
        to_load = [n for n in to_load if ".mlp.experts." not in n
                   or lo <= int(n.split(".mlp.experts.")[1].split(".")[0]) < hi]

    with contextlib.ExitStack() as stack:
        handles: dict[Path, tuple[object, int]] = {}
        bar = stack.enter_context(tqdm(total=len(to_load), desc=f"loading {ckpt.name}",
                                       unit="tensor", disable=not progress))

        def read(name: str) -> Tensor:
            shard = weight_map[name]
            info = headers[shard][name]
            try:
                if shard not in handles:
                    handles[shard] = (stack.enter_context(open(shard, "rb")), _data_start(shard))
                f, start = handles[shard]
                t = read_tensor(f, start, info, shard, name)
            except OSError as e:
                raise CheckpointError(f"{shard}: cannot read tensor {name} ({e})") from None
            bar.update(1)
            return t

        def finite(t: Tensor, name: str) -> Tensor:
            # aminmax: one pass, no mask tensor; NaN propagates into both, an Inf is an extreme
            if allow_nonfinite or not t.is_floating_point() or t.numel() == 0:
                return t
            if not all(map(math.isfinite, torch.aminmax(t))):
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise CheckpointError(
                    f"{weight_map[name]}: tensor {name} holds {nan} NaN and {inf} Inf value(s) "
                    f"(as {dtype}); refusing to load (allow_nonfinite=True, or --allow-nonfinite, skips this check)")
            return t

        def whole(name: str) -> Tensor:
            return finite(read(name).to(device=device, dtype=dtype).contiguous(), name)

        def into(dst: Tensor, name: str) -> None:
            finite(dst.copy_(read(name)), name)

        def empty(*shape: int) -> Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        def own(t: Tensor) -> Tensor:  # read() returns fresh tensors: nothing to copy on the cpu
            return t.to(device)

        def lin(name: str):
            """One linear: a Tensor, or a QuantizedWeight (read from GPTQ tensors or made here)."""
            base = name[: -len(".weight")]
            if base + ".qweight" in weight_map:
                disk = head_on_disk if name == LM_HEAD else on_disk
                qw = {s: read(f"{base}.{s}") for s in GPTQ_SUFFIXES}
                K = qw["qweight"].shape[0] * disk.pack
                if not torch.equal(qw["g_idx"], group_index(K, disk.group_size)):
                    raise CheckpointError(
                        f"{weight_map[base + '.g_idx']}: tensor {base}.g_idx is not k // "
                        f"{disk.group_size} (an act-order / desc_act checkpoint?); only "
                        "desc_act false is supported")
                return QuantizedWeight(own(qw["qweight"]), own(qw["scales"]), own(qw["qzeros"]),
                                       disk.bits, disk.group_size, disk.sym, disk.zero_offset)
            spec = lm_head if name == LM_HEAD else quant if QUANTIZABLE.fullmatch(name) else None
            if spec is not None:
                try:
                    qw = quantize(read(name), spec)
                except QuantError as e:
                    raise CheckpointError(f"{weight_map[name]}: tensor {name}: {e}") from None
                if device.type == "cpu":  # fresh tensors, not views of the mapped file
                    return qw
                return QuantizedWeight(qw.qweight.to(device), qw.scales.to(device), qw.qzeros.to(device),
                                       qw.bits, qw.group_size, qw.sym, qw.zero_offset)
            return whole(name)

        def quantized(ws: list, what: str) -> bool:
            kinds = {isinstance(w, QuantizedWeight) for w in ws}
            if len(kinds) > 1:
                raise CheckpointError(f"{ckpt}: {what} mixes quantized and unquantized linears; "
                                      "they are stored together, so all or none must be quantized")
            return kinds == {True}

        def dense_mlp(prefix: str, F: int) -> DenseMLPWeights:
            if quant is not None or on_disk is not None:
                g, u, d = (lin(f"{prefix}{x}_proj.weight") for x in ("gate", "up", "down"))
                if quantized([g, u, d], prefix + "*_proj"):
                    return DenseMLPWeights(QuantizedWeight.cat_rows([g, u]), d)
                return DenseMLPWeights(torch.cat([g, u]), d)
            gate_up = empty(2 * F, config.hidden_size)
            into(gate_up[:F], prefix + "gate_proj.weight")
            into(gate_up[F:], prefix + "up_proj.weight")
            return DenseMLPWeights(gate_up=gate_up, down=whole(prefix + "down_proj.weight"))

        embed = whole("model.embed_tokens.weight")
        layers = []
        for l in range(config.num_hidden_layers):
            bar.set_postfix_str(f"layer {l}", refresh=False)
            p = f"model.layers.{l}."
            if config.is_moe_layer(l):
                F, D = config.moe_intermediate_size, config.hidden_size
                router = whole(p + "mlp.gate.weight")
                if quant is not None or on_disk is not None:
                    gate_up, down = _experts(lin, p, range(lo, hi), quantized)
                else:
                    gate_up, down = empty(hi - lo, 2 * F, D), empty(hi - lo, D, F)
                    for i, e in enumerate(range(lo, hi)):
                        q = f"{p}mlp.experts.{e}."
                        into(gate_up[i, :F], q + "gate_proj.weight")
                        into(gate_up[i, F:], q + "up_proj.weight")
                        into(down[i], q + "down_proj.weight")
                shared = (dense_mlp(p + "mlp.shared_experts.", config.shared_width)
                          if config.shared_width else None)
                mlp: DenseMLPWeights | MoEWeights = MoEWeights(router, gate_up, down, shared)
            else:
                mlp = dense_mlp(p + "mlp.", config.intermediate_size)
            layers.append(LayerWeights(
                input_norm=whole(p + "input_layernorm.weight"),
                post_attn_norm=whole(p + "post_attention_layernorm.weight"),
                q=lin(p + "self_attn.q_proj.weight"), k=lin(p + "self_attn.k_proj.weight"),
                v=lin(p + "self_attn.v_proj.weight"), o=lin(p + "self_attn.o_proj.weight"),
                mlp=mlp))
        final_norm = whole("model.norm.weight")
        head = embed if config.tie_word_embeddings else lin(LM_HEAD)
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=head)


def _experts(lin, p: str, experts: range, quantized) -> tuple:
    """A layer's routed experts `experts` as [E, 2F, D] / [E, D, F]: stacked QuantizedWeights,
    or tensors (a GPTQ checkpoint whose tool left the experts unquantized)."""
    gu, dn = [], []
    for e in experts:
        q = f"{p}mlp.experts.{e}."
        g, u, d = (lin(f"{q}{x}_proj.weight") for x in ("gate", "up", "down"))
        quantized([g, u, d], f"{p}mlp.experts")
        gu.append([g, u])
        dn.append([d])
    if quantized([w for ws in gu + dn for w in ws], f"{p}mlp.experts"):
        return QuantizedWeight.stack_cat(gu), QuantizedWeight.stack_cat(dn)
    return torch.stack([torch.cat(ws) for ws in gu]), torch.stack([d for d, in dn])


def load_checkpoint(path: str | Path, dtype: torch.dtype | str = torch.bfloat16,
                    device: str | torch.device = "cpu", progress: bool = True,
                    quant: QuantSpec | None = None, allow_nonfinite: bool = False,
                    experts=None, lm_head: QuantSpec | None = None) -> tuple[ModelConfig, ModelWeights]:
    """`config.json` + weights of the HF checkpoint directory `path` (experts, lm_head: load_weights)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    ckpt = Path(path)
    _check_dir(ckpt)
    if (ckpt / CONFIG_FILE).exists() and not (ckpt / CONFIG_FILE).is_file():
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: not a regular file")
    if not (ckpt / CONFIG_FILE).is_file():
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: missing; a checkpoint directory needs "
                              "its config.json")
    config = ModelConfig.from_json(ckpt / CONFIG_FILE)
    return config, load_weights(ckpt, config, dtype=dtype, device=device, progress=progress, quant=quant,
                                allow_nonfinite=allow_nonfinite, experts=experts, lm_head=lm_head)


__all__ = ["CheckpointError", "ConfigError", "DenseMLPWeights", "MoEWeights", "LayerWeights",
           "ModelWeights", "TensorInfo", "checkpoint_layout", "dequantized_layer", "read_safetensors_header",
           "load_weights", "load_checkpoint"]
