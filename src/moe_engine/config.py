"""Model configuration: one frozen, validated dataclass read from a Hugging Face `config.json`.

Only the DeepSeekMoE architecture (`DeepseekForCausalLM`, model_type "deepseek") is accepted;
every field value the engine cannot honour is refused with a `ConfigError` that names the field,
the value, what is supported and the file, so a wrong checkpoint fails at load time rather than
producing silently wrong logits. Unknown extra keys (HF configs carry many: aux_loss_alpha,
use_cache, auto_map, ...) are kept in `extra` and written back by `to_dict`.

Shapes derived here (legend used across the engine):
  D hidden_size   V vocab_size   L num_hidden_layers   H num_attention_heads   Hkv kv heads
  hd head_dim = D / H   E n_routed_experts   K num_experts_per_tok   F moe_intermediate_size
  S shared_width = F * n_shared_experts (the shared experts are ONE SwiGLU MLP of width S)
Layer l is MoE iff l >= first_k_dense_replace and l % moe_layer_freq == 0 (else a dense MLP of
width intermediate_size).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "DeepseekForCausalLM"
MODEL_TYPE = "deepseek"
ROPE_SCALING_TYPES = ("linear", "dynamic")
TORCH_DTYPES = ("bfloat16", "float16", "float32")
MAX_HEAD_DIM = 1024        # the cpu attention kernels hold one head in a stack buffer
MAX_BYTES = 1 << 40        # 1 TiB: a weight set or RoPE table beyond it is a wrong config


class ConfigError(ValueError):
    """A config.json field is missing, malformed or not supported by this engine."""


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of the HF config: positions divided by `factor` ("linear"), or the base
    stretched once the sequence exceeds max_position_embeddings ("dynamic", NTK)."""

    type: str
    factor: float

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "factor": self.factor}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None  # None -> num_attention_heads (plain MHA)
    n_shared_experts: int = 0  # 0 (or null in the json) -> no shared experts
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    pretraining_tp: int = 1
    torch_dtype: str | None = "bfloat16"
    architectures: tuple[str, ...] = (ARCHITECTURE,)
    model_type: str = MODEL_TYPE
    # Keys we do not interpret, kept so to_dict() writes back what we read. Not compared.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Where the config came from, for error messages. Not compared.
    source: str = field(default="<dict>", compare=False, repr=False)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: top level must be a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Build from a HF config dict; unknown keys go to `extra`, known ones are validated."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "source"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in known]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        if "rope_scaling" in known:
            known["rope_scaling"] = _rope_scaling(known["rope_scaling"], source)
        if "architectures" in known:
            archs = known["architectures"]
            if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
                raise ConfigError(f"{source}: architectures = {archs!r} must be a list of strings")
            known["architectures"] = tuple(archs)
        if known.get("n_shared_experts", 0) is None:
            known["n_shared_experts"] = 0
        return cls(**known, extra=dict(extra), source=source)

    def to_dict(self) -> dict[str, Any]:
        """The HF config dict (extra keys included); `from_dict(c.to_dict()) == c`."""
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source"):
                continue
            d[f.name] = getattr(self, f.name)
        d["architectures"] = list(self.architectures)
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
        return d

    # ---- validation ---------------------------------------------------------------------------

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling, self.source))
        object.__setattr__(self, "architectures", tuple(self.architectures))
        if self.n_shared_experts is None:
            object.__setattr__(self, "n_shared_experts", 0)

        bad = self._refuse
        if ARCHITECTURE not in self.architectures:
            bad("architectures", list(self.architectures), f"a list containing {ARCHITECTURE!r}")
        if self.model_type != MODEL_TYPE:
            bad("model_type", self.model_type, repr(MODEL_TYPE))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "n_routed_experts", "num_experts_per_tok", "moe_layer_freq",
                     "max_position_embeddings"):
            self._int(name, minimum=1)
        self._int("n_shared_experts", minimum=0)
        self._int("first_k_dense_replace", minimum=0)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                self._int(name, minimum=0)
                if getattr(self, name) >= self.vocab_size:
                    bad(name, getattr(self, name), f"an id below vocab_size = {self.vocab_size}")
        for name in ("norm_topk_prob", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "true or false")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                bad(name, v, "a positive finite number")
            object.__setattr__(self, name, float(v))

        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", self.num_attention_heads,
                f"a divisor of hidden_size = {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", self.num_key_value_heads,
                f"a divisor of num_attention_heads = {self.num_attention_heads}")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", self.num_experts_per_tok,
                f"1 ..= n_routed_experts = {self.n_routed_experts}")
        if self.scoring_func != "softmax":
            bad("scoring_func", self.scoring_func, "'softmax'")
        if self.hidden_act != "silu":
            bad("hidden_act", self.hidden_act, "'silu'")
        if self.attention_bias is not False:
            bad("attention_bias", self.attention_bias, "false (no projection biases)")
        if self.pretraining_tp != 1:
            bad("pretraining_tp", self.pretraining_tp, "1")
        if self.torch_dtype is not None and self.torch_dtype not in TORCH_DTYPES:
            bad("torch_dtype", self.torch_dtype, f"one of {', '.join(TORCH_DTYPES)} or null")
        if self.head_dim % 2:
            # rotate-half RoPE pairs dimension i with i + hd/2: an odd head_dim has no layout
            bad("num_attention_heads", self.num_attention_heads,
                f"a divisor of hidden_size = {self.hidden_size} that leaves an even head_dim "
                f"(got head_dim = {self.head_dim})")
        if self.head_dim > MAX_HEAD_DIM:
            bad("num_attention_heads", self.num_attention_heads,
                f"a head_dim <= {MAX_HEAD_DIM} (got {self.head_dim}; the cpu attention kernels keep a head on the stack)")
        # Sizes that cannot fit anywhere: refused here with the estimate, not as a MemoryError
        # minutes into a load or at the first forward (the RoPE table has one row per position).
        for what, name, nbytes in (("the weights in bfloat16", "hidden_size / vocab_size / expert sizes",
                                    self.weight_bytes),
                                   ("the RoPE table", "max_position_embeddings", self.rope_table_bytes)):
            if nbytes > MAX_BYTES:
                raise ConfigError(f"{self.source}: {what} would take ~{nbytes / 2**30:,.0f} GiB "
                                  f"(from {name}), more than the {MAX_BYTES / 2**30:,.0f} GiB this engine accepts")

    def _refuse(self, name: str, value: Any, supported: str) -> None:
        raise ConfigError(f"{self.source}: unsupported {name} = {value!r}; supported: {supported}")

    def _int(self, name: str, minimum: int) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self._refuse(name, v, f"an integer >= {minimum}")

    # ---- derived ------------------------------------------------------------------------------

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights in bfloat16 (embedding, lm_head, attention, MLPs; norms ignored)."""
        D, hd, L = self.hidden_size, self.hidden_size // self.num_attention_heads, self.num_hidden_layers
        attn = D * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        f = self.moe_layer_freq  # MoE layers: multiples of f in [first_k_dense_replace, L)
        n_moe = (L + f - 1) // f - (min(self.first_k_dense_replace, L) + f - 1) // f
        moe = (self.n_routed_experts * (3 * D * self.moe_intermediate_size + D)
               + 3 * D * self.moe_intermediate_size * self.n_shared_experts)
        dense = 3 * D * self.intermediate_size
        return 2 * (2 * self.vocab_size * D + L * attn + n_moe * moe + (L - n_moe) * dense)

    @property
    def rope_table_bytes(self) -> int:
        """Bytes the model's RoPE table takes while built: fp32 angles, cos and sin per position."""
        return self.max_position_embeddings * (self.hidden_size // self.num_attention_heads) * 4 * 3

    @property
    def head_dim(self) -> int:
        """hd = D / H."""
        return self.hidden_size // self.num_attention_heads

    @property
    def shared_width(self) -> int:
        """S = F * n_shared_experts; 0 means the MoE layers have no shared experts."""
        return self.moe_intermediate_size * self.n_shared_experts

    def is_moe_layer(self, layer: int) -> bool:
        if not 0 <= layer < self.num_hidden_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_hidden_layers - 1}")
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(l for l in range(self.num_hidden_layers) if self.is_moe_layer(l))


def _rope_scaling(v: Any, source: str) -> RopeScaling | None:
    """Parse HF `rope_scaling`: null, or {"type" (or "rope_type"): linear|dynamic,
    "factor": f >= 1}."""
    if v is None or isinstance(v, RopeScaling):
        return v
    supported = ('null or {"type": "linear"|"dynamic", "factor": f >= 1}')
    if not isinstance(v, dict):
        raise ConfigError(f"{source}: unsupported rope_scaling = {v!r}; supported: {supported}")
    kind = v.get("type", v.get("rope_type"))
    if "type" in v and "rope_type" in v and v["type"] != v["rope_type"]:
        kind = (v["type"], v["rope_type"])
    factor = v.get("factor")
    if kind not in ROPE_SCALING_TYPES or isinstance(factor, bool) or not isinstance(
            factor, (int, float)) or not (math.isfinite(factor) and factor >= 1):
        raise ConfigError(f"{source}: unsupported rope_scaling = {v!r}; supported: {supported}")
    return RopeScaling(type=kind, factor=float(factor))
