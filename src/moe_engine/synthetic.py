"""Random-weight DeepSeekMoE checkpoints of any shape, in the exact published Hugging Face layout.

`make_checkpoint(out_dir, "tiny")` writes a directory that `loader.load_checkpoint` and
`tokenizer.Tokenizer.from_dir` read like a real one: config.json (complete, as published),
model.safetensors or N shards + model.safetensors.index.json (at least one layer split across two
shards, as in the real 16B checkpoint), tokenizer.json, tokenizer_config.json (with the DeepSeek
chat template) and generation_config.json.

- Weights: tensor names and shapes come from `loader.checkpoint_layout` (one place for the layout).
  Each tensor is drawn from its own generator seeded by (seed, name), so a seed gives the
  same weights whatever the sharding. Linear weights ~ N(0, 1/fan_in); norms 1 + N(0, 0.02²);
  the router N(0, (2/√D)²) so softmax logits have std ~2 and routing is far from uniform
  (top-1 probability ~0.2 of 64 experts, like the real model's peaky routers).
  Tensors are generated and written one at a time by our own safetensors writer (the
  `16b-layer` preset is GBs; safetensors.save_file needs every tensor in memory at once).
- Tokenizer: a byte-level BPE trained OFFLINE on a deterministic corpus (docstrings of a fixed
  list of stdlib modules plus a built-in multilingual paragraph; it varies only with the Python
  version), to at most vocab_size - 2 - vocab_size//64 tokens; then BOS and EOS are appended as
  special tokens, so, as in DeepSeek, the BPE ids come first, the special ids after them, and
  len(tokenizer) < vocab_size (the last logit rows belong to no token). The config's
  bos/eos/pad ids are set to the tokenizer's. Trained once per vocab size per process.

Shapes: V vocab, D hidden, E routed experts, F expert width, S shared width, I dense width.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import ModelConfig
from .loader import INDEX_FILE, SINGLE_FILE, checkpoint_layout

BOS_TOKEN = "<｜begin▁of▁sentence｜>"  # U+FF5C bars, U+2581 low line, as in DeepSeek
EOS_TOKEN = "<｜end▁of▁sentence｜>"

# The chat template of deepseek-moe-16b-chat's tokenizer_config.json, verbatim.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}"
    "{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

# config.json of deepseek-ai/deepseek-moe-16b-base; presets override fields of it.
PUBLISHED_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                 "AutoModel": "modeling_deepseek.DeepseekModel",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}

PRESETS: dict[str, dict[str, Any]] = {
    # fast tests: every code path (dense layer 0, MoE with shared experts) at toy size
    "tiny": dict(hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                 moe_intermediate_size=32, num_experts_per_tok=2, n_shared_experts=2,
                 vocab_size=512, max_position_embeddings=512),
    # benchmarks that fit a laptop: the 16B's routing shape (64 experts, top-6) at 1/4 width
    "bench-small": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=2048,
                        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64,
                        moe_intermediate_size=256, num_experts_per_tok=6, n_shared_experts=2,
                        vocab_size=16384),
    # exact DeepSeekMoE-16B shapes with few layers (layer 0 dense, the rest MoE)
    "16b-layer": dict(num_hidden_layers=2),
    # the published DeepSeekMoE-16B at full depth (28 layers, 32.75 GB in bf16), 7 shards like the
    # published checkpoint (PRESET_SHARDS); written one tensor at a time, so memory stays ~1 GB
    "16b": dict(),
}
# shard count a preset is written with when make_checkpoint is not told one
PRESET_SHARDS: dict[str, int] = {"16b": 7}

_SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float32": "F32"}
_ITEMSIZE = {"bfloat16": 2, "float32": 4}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_NORM_NOISE = 0.02
_ROUTER_GAIN = 2.0
_WRITE_CHUNK = 1 << 22  # elements converted and written at a time


def make_checkpoint(out_dir: str | Path, preset_or_config_dict: str | dict[str, Any], *,
                    layers: int | None = None, seed: int = 0, shards: int | None = None,
                    dtype: str = "bfloat16", overrides: dict[str, Any] | None = None) -> Path:
    """Write a random checkpoint to `out_dir` (created if needed) and return its path.

    `preset_or_config_dict`: a PRESETS name, or HF config fields (missing ones are taken from the
    published 16B config). `layers` sets num_hidden_layers; `overrides` is applied last.
    The bos/eos/pad ids always come from the generated tokenizer. shards: default 1, or the
    preset's PRESET_SHARDS entry."""
    if dtype not in _SAFETENSORS_DTYPE:
        raise ValueError(f"dtype {dtype!r} not supported; "
                         f"use one of {', '.join(_SAFETENSORS_DTYPE)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed = {seed!r} must be a non-negative integer")
    if isinstance(preset_or_config_dict, str):
        if preset_or_config_dict not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_config_dict!r}; "
                             f"choose one of {', '.join(PRESETS)}")
        fields = PRESETS[preset_or_config_dict]
        if shards is None:
            shards = PRESET_SHARDS.get(preset_or_config_dict, 1)
    else:
        fields = preset_or_config_dict
    shards = 1 if shards is None else shards
    d = {**PUBLISHED_CONFIG, **fields, **(overrides or {}), "torch_dtype": dtype}
    if layers is not None:
        d["num_hidden_layers"] = layers

    tok = Tokenizer.from_str(_tokenizer_json(d["vocab_size"]))
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    d.update(bos_token_id=bos, eos_token_id=eos)
    if "pad_token_id" in d:
        d["pad_token_id"] = eos
    config = ModelConfig.from_dict(d, source="make_checkpoint config")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", d)
    _write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos,
        "transformers_version": d.get("transformers_version", "4.36.0")})
    tok.save(str(out / "tokenizer.json"))
    added = dict(__type="AddedToken", lstrip=False, normalized=True, rstrip=False,
                 single_word=False)
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {**added, "content": BOS_TOKEN}, "eos_token": {**added, "content": EOS_TOKEN},
        "pad_token": {**added, "content": EOS_TOKEN}, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": config.max_position_embeddings, "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast", "unk_token": None})
    _write_weights(out, config, seed=seed, shards=shards, dtype=dtype)
    return out


# ---- weights ----------------------------------------------------------------------------------

def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 init of one tensor (numpy, single-threaded: torch's thread pool stalls on the
    thousands of small expert tensors when the machine's cores are busy)."""
    # torch's CPU generator keeps only 32 seed bits; numpy's SeedSequence takes the whole name.
    rng = np.random.default_rng([seed, int.from_bytes(name.encode(), "little")])
    t = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:  # RMSNorm weight
        t *= _NORM_NOISE
        t += 1.0
    elif name != "model.embed_tokens.weight":  # the embedding feeds an RMSNorm: any scale works
        gain = _ROUTER_GAIN if name.endswith("mlp.gate.weight") else 1.0
        t *= np.float32(gain / math.sqrt(shape[1]))
    return t


def _shard_bounds(names: list[str], nbytes: list[int], shards: int) -> list[int]:
    """Start index of each shard after the first: balanced by bytes, and the first boundary moved
    inside a layer if none falls inside one (real checkpoints split layers; loaders must cope)."""
    n = len(names)
    if not 1 <= shards <= n:
        raise ValueError(f"shards = {shards} must be between 1 and the tensor count {n}")
    cum, total = [], 0
    for b in nbytes:
        total += b
        cum.append(total)
    bounds: list[int] = []
    for j in range(1, shards):
        i = next(i for i, c in enumerate(cum) if c >= total * j / shards) + 1
        lo = bounds[-1] + 1 if bounds else 1
        bounds.append(min(max(i, lo), n - (shards - j)))
    layer = [int(m.group(1)) if (m := _LAYER.match(x)) else None for x in names]

    def splits_layer(b: int) -> bool:
        return layer[b] is not None and layer[b] == layer[b - 1]

    if bounds and not any(splits_layer(b) for b in bounds):
        lo, hi = 1, (bounds[1] if len(bounds) > 1 else n)
        inside = [b for b in range(lo, hi) if splits_layer(b)]
        if inside:
            bounds[0] = min(inside, key=lambda b: abs(b - bounds[0]))
    return bounds


def _write_weights(out: Path, config: ModelConfig, *, seed: int, shards: int, dtype: str) -> None:
    layout = checkpoint_layout(config)
    if config.tie_word_embeddings:
        del layout["lm_head.weight"]  # HF does not save the tied copy
    names = list(layout)
    nbytes = [math.prod(layout[x]) * _ITEMSIZE[dtype] for x in names]
    bounds = [0, *_shard_bounds(names, nbytes, shards), len(names)]
    files = ([SINGLE_FILE] if shards == 1 else
             [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)])
    for old in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        old.unlink(missing_ok=True)  # a stale shard or index would shadow the new files
    weight_map = {}
    for fname, lo, hi in zip(files, bounds, bounds[1:]):
        group = names[lo:hi]
        write_safetensors(out / fname, [(x, layout[x]) for x in group], dtype,
                          lambda x, shape: _init_tensor(x, shape, seed))
        weight_map.update({x: fname for x in group})
    if shards > 1:
        _write_json(out / INDEX_FILE, {"metadata": {"total_size": sum(nbytes)},
                                       "weight_map": dict(sorted(weight_map.items()))})


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str,
                      make: Callable[[str, tuple[int, ...]], np.ndarray]) -> None:
    """Write a .safetensors file holding `entries` (name, shape) in order, calling
    `make(name, shape) -> float32 array` for one tensor at a time so only one is in memory."""
    itemsize = _ITEMSIZE[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            flat = np.ascontiguousarray(make(name, shape), dtype=np.float32).reshape(-1)
            for lo in range(0, flat.size, _WRITE_CHUNK):  # bounds the conversion temporaries
                t = flat[lo:lo + _WRITE_CHUNK]
                out = _bf16_bits(t).astype("<u2", copy=False) if dtype == "bfloat16" else \
                    t.astype("<f4", copy=False)  # safetensors is little-endian; no copy on x86/ARM
                f.write(out.data)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch's .to(bfloat16) for
    finite values; the init never makes NaN)."""
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            ).astype(np.uint16)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- tokenizer --------------------------------------------------------------------------------

_CORPUS_MODULES = (
    "builtins", "os", "sys", "re", "json", "collections", "itertools", "functools", "pathlib",
    "typing", "dataclasses", "argparse", "logging", "subprocess", "threading", "asyncio",
    "unittest", "decimal", "fractions", "statistics", "random", "string", "textwrap", "datetime",
    "calendar", "csv", "zipfile", "tarfile", "shutil", "tempfile", "pickle", "copy", "heapq",
    "bisect", "enum", "abc", "contextlib", "inspect", "ast", "difflib", "pprint", "socket",
    "hashlib", "base64", "struct", "codecs", "unicodedata", "math", "operator", "io", "glob",
    "types", "weakref", "traceback", "warnings", "doctest", "timeit", "configparser", "html",
    "uuid", "ipaddress", "queue", "sched", "zlib", "gzip", "email", "http", "urllib.parse")

# Non-ASCII text so the BPE learns some multi-byte merges (and leaves rarer characters split
# into byte tokens, which is what streaming decoders must handle).
_MULTILINGUAL = (
    "Grüße aus München: naïve Café-Besucher äßen Crème brûlée. "
    "Le cœur a ses raisons que la raison ne connaît point. "
    "¿Dónde está la biblioteca? Añadir información, por favor. "
    "Съешь же ещё этих мягких французских булок, да выпей чаю. "
    "你好，世界！深度求索的混合专家模型。今天天气很好，我们去公园散步吧。"
    "こんにちは、世界。東京は日本の首都です。 "
    "안녕하세요, 세계! Γειά σου Κόσμε. שלום עולם. مرحبا بالعالم. "
    "Emoji: 🙂 🚀 ✨ — “quotes” ‘single’ … € £ ¥ ° ± × ÷ → ∑ ∞ ≈ ≠.\n")


def _corpus() -> list[str]:
    parts = [_MULTILINGUAL] * 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated attributes (typing.io, ...) warn on access
        for mod_name in _CORPUS_MODULES:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
            parts.append(mod.__doc__ or "")
            for attr in sorted(dir(mod)):
                doc = getattr(getattr(mod, attr, None), "__doc__", None)
                if isinstance(doc, str):
                    parts.append(doc)
    return parts


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    """tokenizer.json text for a config vocab of `vocab_size` (cached: tests ask often)."""
    n_special = 2
    reserve = vocab_size // 64  # logits rows that belong to no token, as in DeepSeek
    if vocab_size - n_special - reserve < 256:
        reserve = 0
    if vocab_size - n_special < 256:
        raise ValueError(f"vocab_size = {vocab_size} is too small for a byte-level BPE "
                         f"(needs >= {256 + n_special}: 256 bytes + BOS + EOS)")
    tok = Tokenizer(models.BPE())
    # DeepSeek splits digits one per token; byte-level, no prefix space.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special - reserve,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(BOS_TOKEN, special=True, normalized=False),
                            AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok.to_str()
