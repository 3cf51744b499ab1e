"""Memory preflight: estimate what a load will hold resident before allocating any of it, and
refuse with the numbers and the way out when it will not fit, instead of the kernel's OOM killer
ending the process half way through a 30 GB read.

Estimate = the weights in the format they will be held in (quantized linears as their GPTQ
tensors, the rest in the load dtype), counted once on the cpu backend: its panels replace the
tensors they are packed from (cpu_weights.py), layer by layer + on the cpu backend, what
packing adds (the largest layer, whose tensors and panels are both held while it is packed,
and an lm_head tied to the embedding, packed beside it), or the cuda / emu backends'
repacked copy of a bf16 model's quantized linears (cuda_weights.py: kept beside the GPTQ
tensors, so counted twice) + the KV cache for `context` tokens of one sequence + a fixed
allowance for the runtime (torch, buffers).
Available = MemAvailable of /proc/meminfo, lowered to the cgroup's limit minus its usage when
the process runs in a memory-limited cgroup (containers).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import ModelConfig
from .loader import CONFIG_FILE, checkpoint_layout, checkpoint_lm_head_spec, checkpoint_quant_spec
from .quant import QUANTIZABLE, QuantSpec, layout_nbytes

RUNTIME_BYTES = 300 * 2 ** 20  # torch, the extension, per-call buffers: measured order, not exact
_ITEMSIZE = {torch.bfloat16: 2, torch.float32: 4}


class MemoryPreflightError(RuntimeError):
    """The load would not fit in the memory available."""


def estimate_bytes(config: ModelConfig, *, dtype: torch.dtype = torch.bfloat16, backend: str = "cpu",
                   quant: QuantSpec | None = None, context: int | None = None,
                   experts=None, lm_head: QuantSpec | None = None) -> dict[str, int]:
    """{"weights", "packed", "kv_cache", "runtime", "total"} in bytes for a load of `config`
    (quantized as `quant`, the lm_head as `lm_head`, or as its own quantization_config says);
    "packed": what the cpu backend's packing adds to the weights (module docstring). experts: a function
    E -> (lo, hi), the routed experts one rank holds under expert parallelism
    (distributed.expert_range); the others are not counted."""
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype {dtype} not supported; expected torch.bfloat16 or torch.float32")
    el = _ITEMSIZE[dtype]
    spec = quant if quant is not None else checkpoint_quant_spec(config)
    head = lm_head if lm_head is not None else checkpoint_lm_head_spec(config)
    layout = checkpoint_layout(config)
    if experts is not None:
        lo, hi = experts(config.n_routed_experts)
        layout = {n: s for n, s in layout.items() if ".mlp.experts." not in n
                  or lo <= int(n.split(".mlp.experts.")[1].split(".")[0]) < hi}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    weights = layout_nbytes(layout, el, spec, skip=tied, lm_head=head)
    packed = 0
    if backend == "cpu":  # the panels (about the size of what they are packed from) replace the
        # tensors, so they add nothing to `weights` but the layer being packed and a tied lm_head
        per_layer: dict[str, int] = {}
        for name, shape in layout.items():
            if name.startswith("model.layers."):
                l = name.split(".")[2]
                per_layer[l] = per_layer.get(l, 0) + layout_nbytes({name: shape}, el, spec)
        packed = max(per_layer.values(), default=0)
        if config.tie_word_embeddings:
            packed += math.prod(layout["lm_head.weight"]) * el
    elif backend in ("cuda", "emu") and spec is not None and dtype == torch.bfloat16:
        # cuda_weights.py: the quantized linears repacked for the CUDA kernels beside their GPTQ
        # tensors (about their size; the qrow layout pads K to 32 and groups to 4 words a row)
        packed = layout_nbytes({n: s for n, s in layout.items() if QUANTIZABLE.fullmatch(n)}, el, spec)
    ctx = config.max_position_embeddings if context is None else context
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
        raise ValueError(f"context = {context!r}; expected a positive number of tokens")
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * ctx * el
    total = weights + packed + kv + RUNTIME_BYTES
    return {"weights": weights, "packed": packed, "kv_cache": kv, "runtime": RUNTIME_BYTES, "total": total}


def available_bytes() -> int:
    """Memory this process can still take: MemAvailable, capped by a cgroup v2/v1 limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            usage = int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:
            room = int(limit) - usage
            avail = room if avail is None else min(avail, room)
    return avail if avail is not None else 2 ** 62  # unknown platform: do not refuse


def preflight(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, backend: str = "cpu",
              quant: QuantSpec | None = None, context: int | None = None,
              available: int | None = None, experts=None, lm_head: QuantSpec | None = None) -> dict[str, int]:
    """Raise MemoryPreflightError when the load of checkpoint `path` would not fit; else return
    the estimate ({} when `path` has no config.json). Only host memory is checked (a cuda load's weights go to the GPU)."""
    if not (Path(path) / CONFIG_FILE).is_file():
        return {}  # not a checkpoint: the loader says so, naming what is missing
    config = ModelConfig.from_json(Path(path) / CONFIG_FILE)
    est = estimate_bytes(config, dtype=dtype, backend=backend, quant=quant, context=context,
                         experts=experts, lm_head=lm_head)
    if backend == "cuda":
        return est
    avail = available_bytes() if available is None else available
    if est["total"] <= avail:
        return est
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    ctx = config.max_position_embeddings if context is None else context
    msg = (f"{path}: loading needs {gb(est['total'])} ({gb(est['weights'])} weights"
           + (f" + {gb(est['packed'])} packing" if est["packed"] else "")
           + f" + {gb(est['kv_cache'])} KV cache for {ctx} tokens + {gb(est['runtime'])} runtime), "
           f"{gb(avail)} available")
    ways = []
    if checkpoint_quant_spec(config) is None:
        for name, bits in (("int8", 8), ("int4", 4)):
            if quant is None or quant.bits > bits:
                q = estimate_bytes(config, dtype=dtype, backend=backend, context=context, experts=experts,
                                   quant=QuantSpec(bits, 128 if quant is None else quant.group_size),
                                   lm_head=lm_head)
                ways.append(f"--quant {name} needs {gb(q['total'])}")
    if context is None or context > 512:
        short = estimate_bytes(config, dtype=dtype, backend=backend, quant=quant, context=512,
                               experts=experts, lm_head=lm_head)
        ways.append(f"a 512-token context needs {gb(short['total'])}")
    raise MemoryPreflightError(msg + ("; " + ", ".join(ways) if ways else "")
                               + " (check_memory=False skips this check)")


__all__ = ["MemoryPreflightError", "available_bytes", "estimate_bytes", "preflight"]
