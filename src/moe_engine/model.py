"""The DeepSeekMoE runtime: embedding -> decoder layers (attention + dense or MoE FFN) -> final
norm -> lm_head, with a preallocated KV cache and batched prefill / decode of prompts of
different lengths. Semantics: docs/model.md (Hugging Face remote code).

Shape legend: B sequences, Q new tokens per sequence in this call, N valid (non-pad) tokens of
the call, Tkv cache columns in use, Tkv_cap cache capacity, D hidden, H heads, Hkv key/value heads, hd head dim, E routed experts,
K top-k, F expert width, V vocab, L layers.

The MoE layer runs on the selected backend's kernels (src/moe_engine/moe.py); attention, norms and
the dense GEMMs are PyTorch on every backend, except a quantized model's linears (the cpu
backend's packed kernels, cpu_weights.py; cuda / emu: the quantized CUDA kernels, cuda_weights.py;
runner.py has the rule). Batches are left-padded: every sequence ends at the
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
from typing import NamedTuple

import torch
import torch.nn.functional as Fn

from .config import ModelConfig
from .interventions import Interventions, Routing, for_call
from .loader import ModelWeights, MoEWeights, load_checkpoint
from .cpu_weights import CpuModelWeights, dense, dense_all, ffn, linear
from .cuda_weights import CudaModelWeights
from .moe import moe_layer
from .ops import backend as backends
from .ops.attention import attention_block_decode_cpu
from .ops.packed import PackedWeight
from .ops.norm import rms_norm_ref as rms_norm
from .runner import Runner, runs_packed
from .taps import LAYER_TAPS, Capture, TokenIndex, all_tap_names

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
    """Token-id lists of different lengths -> (input_ids [B, Q], attention_mask [B, Q]), padded
    on the left as forward() expects (every sequence ends in the last column)."""
    Q = max(map(len, seqs))
    ids = torch.zeros((len(seqs), Q), dtype=torch.long)
    mask = torch.zeros((len(seqs), Q), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, Q - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, Q - len(s):] = True
    return ids.to(device), mask.to(device)


def _is_ragged(input_ids) -> bool:
    """A list/tuple of token-id lists whose lengths differ (what left_pad takes)."""
    return (isinstance(input_ids, (list, tuple)) and len(input_ids) > 1
            and all(isinstance(s, (list, tuple)) for s in input_ids)
            and len({len(s) for s in input_ids}) > 1)


@dataclass
class KVCache:
    """Preallocated keys/values: k, v [L, B, Hkv, Tkv_cap, hd]; `valid` [B, Tkv_cap] marks real (non-pad)
    keys; `used` columns are filled; `next_pos` [B] is each sequence's next position, which
    the model also keeps on the host (`host_pos`, so a call reads no device value; None: read
    from next_pos once). Only Model.forward advances a cache."""
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    next_pos: torch.Tensor
    used: int = 0
    host_pos: list | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def host_next_pos(self) -> list:
        """next_pos as host ints (a synchronisation only for a cache made without host_pos)."""
        if self.host_pos is None or len(self.host_pos) != self.next_pos.shape[0]:
            self.host_pos = self.next_pos.tolist()
        return self.host_pos

    def advance(self, used: int, mask: torch.Tensor, counts: list) -> None:
        """After a call: `used` columns are filled; sequence i got counts[i] = mask[i].sum() tokens."""
        self.used = used
        self.next_pos += mask.long().sum(1)
        self.host_pos = [p + n for p, n in zip(self.host_next_pos(), counts)]


class Model:
    """A loaded DeepSeekMoE checkpoint. No global state: every intervention, tap request and
    usage counter is an argument of the call that uses it."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, *, backend: str = "auto",
                 tokenizer=None, path: Path | None = None, cuda_graph: bool | None = None):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.path = path
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.backend = backends.resolve(backend, self.device)
        self._tap_names = all_tap_names(config.num_hidden_layers, config.moe_layers)
        self._layer_taps = [_LayerTaps(*(f"blocks.{l}.{t}" for t in LAYER_TAPS))
                            for l in range(config.num_hidden_layers)]
        self._runners: dict[str, Runner] = {}  # Model._runner
        hd = config.head_dim
        self._cpu: CpuModelWeights | None = None  # the packed weights for backend="cpu": once made,
        # the only copy (self.weights then holds views of them; cpu_weights.py)
        self._quant: dict = {}  # backend -> repacked quantized weights for cuda / emu (cuda_weights.py)
        if self.backend == "cpu":
            self._cpu_weights()
        elif self.backend in ("cuda", "emu"):
            self._cuda_weights(self.backend)
        self._rope_rows = None   # (cos, sin) table, Model._rope_table
        self._routings: dict = {}  # Model._routing
        self._inv_freq = 1.0 / (config.rope_theta ** (
            torch.arange(0, hd, 2, dtype=torch.int64, device=self.device).float() / hd))
        # One forward at a time per Model: the cpu backend's packed-weight buffers, the decode
        # step's workspace and the rope/routing memos are per model (README, "Known limits").
        self._lock = threading.RLock()
        # cuda_graph (default: on for the cuda backend): decode steps replay a captured graph
        # (graphs.py); any other backend has no torch CUDA graph to capture
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
        if cuda_graph and self.backend != "cuda":
            raise ValueError(f"cuda_graph=True needs the cuda backend; this model runs on {self.backend!r}")
        self._graphs = None
        if cuda_graph is not False and self.backend == "cuda":
            from .graphs import CudaGraph, DecodeGraphs
            self._graphs = DecodeGraphs(CudaGraph)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, *, dtype: str | torch.dtype = "bfloat16",
             device: str | torch.device = "cpu", backend: str = "auto", progress: bool = False,
             quant: str | None = None, group_size: int = 128, sym: bool = False,
             context: int | None = None, check_memory: bool = True,
             allow_nonfinite: bool = False, expert_parallel: bool = False,
             cuda_graph: bool | None = None, quant_lm_head: bool = False) -> "Model":
        """Load a checkpoint directory (None: the bundled small model). Weights holding NaN or
        Inf are refused (CheckpointError naming the tensor) unless allow_nonfinite=True.
        progress: a loading bar on stderr (the CLIs turn it on when stderr is a terminal).
        quant: "int8" | "int4" quantizes the linears on load (the same bits as
        `python -m moe_engine.quantize` with --group-size/--sym); a GPTQ checkpoint loads
        quantized by itself. quant_lm_head: also quantize the lm_head on load, to 8 bits with the
        model's group size and symmetry (loader.lm_head_option; docs/quantization.md), the same
        bits as `python -m moe_engine.quantize ... --lm-head`. context: the KV-cache length the
        memory preflight budgets for (default: the model's context); check_memory=False skips
        the preflight.
        expert_parallel: under torchrun, this rank holds only its share of each MoE layer's
        routed experts and exchanges tokens with the others (src/moe_engine/distributed.py).
        cuda_graph: decode steps replay a captured CUDA graph (src/moe_engine/graphs.py); None
        (default) = on for the cuda backend; False turns it off (the CLIs' --no-cuda-graph)."""
        from .loader import lm_head_option
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
        if cuda_graph and expert_parallel is not False:
            raise ValueError("cuda_graph=True and expert_parallel: the token exchange sizes its buffers "
                             "on the host every step, so an expert-parallel step cannot be captured")
        spec = None if quant is None else QuantSpec.from_name(quant, group_size, sym)
        if not isinstance(quant_lm_head, bool):
            raise TypeError(f"quant_lm_head must be a bool, got {type(quant_lm_head).__name__}")
        head_spec = lm_head_option(path, spec, group_size, sym) if quant_lm_head else None
        experts = None
        if expert_parallel is not False:
            from . import distributed
            experts = distributed.start_expert_parallel(expert_parallel, device)
        if check_memory:
            preflight(path, dtype=dtype, backend=be, quant=spec, context=context, experts=experts,
                      lm_head=head_spec)
        config, weights = load_checkpoint(path, dtype=dtype, device=device, progress=progress, quant=spec,
                                          allow_nonfinite=allow_nonfinite, experts=experts, lm_head=head_spec)
        tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        model = cls(config, weights, backend=backend, tokenizer=tok, path=path, cuda_graph=cuda_graph)
        if experts is not None:
            distributed.attach_expert_shards(model)
            model._graphs = None  # the exchange's counts go through the host: eager steps only
        return model

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
        # zeros, not empty: the captured decode step attends over all Tkv_cap columns with the
        # unwritten ones masked, and 0 x a NaN in uninitialised memory would still be NaN
        return KVCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros((batch, max_len), dtype=torch.bool, device=self.device),
                       torch.zeros(batch, dtype=torch.long, device=self.device), host_pos=[0] * batch)

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
        """Run the model on `input_ids` [B, Q] (or [Q]); returns float32 logits [B, Q, V]
        (`logits="all"`) or [B, V] for each sequence's last valid token (`logits="last"`).

        attention_mask [B, Q]: 1 for real tokens, 0 for left padding; a list of token-id lists of
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
            input_ids, attention_mask = left_pad(input_ids)
        be = self.backend if backend is None else backends.resolve(backend, self.device)
        if grad and be != "torch":
            raise ValueError(f"grad=True needs the torch backend; the {be} kernels have no "
                             f"backward. Pass backend='torch' to this call (same weights, the "
                             f"PyTorch reference ops) or load the model with backend='torch'")
        with self._lock:
            runner = self._runner(be)  # under the lock: the first cpu call packs the weights
            if cache is not None:
                self._check_cache(cache)
            iv = for_call(interventions, intervention_kwargs)
            if runner.decode_step(input_ids, cache, self.config, self.device,
                                  attention_mask=attention_mask, capture=capture):
                # no torch.no_grad() here: the step's only torch op is torch.empty (no autograd),
                # and entering the mode is slow on the caches a step leaves cold (bench/README.md)
                out = self._decode_step_cpu(input_ids, cache, iv, usage)
                return out if logits == "last" else out.unsqueeze(1)
            if self._graphs is not None and not grad and runner.graph_step(
                    input_ids, cache, self.config, attention_mask=attention_mask):
                out = self._graphs.step(self, runner, input_ids, cache, self._routing(iv), usage,
                                        capture, logits, step)
                if out is not None:
                    return out
            with torch.set_grad_enabled(grad):
                call = self._prepare(runner, input_ids, attention_mask=attention_mask, cache=cache,
                                     interventions=iv, capture=capture, usage=usage, logits=logits, step=step)
                return self._forward(call)

    def _forward(self, call: "_Call") -> torch.Tensor:
        """The layer loop: no validation and no host synchronisation (Model._prepare did both)."""
        w, run, tap, rows, eps = self.weights, call.runner, call.taps, call.rows, self.config.rms_norm_eps
        x = w.embed[call.ids]                                                # [B, Q, D]
        for l, lw in enumerate(w.layers):
            lw, lc = run.layer(l, lw, self.dtype)
            n = self._layer_taps[l]
            x = tap(n.resid_pre, x)
            a = tap(n.attn_out, self._attention(run.rms_norm(x, lw.input_norm, eps), lw, lc, l, call))
            x = tap(n.resid_mid, x + a)
            h = run.rms_norm(x, lw.post_attn_norm, eps)
            if isinstance(lw.mlp, MoEWeights):
                x = rows.scatter(x, self._moe(rows.gather(h), rows.gather(x), lw.mlp, lc, l, call))
            else:
                x = x + tap(n.mlp_out, ffn(h, lw.mlp, None if lc is None else lc.dense))
            x = tap(n.resid_post, x)
        if call.col is None:  # the captured step's bookkeeping is DecodeGraphs.step's
            call.cache.advance(call.start + call.ids.shape[1], call.mask, call.counts)
        return self._head(x, call)

    def _moe(self, u, resid_mid, mw: MoEWeights, lc, l: int, call: "_Call") -> torch.Tensor:
        """The MoE layer on the N valid tokens: u, resid_mid [N, D] -> resid_post [N, D]."""
        cap = call.taps.capture
        packed = None if lc is None else lc.moe  # the cpu's packed or cuda / emu's repacked layer
        return moe_layer(u, resid_mid, mw, call.routing, l, backend=call.runner.backend, tap=cap,
                         wants=None if cap is None else cap.wants,
                         usage=None if call.usage is None else call.usage[l],
                         cpu=packed if call.runner.packed is not None else None,
                         quant=packed if call.runner.quant is not None else None, fused=call.runner.fused_moe(cap))

    def _head(self, x: torch.Tensor, call: "_Call") -> torch.Tensor:
        """Final norm and lm_head: float32 logits [B, Q, V], or [B, V] for logits="last"."""
        last = call.logits == "last"
        if last:
            x = x[:, -1:]
        xn = call.runner.rms_norm(x, self.weights.final_norm, self.config.rms_norm_eps)
        if not last:
            xn = call.taps("hook_final_norm", xn)
        out = linear(xn, *call.runner.head(self.weights.lm_head, self.dtype)).float()
        if not last:
            out = call.taps("logits", out)
        call.taps.end()
        return out[:, 0] if last else out

    def _prepare(self, runner: Runner, input_ids, *, attention_mask, cache, interventions, capture, usage,
                 logits, step) -> "_Call":
        """forward's host side, all of it before the first launch: validate the inputs (a device
        tensor's check is the call's one synchronisation; tokens and masks given on the host
        need none), then the small device tensors the layer loop reads. Sizes that depend on
        data (the valid-token count, the largest position) come from host copies, so the loop
        holds fixed-size buffers only (no nonzero(), no .item())."""
        c = self.config
        ids = self._check_ids(input_ids)
        B, Q = ids.shape
        mask_h = None if attention_mask is None else self._check_attention_mask(attention_mask, (B, Q))
        if cache is None:
            cache = self.new_cache(B, Q)
        if cache.k.shape[1] != B:
            raise ValueError(f"cache holds {cache.k.shape[1]} sequences; input_ids has {B}")
        if cache.used + Q > cache.capacity:
            raise ValueError(f"{cache.used} cached + {Q} new tokens exceed the cache length {cache.capacity}")
        routing = self._routing(interventions)
        self._check_usage(usage)
        counts = [Q] * B if mask_h is None else mask_h.sum(1).tolist()     # new tokens per sequence
        # every sequence's last column is real, so the largest position is max(next_pos + count) - 1
        max_pos = max((p + n for p, n in zip(cache.host_next_pos(), counts)), default=0)
        if max_pos > c.max_position_embeddings and c.rope_scaling is None:
            raise ValueError(f"position {max_pos - 1} is beyond the model's context "
                             f"(max_position_embeddings = {c.max_position_embeddings})")
        # launches from here on
        ids = ids.to(self.device, non_blocking=True)
        mask = (torch.ones((B, Q), dtype=torch.bool, device=self.device) if mask_h is None
                else mask_h.to(self.device, non_blocking=True))
        # Positions continue each sequence; pads take position 0 and are never attended to.
        pos = cache.next_pos.unsqueeze(1) + torch.cumsum(mask.long(), 1) - 1
        pos = torch.where(mask, pos, torch.zeros_like(pos))
        start = cache.used
        cache.valid[:, start:start + Q] = mask
        cos, sin = self._rope(pos, max_pos)
        N = sum(counts)
        rows = _Rows(B, Q, None if N == B * Q else torch.nonzero_static(mask.reshape(-1), size=N).squeeze(1))
        if routing.rows != "call":  # per-position / per-token controls: one row per routed token
            index = torch.arange(B * Q, device=self.device) if rows.index is None else rows.index
            routing = routing.for_tokens(pos.reshape(-1)[index], index, B, Q)
        taps = _NO_TAPS
        if capture is not None:
            index = torch.arange(B * Q, device=self.device) if rows.index is None else rows.index
            capture.begin(TokenIndex(index // Q, pos.reshape(-1)[index], (index % Q) == Q - 1, step, index, B),
                          c.num_hidden_layers, self._tap_names)
            taps = _Taps(capture, rows)
        return _Call(runner, ids, cache, start, routing, usage, taps, rows, cos, sin,
                     self._attn_mask(cache, start, Q), logits, mask, counts)

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

    def _cuda_weights(self, backend: str) -> CudaModelWeights | None:
        """The quantized weights repacked for the CUDA kernels on `backend` ("cuda" / "emu"): one
        copy, made at load for the model's backend or the first time a call asks for it; None
        when the model has nothing they take (cuda_weights.py)."""
        if backend not in self._quant:
            self._quant[backend] = CudaModelWeights.repack(self.weights, backend)
        return self._quant[backend]

    def lm_head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, D] in the model dtype times the lm_head: [n, V] in the model dtype, no final norm
        (the lens decodes through this). An unquantized lm_head: torch's product; a quantized one
        (quant_lm_head): the model's own path (the cpu backend's packed kernels, else a
        dequantized view), so the lens reads what the model computes. An unquantized lm_head the
        cpu backend holds only as panels is unpacked for the call (exact: torch's product too)."""
        w = self.weights.lm_head
        if isinstance(w, torch.Tensor) or isinstance(getattr(w, "packed", None), PackedWeight):
            return h @ dense(w, self.dtype).t()
        with self._lock:
            return linear(h, *self._runner(self.backend).head(w, self.dtype))

    def _runner(self, backend: str) -> Runner:
        """The path rule for calls on `backend` (runner.py); the cpu one holds the packed weights,
        the cuda / emu ones the repacked quantized weights."""
        run = self._runners.get(backend)
        if run is None:
            run = self._runners[backend] = Runner(
                backend, self._cpu_weights() if backend == "cpu" else None,
                quant=self._cuda_weights(backend) if backend in ("cuda", "emu") else None)
        return run

    def _decode_step_cpu(self, input_ids: torch.Tensor, cache: KVCache, interventions: Interventions, usage):
        """The cpu backend's one-call decode step (CpuModelWeights.decode_step), for a call the
        runner admitted (Runner.decode_step). Same bits as the layer loop;
        tests/test_model_backends.py."""
        c = self.config
        routing = self._routing(interventions)
        if routing.rows != "call":  # per-position / per-token controls: one row per sequence
            B = input_ids.shape[0]
            routing = routing.for_tokens(cache.next_pos, torch.arange(B, device=self.device), B, 1)
        self._check_usage(usage)
        cos, sin = self._rope_table(cache.used + 1)
        ids = input_ids
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.reshape(-1).long().contiguous()
        out = self._cpu_weights().decode_step(
            ids, self.weights.embed, cos, sin, cache, routing, usage,
            H=c.num_attention_heads, eps=c.rms_norm_eps, scale=1.0 / math.sqrt(c.head_dim))
        cache.used += 1
        cache.host_pos = [p + 1 for p in cache.host_next_pos()]
        return out

    def invalidate_graphs(self) -> None:
        """Drop the captured decode steps (graphs.py), e.g. after editing weights in place;
        replacing `model.weights` or the cache is noticed without this."""
        if self._graphs is not None:
            self._graphs.invalidate()

    def _graph_body(self, runner: Runner, st, cache: KVCache, routing: Routing, logits: str):
        """The decode step DecodeGraphs captures, as a function of its static buffers `st`
        (graphs._Static) and the cache: the token at position next_pos[b] into cache column
        st.col of every sequence, attention over all Tkv_cap columns, logits into st.out, then
        next_pos advanced. Reads no host value that changes between replays."""
        dev, B = self.device, st.ids.shape[0]
        rows = _Rows(B, 1, None)
        taps = _Taps(st.taps, rows) if st.taps.names else _NO_TAPS

        def body():
            if st.usage is not None:
                st.usage.zero_()
            Tkv_cap = cache.capacity
            pos = cache.next_pos.unsqueeze(1)                                   # [B, 1]
            cache.valid.index_fill_(1, st.col, True)
            cos_t, sin_t = self._rope_table(Tkv_cap)
            k_col = torch.arange(Tkv_cap, device=dev)
            allowed = ((k_col <= st.col) & cache.valid) | (k_col == st.col)     # [B, Tkv_cap]
            call = _Call(runner, st.ids, cache, -1, routing, st.usage, taps, rows, cos_t[pos], sin_t[pos],
                         allowed[:, None, None, :], logits, None, None, col=st.col)
            st.out.copy_(self._forward(call))
            cache.next_pos.add_(1)
        return body

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
                raise TypeError(f"{name} must be a 5-d torch.Tensor [L, B, Hkv, Tkv_cap, hd], got {type(t).__name__}"
                                + (f" of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else ""))
        if not isinstance(cache.used, int) or isinstance(cache.used, bool) or not 0 <= cache.used <= cache.capacity:
            raise ValueError(f"cache.used = {cache.used!r}; expected an int in 0..{cache.capacity}")
        # A decode loop passes the same cache every step: its tensors are checked once (their
        # identities remembered); replacing one re-checks, and the C++ decode step still
        # compares the cache's byte size with the model's in case a tensor was resized in place.
        key = (id(self), id(cache.k), id(cache.v), id(cache.valid), id(cache.next_pos))
        if getattr(cache, "_checked", None) == key:
            return
        B, Tkv_cap = cache.k.shape[1], cache.k.shape[3]
        want = (c.num_hidden_layers, B, c.num_key_value_heads, Tkv_cap, c.head_dim)
        for name, t in (("cache.k", cache.k), ("cache.v", cache.v)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} has shape {list(t.shape)}; this model needs [L={c.num_hidden_layers}, B, "
                                 f"Hkv={c.num_key_value_heads}, Tkv_cap, hd={c.head_dim}] (make it with Model.new_cache)")
            if t.dtype != self.dtype or t.device != self.device or not t.is_contiguous():
                raise ValueError(f"{name} is {t.dtype} on {t.device} (contiguous: {t.is_contiguous()}); "
                                 f"this model needs a contiguous {self.dtype} cache on {self.device}")
        backends.check(cache.valid, "cache.valid", dtype=torch.bool, shape=(B, Tkv_cap), device=self.device)
        backends.check(cache.next_pos, "cache.next_pos", dtype=torch.long, shape=(B,), device=self.device)
        cache._checked = key

    def _check_ids(self, input_ids) -> torch.Tensor:
        """input_ids as int64 [B, Q], checked against the vocabulary where they are: ids given on
        the host stay there (the caller moves them); a device tensor's check is one sync."""
        if input_ids is None or isinstance(input_ids, (str, bytes, bytearray, float, bool)):
            raise TypeError(f"input_ids must be token ids (a tensor or a list of ints), got "
                            f"{type(input_ids).__name__} {input_ids!r:.60}; encode text with model.tokenizer.encode")
        try:
            ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"input_ids must be token ids (a tensor or a list of ints): {e}") from None
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, Q] with Q >= 1, got shape {list(ids.shape)}")
        V = self.config.vocab_size
        bad = (ids < 0) | (ids >= V)
        if bool(bad.any()):
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary [0, {V})")
        return ids.long()

    def _check_attention_mask(self, attention_mask, shape: tuple[int, int]) -> torch.Tensor:
        """attention_mask as a host bool tensor of `shape`, left-padded with every last column real."""
        mask = torch.as_tensor(attention_mask).bool().cpu()
        if tuple(mask.shape) != shape:
            raise ValueError(f"attention_mask has shape {list(mask.shape)}; expected {list(shape)} like input_ids")
        if shape[1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask must be left-padded (zeros only before a sequence's tokens)")
        if not bool(mask[:, -1].all()):
            raise ValueError("attention_mask: every sequence needs at least its last column real")
        return mask

    def _rope(self, pos: torch.Tensor, seq_len: int):
        """cos, sin [B, Q, hd] in the model dtype (rotate-half layout over all head dims): rows
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

    def _attn_mask(self, cache: KVCache, start: int, Q: int) -> torch.Tensor:
        """[B, 1, Q, start+Q] bool: causal over cache columns, real keys only; each query may
        always see itself, so pad rows stay finite."""
        Tkv = start + Q
        q_col = torch.arange(start, Tkv, device=self.device).unsqueeze(1)
        k_col = torch.arange(Tkv, device=self.device).unsqueeze(0)
        causal = k_col <= q_col                                        # [Q, Tkv]
        allowed = causal.unsqueeze(0) & cache.valid[:, None, :Tkv]       # [B, Q, Tkv]
        allowed = allowed | (k_col == q_col).unsqueeze(0)
        return allowed.unsqueeze(1)

    def _attention(self, h: torch.Tensor, lw, lc, l: int, call: "_Call") -> torch.Tensor:
        """The attention block of layer l on h = RMSNorm(x) [B, Q, D]; writes the cache columns."""
        c, cache, start = self.config, call.cache, call.start
        B, Q, _ = h.shape
        H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if call.runner.fused_attention(Q):
            return attention_block_decode_cpu(
                h.view(B, -1), lc.qkv, lc.o, call.cos[:, 0], call.sin[:, 0], cache.k[l], cache.v[l], cache.valid,
                start, H, Hkv, 1.0 / math.sqrt(hd)).view(B, Q, -1)
        if lc is not None and runs_packed(lc.qkv, B * Q, h.dtype):  # one packed (cpu) or repacked (cuda_weights) q|k|v product
            q, k, v = linear(h, None, lc.qkv).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        else:
            q, k, v = (h @ w.t() for w in dense_all((lw.q, lw.k, lw.v), h.dtype))  # cpu: one unpacking
        q = q.reshape(B, Q, H, hd).transpose(1, 2)
        k = k.reshape(B, Q, Hkv, hd).transpose(1, 2)
        v = v.reshape(B, Q, Hkv, hd).transpose(1, 2)
        cs, sn = call.cos.unsqueeze(1), call.sin.unsqueeze(1)
        q = q * cs + rotate_half(q) * sn
        k = k * cs + rotate_half(k) * sn
        if call.col is not None:  # captured decode step: the column is device data, keys are all
            cache.k[l].index_copy_(2, call.col, k)  # Tkv_cap columns (call.attn_mask limits them)
            cache.v[l].index_copy_(2, call.col, v)
            keys, vals = cache.k[l], cache.v[l]
        else:
            cache.k[l, :, :, start:start + Q] = k
            cache.v[l, :, :, start:start + Q] = v
            keys = cache.k[l, :, :, :start + Q]
            vals = cache.v[l, :, :, :start + Q]
        if torch.is_grad_enabled():  # forward(grad=True): the same values, but autograd cannot
            # follow reads of a cache that the next layer's write changes in place
            keys = torch.cat([keys[:, :, :start], k], 2) if start else k
            vals = torch.cat([vals[:, :, :start], v], 2) if start else v
        if Hkv != H:
            keys = keys.repeat_interleave(H // Hkv, dim=1)
            vals = vals.repeat_interleave(H // Hkv, dim=1)
        o = Fn.scaled_dot_product_attention(q, keys, vals, attn_mask=call.attn_mask, scale=1.0 / math.sqrt(hd))
        return linear(o.transpose(1, 2).reshape(B, Q, H * hd), lw.o, None if lc is None else lc.o)


class _LayerTaps(NamedTuple):
    """The names of one layer's residual-stream taps (made once per model, not per call)."""
    resid_pre: str
    attn_out: str
    resid_mid: str
    mlp_out: str
    resid_post: str


class _Rows:
    """The N valid (non-pad) tokens among a call's B x Q: `index` [N] into the flattened [B*Q],
    made with a fixed size (no host sync), or None when every token is valid (then gather and
    scatter are views)."""
    __slots__ = ("shape", "index")

    def __init__(self, B: int, Q: int, index: torch.Tensor | None):
        self.shape, self.index = (B * Q,), index

    def gather(self, x_bt: torch.Tensor) -> torch.Tensor:
        """x [B, Q, ...] -> its valid rows [N, ...]."""
        flat = x_bt.reshape(self.shape + x_bt.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def scatter(self, x_bt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x [B, Q, ...] with its valid rows replaced by rows [N, ...] (a new tensor; pads kept)."""
        if self.index is None:
            return rows.view_as(x_bt)
        y = x_bt.reshape(self.shape + x_bt.shape[2:]).clone()
        y[self.index] = rows
        return y.view_as(x_bt)


class _Taps:
    """forward's tap points on [B, Q, ...] activations: the capture records the valid rows (its
    own copy of the rows it keeps); the activation is rebuilt only when a patch changed them."""
    __slots__ = ("capture", "rows")

    def __init__(self, capture: Capture, rows: _Rows):
        self.capture, self.rows = capture, rows

    def __call__(self, name: str, x_bt: torch.Tensor) -> torch.Tensor:
        if not self.capture.wants(name):
            return x_bt
        valid = self.rows.gather(x_bt)
        new = self.capture(name, valid)
        return x_bt if new is valid else self.rows.scatter(x_bt, new)

    def end(self) -> None:
        self.capture.end()


class _NoTaps:
    """A call without a capture: every tap is the identity."""
    capture = None

    def __call__(self, name: str, x_bt: torch.Tensor) -> torch.Tensor:
        return x_bt

    def end(self) -> None:
        pass


_NO_TAPS = _NoTaps()


@dataclass
class _Call:
    """One forward call after Model._prepare: everything the layer loop reads."""
    runner: Runner
    ids: torch.Tensor            # [B, Q] int64 on the device
    cache: KVCache
    start: int                   # first cache column of this call
    routing: Routing
    usage: torch.Tensor | None   # [L, E] int32 counters
    taps: _Taps | _NoTaps
    rows: _Rows
    cos: torch.Tensor            # [B, Q, hd]
    sin: torch.Tensor
    attn_mask: torch.Tensor      # [B, 1, Q, start + Q] bool
    logits: str                  # "all" | "last"
    mask: torch.Tensor | None    # [B, Q] bool on the device: real tokens
    counts: list | None          # real tokens per sequence (host)
    # the captured decode step (graphs.py): the cache column written, as device data [1]; then
    # attention runs over all Tkv_cap columns (attn_mask [B, 1, 1, Tkv_cap]) and start is unused
    col: torch.Tensor | None = None
