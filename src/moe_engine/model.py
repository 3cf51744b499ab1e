"""The DeepSeekMoE runtime: embedding -> decoder layers (attention + dense or MoE FFN) -> final
norm -> lm_head, with a preallocated KV cache and batched prefill / decode of prompts of
different lengths. Semantics: docs/model.md (Hugging Face remote code).

Shape legend: B sequences, T new tokens per sequence in this call, N valid (non-pad) tokens of
the call, S cache length, D hidden, H heads, Hkv key/value heads, hd head dim, E routed experts,
K top-k, F expert width, V vocab, L layers.

The MoE layer runs on the selected backend's kernels (src/moe_engine/moe.py); attention, norms and
the dense GEMMs are PyTorch on every backend. Batches are left-padded: every sequence ends at the
same cache column, so a decode step appends one column for all of them. Pad tokens never reach
the MoE layer (it sees only the N valid tokens), so they neither count in the expert usage nor
appear in taps.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as Fn

from .config import ModelConfig
from .interventions import Interventions, Routing, for_call
from .loader import ModelWeights, MoEWeights, dequantized_layer, load_checkpoint
from .cpu_weights import SMALL_N, CpuModelWeights, ffn, linear, runs_packed
from .cpu_weights import rms_norm as cpu_rms_norm
from .moe import moe_layer
from .ops import backend as backends
from .ops.attention import attention_block_decode_cpu
from .ops.norm import rms_norm_ref as rms_norm
from .taps import Capture, TokenIndex, all_tap_names

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


# More threads than this many per processor only add fork/join cost; torch's own OpenMP
# regions crash when asked for far more than can be created (torch.set_num_threads(100000)
# segfaulted in the first parallel op).
THREADS_PER_CPU = 4


def set_threads(n) -> int:
    """torch.set_num_threads(n) after checking n: an int in 1 ..= THREADS_PER_CPU x the CPUs
    (the CLIs' --threads). Returns n. The C++ kernels also cap their parallel regions there."""
    limit = THREADS_PER_CPU * (os.cpu_count() or 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(f"threads = {n!r}; expected an integer in 1..{limit} "
                         f"({THREADS_PER_CPU} x the {os.cpu_count()} CPUs of this machine)")
    torch.set_num_threads(n)
    return n


def default_model_dir() -> Path:
    """The small DeepSeekMoE model shipped inside the package."""
    return Path(__file__).parent / "assets" / "small"


def check_device(device) -> torch.device:
    """`device` as a torch.device this machine can use, else a ValueError naming it (before any
    weight is read: torch's own error for a missing GPU comes only at the first copy)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device ({e}); expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r}: no usable GPU ({why}); expected 'cpu' here")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(device)!r}: this machine has {n} CUDA device(s); expected cuda:0..cuda:{n - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(device)!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return dev


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def left_pad(seqs, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of different lengths -> (input_ids [B, T], attention_mask [B, T]), padded
    on the left as forward() expects (every sequence ends in the last column)."""
    T = max(map(len, seqs))
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = True
    return ids.to(device), mask.to(device)


def _is_ragged(input_ids) -> bool:
    """A list/tuple of token-id lists whose lengths differ (what left_pad takes)."""
    return (isinstance(input_ids, (list, tuple)) and len(input_ids) > 1
            and all(isinstance(s, (list, tuple)) for s in input_ids)
            and len({len(s) for s in input_ids}) > 1)


@dataclass
class KVCache:
    """Preallocated keys/values: k, v [L, B, Hkv, S, hd]; `valid` [B, S] marks real (non-pad)
    keys; `used` columns are filled; `next_pos` [B] is each sequence's next position."""
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    next_pos: torch.Tensor
    used: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


class Model:
    """A loaded DeepSeekMoE checkpoint. No global state: every intervention, tap request and
    usage counter is an argument of the call that uses it."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, *, backend: str = "auto",
                 tokenizer=None, path: Path | None = None):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.path = path
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.backend = backends.resolve(backend, self.device)
        self._tap_names = all_tap_names(config.num_hidden_layers, config.moe_layers)
        hd = config.head_dim
        self._cpu: CpuModelWeights | None = None  # packed copy for backend="cpu" (cpu_weights.py)
        if self.backend == "cpu":
            self._cpu_weights()
        self._rope_rows = None   # (cos, sin) table, Model._rope_table
        self._routings: dict = {}  # Model._routing
        self._inv_freq = 1.0 / (config.rope_theta ** (
            torch.arange(0, hd, 2, dtype=torch.int64, device=self.device).float() / hd))
        # One forward at a time per Model: the cpu backend's packed-weight buffers, the decode
        # step's workspace and the rope/routing memos are per model (README, "Known limits").
        self._lock = threading.RLock()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, *, dtype: str | torch.dtype = "bfloat16",
             device: str | torch.device = "cpu", backend: str = "auto", progress: bool = False,
             quant: str | None = None, group_size: int = 128, sym: bool = False,
             context: int | None = None, check_memory: bool = True,
             allow_nonfinite: bool = False) -> "Model":
        """Load a checkpoint directory (None: the bundled small model). Weights holding NaN or
        Inf are refused (CheckpointError naming the tensor) unless allow_nonfinite=True.
        progress: a loading bar on stderr (the CLIs turn it on when stderr is a terminal).
        quant: "int8" | "int4" quantizes the linears on load (the same bits as
        `python -m moe_engine.quantize` with --group-size/--sym); a GPTQ checkpoint loads
        quantized by itself. context: the KV-cache length the memory preflight budgets for
        (default: the model's context); check_memory=False skips the preflight."""
        from .memory import preflight
        from .quant import QuantSpec
        from .tokenizer import Tokenizer

        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike naming a checkpoint directory, "
                            f"got {type(path).__name__} {path!r}")
        if not isinstance(allow_nonfinite, bool):
            raise TypeError(f"allow_nonfinite must be a bool, got {type(allow_nonfinite).__name__}")
        device = check_device(device)

        path = default_model_dir() if path is None else Path(path)
        if not path.is_dir():
            if path.exists():
                raise NotADirectoryError(f"model path {path} is a file, not a checkpoint directory "
                                         "(pass the directory holding config.json)")
            hint = (" (the bundled small model is missing from this install)"
                    if path == default_model_dir() else "")
            raise FileNotFoundError(f"model directory {path} does not exist{hint}")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        be = backends.resolve(backend, torch.device(device))
        spec = None if quant is None else QuantSpec.from_name(quant, group_size, sym)
        if check_memory:
            preflight(path, dtype=dtype, backend=be, quant=spec, context=context)
        config, weights = load_checkpoint(path, dtype=dtype, device=device, progress=progress, quant=spec,
                                          allow_nonfinite=allow_nonfinite)
        tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        return cls(config, weights, backend=backend, tokenizer=tok, path=path)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        for name, v in (("batch", batch), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"new_cache: {name} must be an int, got {type(v).__name__} {v!r}")
            if v < 1:
                raise ValueError(f"new_cache: {name} = {v}; expected >= 1")
        if max_len > c.max_position_embeddings and c.rope_scaling is None:
            raise ValueError(f"max_len {max_len} exceeds the model's context "
                             f"(max_position_embeddings = {c.max_position_embeddings})")
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        return KVCache(torch.empty(shape, dtype=self.dtype, device=self.device),
                       torch.empty(shape, dtype=self.dtype, device=self.device),
                       torch.zeros((batch, max_len), dtype=torch.bool, device=self.device),
                       torch.zeros(batch, dtype=torch.long, device=self.device))

    def new_usage_counters(self) -> torch.Tensor:
        """Per-layer expert usage counters [L, E] int32 on the device (rows of dense layers stay 0);
        pass as `usage=` and read whenever you like; reset with `.zero_()`."""
        return torch.zeros((self.config.num_hidden_layers, self.config.n_routed_experts),
                           dtype=torch.int32, device=self.device)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, input_ids, *, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, interventions: Interventions | None = None,
                capture: Capture | None = None, usage: torch.Tensor | None = None,
                logits: str = "all", backend: str | None = None, step: int = 0,
                grad: bool = False, **intervention_kwargs) -> torch.Tensor:
        """Run the model on `input_ids` [B, T] (or [T]); returns float32 logits [B, T, V]
        (`logits="all"`) or [B, V] for each sequence's last valid token (`logits="last"`).

        attention_mask [B, T]: 1 for real tokens, 0 for left padding; a list of token-id lists of
        different lengths is left-padded here (the logits come back padded the same way). cache: continue from a
        KVCache (new tokens are appended). Interventions come as `interventions=` or as keyword
        arguments (topk=, expert_mask=, mask_mode=, force_experts=, renormalize=), which
        override an enclosing `interventions.intervene(...)` block field by field.
        capture: a taps.Capture that records (and patches) taps. usage: counters from
        new_usage_counters(). step: the generation step recorded with captured rows.
        grad: keep the autograd graph (torch backend only: the kernels have no backward); the
        weights do not require grad, so make a tap's value a leaf with a function hook
        (taps.Patch) to get gradients with respect to it (lens.attribute_experts does)."""
        if not isinstance(logits, str) or logits not in ("all", "last"):
            raise ValueError(f"logits = {logits!r}; expected 'all' or 'last'")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from Model.new_cache, got {type(cache).__name__}")
        if capture is not None and not isinstance(capture, Capture):
            raise TypeError(f"capture must be a taps.Capture, got {type(capture).__name__}")
        if interventions is not None and not isinstance(interventions, Interventions):
            raise TypeError(f"interventions must be an Interventions, got {type(interventions).__name__}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step = {step!r}; expected an int >= 0")
        if attention_mask is None and _is_ragged(input_ids):
            # token-id lists of different lengths: left-padded here (the logits come back padded
            # the same way: sequence i's tokens are its last len(i) columns)
            for i, s in enumerate(input_ids):
                if len(s) == 0:
                    raise ValueError(f"input_ids[{i}] is empty; expected at least one token per sequence")
            input_ids, attention_mask = left_pad(input_ids, self.device)
        be = self.backend if backend is None else backends.resolve(backend, self.device)
        if grad and be != "torch":
            raise ValueError(f"grad=True needs the torch backend; the {be} kernels have no "
                             f"backward. Pass backend='torch' to this call (same weights, the "
                             f"PyTorch reference ops) or load the model with backend='torch'")
        with self._lock:
            return self._forward_locked(input_ids, attention_mask, cache, interventions, capture, usage,
                                        logits, be, step, grad, intervention_kwargs)

    def _forward_locked(self, input_ids, attention_mask, cache, interventions, capture, usage, logits, be,
                        step, grad, intervention_kwargs):
        if cache is not None:
            self._check_cache(cache)
        if (be == "cpu" and attention_mask is None and capture is None and cache is not None
                and self._cpu_weights().one_call):
            # no torch.no_grad() here: the step's only torch op is torch.empty (no autograd),
            # and entering the mode is slow on the caches a step leaves cold (bench/README.md)
            out = self._decode_step_cpu(input_ids, cache, interventions, intervention_kwargs, usage)
            if out is not None:
                return out if logits == "last" else out.unsqueeze(1)
        with torch.set_grad_enabled(grad):
            return self._forward(input_ids, attention_mask, cache, interventions, capture, usage, logits, be,
                                 step, intervention_kwargs)

    def _forward(self, input_ids, attention_mask, cache, interventions, capture, usage, logits, be, step,
                 intervention_kwargs):
        """forward's general path: any batch and length, taps, every backend."""
        c = self.config
        ids = self._check_ids(input_ids)
        B, T = ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            attention_mask = torch.as_tensor(attention_mask, device=self.device).bool()
            if attention_mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}; "
                                 f"expected {list(ids.shape)} like input_ids")
            if T > 1 and bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError("attention_mask must be left-padded (zeros only before a sequence's tokens)")
            if not bool(attention_mask[:, -1].all()):
                raise ValueError("attention_mask: every sequence needs at least its last column real")
        if cache is None:
            cache = self.new_cache(B, T)
        if cache.k.shape[1] != B:
            raise ValueError(f"cache holds {cache.k.shape[1]} sequences; input_ids has {B}")
        if cache.used + T > cache.capacity:
            raise ValueError(f"{cache.used} cached + {T} new tokens exceed the cache length {cache.capacity}")
        routing = self._routing(for_call(interventions, intervention_kwargs))
        self._check_usage(usage)

        # Positions continue each sequence; pads take position 0 and are never attended to.
        pos = cache.next_pos.unsqueeze(1) + torch.cumsum(attention_mask.long(), 1) - 1
        pos = torch.where(attention_mask, pos, torch.zeros_like(pos))
        max_pos = int(pos.max()) + 1 if pos.numel() else 0
        if max_pos > c.max_position_embeddings and c.rope_scaling is None:
            raise ValueError(f"position {max_pos - 1} is beyond the model's context "
                             f"(max_position_embeddings = {c.max_position_embeddings})")
        start = cache.used
        cache.valid[:, start:start + T] = attention_mask
        cos, sin = self._rope(pos, max_pos)
        w = self.weights
        cpu = self._cpu_weights() if be == "cpu" else None
        attn_mask = self._attn_mask(cache, start, T)

        flat_mask = attention_mask.reshape(-1)
        valid_index = flat_mask.nonzero().squeeze(1)              # [N]
        if capture is not None:
            seq = valid_index // T
            last_col = T - 1  # left padding: every sequence's last token is in the last column
            capture.begin(TokenIndex(seq, pos.reshape(-1)[valid_index], (valid_index % T) == last_col,
                                     step, valid_index), c.num_hidden_layers, self._tap_names)

        def tap(name, x_bt):  # x_bt [B, T, ...] -> record/patch the valid rows
            if capture is None or not capture.wants(name):
                return x_bt
            flat = x_bt.reshape(B * T, *x_bt.shape[2:])
            rows = capture(name, flat.index_select(0, valid_index))
            out = flat.clone()
            out[valid_index] = rows
            return out.view_as(x_bt)

        norm = rms_norm if cpu is None else cpu_rms_norm
        x = w.embed[ids]                                          # [B, T, D]
        for l, lw in enumerate(w.layers):
            if cpu is None:  # quantized weights: the reference's view, this call only
                lw = dequantized_layer(lw, self.dtype)
            lc = None if cpu is None else cpu.layers[l]
            x = tap(f"blocks.{l}.hook_resid_pre", x)
            h = norm(x, lw.input_norm, c.rms_norm_eps)
            a = self._attention(h, lw, l, cache, start, cos, sin, attn_mask, lc, cpu is not None and cpu.one_call)
            a = tap(f"blocks.{l}.hook_attn_out", a)
            x = tap(f"blocks.{l}.hook_resid_mid", x + a)
            h = norm(x, lw.post_attn_norm, c.rms_norm_eps)
            if isinstance(lw.mlp, MoEWeights):
                all_valid = valid_index.numel() == B * T
                hv = h.reshape(B * T, -1)
                xv = x.reshape(B * T, -1)
                if not all_valid:
                    hv, xv = hv.index_select(0, valid_index), xv.index_select(0, valid_index)
                out_v = moe_layer(hv, xv, lw.mlp, routing, l, backend=be,
                                  tap=(lambda name, v: capture(name, v)) if capture is not None else None,
                                  wants=capture.wants if capture is not None else None,
                                  usage=None if usage is None else usage[l],
                                  cpu=None if lc is None else lc.moe, fused=cpu is not None and cpu.one_call)
                if all_valid:  # out_v is a fresh tensor: no copy needed
                    x = out_v.view_as(x)
                else:
                    y = x.reshape(B * T, -1).clone()
                    y[valid_index] = out_v
                    x = y.view_as(x)
            else:
                m = ffn(h, lw.mlp.gate_up, lw.mlp.down, None if lc is None else lc.dense)
                m = tap(f"blocks.{l}.hook_mlp_out", m)
                x = x + m
            x = tap(f"blocks.{l}.hook_resid_post", x)
        cache.used = start + T
        cache.next_pos += attention_mask.long().sum(1)

        if logits == "last":
            x = x[:, -1:]
        xn = norm(x, w.final_norm, c.rms_norm_eps)
        if capture is not None and logits == "all":
            xn = tap("hook_final_norm", xn)
        out = linear(xn, w.lm_head, None if cpu is None else cpu.lm_head).float()
        if capture is not None and logits == "all":
            out = tap("logits", out)
        if capture is not None:
            capture.end()
        return out[:, 0] if logits == "last" else out

    __call__ = forward

    def generate(self, prompts, sampling=None, **kwargs):
        """Generate completions (see moe_engine.generate.generate for the arguments)."""
        from .generate import generate
        return generate(self, prompts, sampling, **kwargs)

    def iter_generate(self, prompts, sampling=None, **kwargs):
        """Stream TokenEvents (see moe_engine.generate.iter_generate)."""
        from .generate import iter_generate
        return iter_generate(self, prompts, sampling, **kwargs)

    # -- pieces ------------------------------------------------------------------------------------
    def _cpu_weights(self) -> CpuModelWeights:
        """The weights packed for the cpu kernels: one copy, made at load for backend="cpu" or
        the first time a call asks for it (the weights are read-only after load)."""
        if self._cpu is None:
            self._cpu = CpuModelWeights.pack(self.weights)
        return self._cpu

    def _decode_step_cpu(self, input_ids, cache: KVCache, interventions, intervention_kwargs, usage):
        """The cpu backend's one-call decode step (CpuModelWeights.decode_step) when this call is
        one -- one new token for each of <= SMALL_N sequences, a cache with a free column, the
        rope table covering the position -- else None, and forward's general path runs (and
        raises whatever is wrong). Same bits as the general path; tests/test_model_backends.py."""
        c = self.config
        ids = input_ids
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.device != self.device:
            return None
        shape = ids.shape
        if not ((len(shape) == 2 and shape[1] == 1) or (len(shape) == 1 and shape[0] == 1)):
            return None
        B = shape[0]
        if not 0 < B <= SMALL_N or cache.k.shape[1] != B or cache.used + 1 > cache.capacity:
            return None
        rs = c.rope_scaling
        if cache.used + 1 > c.max_position_embeddings and (rs is None or rs.type == "dynamic"):
            return None  # beyond the context (an error) or dynamic scaling: per call, in _rope
        routing = self._routing(for_call(interventions, intervention_kwargs))
        self._check_usage(usage)
        cos, sin = self._rope_table(cache.used + 1)
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.reshape(-1).long().contiguous()
        out = self._cpu_weights().decode_step(
            ids, self.weights.embed, cos, sin, cache, routing, usage,
            H=c.num_attention_heads, eps=c.rms_norm_eps, scale=1.0 / math.sqrt(c.head_dim))
        cache.used += 1
        return out

    def _routing(self, interventions: Interventions) -> Routing:
        """interventions.resolve, remembered for the plain cases (no mask; int or default topk
        and force), so a decode loop does not rebuild the same control tensors every step."""
        iv = interventions
        plain = iv.expert_mask is None and all(v is None or (type(v) is int) for v in (iv.topk, iv.force_experts))
        key = (iv.topk, iv.force_experts, iv.mask_mode, iv.renormalize) if plain else None
        routing = self._routings.get(key) if plain else None
        if routing is None:
            routing = iv.resolve(self.config, self.device)
            if plain:
                if len(self._routings) >= 64:
                    self._routings.clear()
                self._routings[key] = routing
        return routing

    def _check_usage(self, usage: torch.Tensor | None) -> None:
        if usage is not None:
            c = self.config
            backends.check(usage, "usage", dtype=torch.int32, shape=(c.num_hidden_layers, c.n_routed_experts),
                    device=self.device)

    def _check_cache(self, cache: KVCache) -> None:
        """A KVCache must be one this model's new_cache could have made: the kernels index it
        with the model's sizes (a 2-layer cache on a 3-layer model was written out of bounds)."""
        c = self.config
        for name, t in (("cache.k", cache.k), ("cache.v", cache.v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 5:
                raise TypeError(f"{name} must be a 5-d torch.Tensor [L, B, Hkv, S, hd], got {type(t).__name__}"
                                + (f" of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else ""))
        if not isinstance(cache.used, int) or isinstance(cache.used, bool) or not 0 <= cache.used <= cache.capacity:
            raise ValueError(f"cache.used = {cache.used!r}; expected an int in 0..{cache.capacity}")
        # A decode loop passes the same cache every step: its tensors are checked once (their
        # identities remembered); replacing one re-checks, and the C++ decode step still
        # compares the cache's byte size with the model's in case a tensor was resized in place.
        key = (id(self), id(cache.k), id(cache.v), id(cache.valid), id(cache.next_pos))
        if getattr(cache, "_checked", None) == key:
            return
        B, S = cache.k.shape[1], cache.k.shape[3]
        want = (c.num_hidden_layers, B, c.num_key_value_heads, S, c.head_dim)
        for name, t in (("cache.k", cache.k), ("cache.v", cache.v)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} has shape {list(t.shape)}; this model needs [L={c.num_hidden_layers}, B, "
                                 f"Hkv={c.num_key_value_heads}, S, hd={c.head_dim}] (make it with Model.new_cache)")
            if t.dtype != self.dtype or t.device != self.device or not t.is_contiguous():
                raise ValueError(f"{name} is {t.dtype} on {t.device} (contiguous: {t.is_contiguous()}); "
                                 f"this model needs a contiguous {self.dtype} cache on {self.device}")
        backends.check(cache.valid, "cache.valid", dtype=torch.bool, shape=(B, S), device=self.device)
        backends.check(cache.next_pos, "cache.next_pos", dtype=torch.long, shape=(B,), device=self.device)
        cache._checked = key

    def _check_ids(self, input_ids) -> torch.Tensor:
        if input_ids is None or isinstance(input_ids, (str, bytes, bytearray, float, bool)):
            raise TypeError(f"input_ids must be token ids (a tensor or a list of ints), got "
                            f"{type(input_ids).__name__} {input_ids!r:.60}; encode text with model.tokenizer.encode")
        try:
            ids = torch.as_tensor(input_ids, device=self.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"input_ids must be token ids (a tensor or a list of ints): {e}") from None
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {list(ids.shape)}")
        V = self.config.vocab_size
        bad = (ids < 0) | (ids >= V)
        if bool(bad.any()):
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary [0, {V})")
        return ids.long()

    def _rope(self, pos: torch.Tensor, seq_len: int):
        """cos, sin [B, T, hd] in the model dtype (rotate-half layout over all head dims): rows
        of _rope_table, except dynamic scaling beyond the context, whose base depends on seq_len."""
        c = self.config
        rs = c.rope_scaling
        if rs is not None and rs.type == "dynamic" and seq_len > c.max_position_embeddings:
            hd, factor = c.head_dim, float(rs.factor)
            base = c.rope_theta * ((factor * seq_len / c.max_position_embeddings) - (factor - 1)) ** (hd / (hd - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, device=self.device).float() / hd))
            freqs = pos.float().unsqueeze(-1) * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        cos, sin = self._rope_table(seq_len)
        return cos[pos], sin[pos]

    def _rope_table(self, n: int):
        """cos, sin [>= n, hd] in the model dtype, row p = position p (linear scaling applied);
        made once for the context; a scaled model going beyond it doubles it (not a rebuild a step)."""
        have = 0 if self._rope_rows is None else self._rope_rows[0].shape[0]
        if have < n:
            c = self.config
            p = torch.arange(max(n, 2 * have, c.max_position_embeddings), device=self.device).float()
            rs = c.rope_scaling
            if rs is not None and rs.type == "linear":
                p = p / float(rs.factor)
            freqs = p.unsqueeze(-1) * self._inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_rows = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
        return self._rope_rows

    def _attn_mask(self, cache: KVCache, start: int, T: int) -> torch.Tensor:
        """[B, 1, T, start+T] bool: causal over cache columns, real keys only; each query may
        always see itself, so pad rows stay finite."""
        S = start + T
        q_col = torch.arange(start, S, device=self.device).unsqueeze(1)
        k_col = torch.arange(S, device=self.device).unsqueeze(0)
        causal = k_col <= q_col                                        # [T, S]
        allowed = causal.unsqueeze(0) & cache.valid[:, None, :S]       # [B, T, S]
        allowed = allowed | (k_col == q_col).unsqueeze(0)
        return allowed.unsqueeze(1)

    def _attention(self, h, lw, l, cache: KVCache, start, cos, sin, attn_mask, lc=None, one_call=False):
        c = self.config
        B, T, _ = h.shape
        H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if lc is not None and T == 1 and one_call:  # cpu backend, decode: the whole block in one C++ call
            return attention_block_decode_cpu(
                h.view(B, -1), lc.qkv, lc.o, cos[:, 0], sin[:, 0], cache.k[l], cache.v[l], cache.valid,
                start, H, Hkv, 1.0 / math.sqrt(hd)).view(B, T, -1)
        if lc is not None and runs_packed(lc.qkv, B * T, h.dtype):  # cpu backend: one packed q|k|v product
            q, k, v = linear(h, None, lc.qkv).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        else:
            q, k, v = h @ lw.q.t(), h @ lw.k.t(), h @ lw.v.t()
        q = q.reshape(B, T, H, hd).transpose(1, 2)
        k = k.reshape(B, T, Hkv, hd).transpose(1, 2)
        v = v.reshape(B, T, Hkv, hd).transpose(1, 2)
        cs, sn = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cs + rotate_half(q) * sn
        k = k * cs + rotate_half(k) * sn
        cache.k[l, :, :, start:start + T] = k
        cache.v[l, :, :, start:start + T] = v
        keys = cache.k[l, :, :, :start + T]
        vals = cache.v[l, :, :, :start + T]
        if torch.is_grad_enabled():  # forward(grad=True): the same values, but autograd cannot
            # follow reads of a cache that the next layer's write changes in place
            keys = torch.cat([keys[:, :, :start], k], 2) if start else k
            vals = torch.cat([vals[:, :, :start], v], 2) if start else v
        if Hkv != H:
            keys = keys.repeat_interleave(H // Hkv, dim=1)
            vals = vals.repeat_interleave(H // Hkv, dim=1)
        o = Fn.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask, scale=1.0 / math.sqrt(hd))
        return linear(o.transpose(1, 2).reshape(B, T, H * hd), lw.o, None if lc is None else lc.o)
