"""Weight-only quantization in the GPTQ checkpoint layout (docs/quantization.md).

Shape legend (this module): a quantized linear weight has the logical shape [Dout out, Din in]
(y = x W^T), optionally with leading dims (experts: [E, Dout, Din]); p = 32 / bits values per int32,
g the group size along Din, G = ceil(Din / g) groups.

    qweight int32 [..., Din / p, Dout]   packed along Din: value j of a word holds row k = p*i + j in
                                    bits [bits*j, bits*j + bits) (low bits first)
    qzeros  int32 [..., G, Dout / p]   packed along Dout, same bit order
    scales  fp16  [..., G, Dout]
    g_idx   int32 [Din]               k // g (desc_act false: the only order we read or write)
    W[n, k] = scales[k // g, n] * (q[k, n] - z[k // g, n])

z is the true zero point. The original GPTQ format ("gptq", v1) stores z - 1 in qzeros and its
readers add 1 back; "gptq_v2" stores z. `QuantizedWeight.zero_offset` is what a reader adds to the
stored value (1 for v1, 0 for v2), so both read exactly. We write v1, the format every GPTQ
reader understands; our round-to-nearest quantizer keeps z >= 1 so v1 stores it without the
wrap-around the format has at z = 0.

Quantization (round to nearest, per group of g input channels, per output row):
    sym:  s = 2 max|w| / (2^b - 1), z = 2^(b-1)
    asym: lo = min(min w, 0), hi = max(max w, 0), s = (hi - lo) / (2^b - 1), z = round(-lo / s)
          (z clamped to 1 .. 2^b - 1; a group with z = 0 takes s = hi / (2^b - 2), z = 1)
    q = clamp(round(w / s) + z, 0, 2^b - 1), s rounded to fp16 first (what is stored is what
    the weights are computed from).

The lm_head is quantized only when asked (`quant_lm_head=True` on load, `--lm-head` on the
quantize CLI): to LM_HEAD_BITS with the model's group size and symmetry (`lm_head_spec`). In
config.json that is GPTQModel's `"lm_head": true`, plus, when the model's bits differ, a `dynamic`
override for the module `lm_head` (`{"+:lm_head": {"bits": 8}}`), which vLLM reads the same way.

The cpu kernels take the same tensors (`QuantizedWeight` is what the model path holds); the
cpu backend repacks them (cpu_weights.py), the other backends dequantize per call.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
QUANT_NAMES = {"int8": 8, "int4": 4}  # load(quant=...) / --quant
# quantization_config.checkpoint_format -> what a reader adds to the stored zero
FORMATS = {"gptq": 1, "gptq_v2": 0}
WRITE_FORMAT = "gptq"
_MIN_SCALE = 2.0 ** -14  # smallest normal fp16: a group of (near-)zeros still gets a finite 1/s

# The DeepSeekMoE linears we quantize: attention projections, the dense MLP, routed and shared
# experts. The router (mlp.gate.weight), norms and embedding stay in the model dtype;
# the lm_head too unless asked (LM_HEAD, lm_head_spec).
QUANTIZABLE = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.|shared_experts\.)?"
    r"(gate|up|down)_proj)\.weight")
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
LM_HEAD = "lm_head.weight"
# An lm_head row is one vocabulary logit: 8 bits keep top-1 agreement where 4 would not, and the
# lm_head is one read per token, not one per chosen expert (docs/quantization.md).
LM_HEAD_BITS = 8
# the `dynamic` keys we write and read for the lm_head override (GPTQModel: "+:" = positive
# match; a key without a prefix is a positive match too)
_LM_HEAD_KEYS = ("+:lm_head", "lm_head")


class QuantError(ValueError):
    """A quantization setting or quantized tensor is invalid."""


# ---- settings ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantSpec:
    """bits (4 or 8), group size g along Din (32, 64 or 128), symmetric or not; zero_offset: what
    a reader adds to the stored zero (1: checkpoint_format "gptq", 0: "gptq_v2")."""

    bits: int
    group_size: int = 128
    sym: bool = True
    zero_offset: int = FORMATS[WRITE_FORMAT]

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise QuantError(f"bits = {self.bits!r}; supported: {', '.join(map(str, BITS))}")
        if self.group_size not in GROUP_SIZES:
            raise QuantError(f"group_size = {self.group_size!r}; supported: "
                             f"{', '.join(map(str, GROUP_SIZES))}")
        if not isinstance(self.sym, bool):
            raise QuantError(f"sym = {self.sym!r}; expected true or false")
        if self.zero_offset not in (0, 1):
            raise QuantError(f"zero_offset = {self.zero_offset!r}; expected 0 (v2) or 1 (v1)")

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @classmethod
    def from_name(cls, quant: str, group_size: int = 128, sym: bool = False) -> "QuantSpec":
        """`load(quant="int8"|"int4")`."""
        if quant not in QUANT_NAMES:
            raise QuantError(f"quant = {quant!r}; supported: {', '.join(QUANT_NAMES)} (or None)")
        return cls(QUANT_NAMES[quant], group_size, sym)

    def to_config(self, lm_head: "QuantSpec | None" = None) -> dict:
        """`quantization_config` of config.json (the keys GPTQ readers look at); lm_head: the
        lm_head's format when it is quantized too (`"lm_head": true`, and a `dynamic` override
        for what differs from this spec)."""
        fmt = next(k for k, v in FORMATS.items() if v == self.zero_offset)
        qc = {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
              "sym": self.sym, "desc_act": False, "checkpoint_format": fmt,
              "lm_head": lm_head is not None, "static_groups": False, "true_sequential": True,
              "meta": {"quantizer": "moe_engine round-to-nearest"}}
        if lm_head is not None:
            if lm_head.zero_offset != self.zero_offset:
                raise QuantError("the lm_head and the model must share one checkpoint_format (zero_offset)")
            diff = {k: getattr(lm_head, k) for k in ("bits", "group_size", "sym")
                    if getattr(lm_head, k) != getattr(self, k)}
            if diff:
                qc["dynamic"] = {_LM_HEAD_KEYS[0]: diff}
        return qc

    @classmethod
    def from_config(cls, qc, source: str = "config.json") -> "QuantSpec":
        """Parse `quantization_config`; every unsupported value raises QuantError naming it."""
        if not isinstance(qc, dict):
            raise QuantError(f"{source}: quantization_config = {qc!r} must be a JSON object")

        def bad(key, expected):
            raise QuantError(f"{source}: quantization_config.{key} = {qc.get(key)!r}; "
                             f"supported: {expected}")

        if qc.get("quant_method") != "gptq":
            bad("quant_method", '"gptq"')
        if qc.get("desc_act", False) not in (False, None):
            bad("desc_act", "false (act-order checkpoints are not supported)")
        if qc.get("lm_head", False) not in (False, None, True):
            bad("lm_head", "true or false")
        _lm_head_override(qc, source)  # the one `dynamic` we read; anything else is refused
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in FORMATS:
            bad("checkpoint_format", " or ".join(f'"{f}"' for f in FORMATS))
        for key, ok in (("bits", BITS), ("group_size", GROUP_SIZES)):
            v = qc.get(key)
            if isinstance(v, bool) or v not in ok:
                bad(key, ", ".join(map(str, ok)))
        sym = qc.get("sym", True)
        if not isinstance(sym, bool):
            bad("sym", "true or false")
        return cls(qc["bits"], qc["group_size"], sym, FORMATS[fmt])


def _lm_head_override(qc: dict, source: str) -> dict:
    """The `dynamic` override of the module lm_head ({} when none); any other `dynamic` entry
    (per-layer settings, negative matches) is refused."""
    dyn = qc.get("dynamic")
    if not dyn:
        return {}
    if not isinstance(dyn, dict) or len(dyn) != 1 or next(iter(dyn)) not in _LM_HEAD_KEYS:
        raise QuantError(f"{source}: quantization_config.dynamic = {dyn!r}; supported: absent, or one "
                         f"override of the lm_head ({{\"{_LM_HEAD_KEYS[0]}\": {{\"bits\": 8}}}} with "
                         "\"lm_head\": true); per-module settings of other modules are not supported")
    over = next(iter(dyn.values()))
    if not isinstance(over, dict) or not set(over) <= {"bits", "group_size", "sym", "desc_act"} \
            or over.get("desc_act", False) not in (False, None):
        raise QuantError(f"{source}: quantization_config.dynamic lm_head override = {over!r}; supported "
                         "keys: bits, group_size, sym (desc_act false)")
    if not qc.get("lm_head"):
        raise QuantError(f"{source}: quantization_config.dynamic overrides the lm_head but lm_head is "
                         f"{qc.get('lm_head')!r}; expected true")
    return {k: v for k, v in over.items() if k != "desc_act"}


def quant_spec_of(config) -> QuantSpec | None:
    """The QuantSpec of a ModelConfig read from a GPTQ checkpoint, None for an unquantized one."""
    qc = config.extra.get("quantization_config")
    return None if qc is None else QuantSpec.from_config(qc, config.source)


def lm_head_spec_of(config) -> QuantSpec | None:
    """The QuantSpec of a GPTQ checkpoint's lm_head (`"lm_head": true`, with any `dynamic`
    override of it), None when the lm_head is stored unquantized."""
    spec = quant_spec_of(config)
    if spec is None or not config.extra["quantization_config"].get("lm_head"):
        return None
    over = _lm_head_override(config.extra["quantization_config"], config.source)
    try:
        return QuantSpec(over.get("bits", spec.bits), over.get("group_size", spec.group_size),
                         over.get("sym", spec.sym), spec.zero_offset)
    except QuantError as e:
        raise QuantError(f"{config.source}: quantization_config.dynamic lm_head override: {e}") from None


def lm_head_spec(spec: QuantSpec) -> QuantSpec:
    """The format of a quantized lm_head in a model quantized as `spec` (the option's rule):
    LM_HEAD_BITS, with the model's group size, symmetry and zero-point convention."""
    return QuantSpec(LM_HEAD_BITS, spec.group_size, spec.sym, spec.zero_offset)


# ---- packing ------------------------------------------------------------------------------------

def _to_int32(v: Tensor) -> Tensor:
    """Non-negative int64 words < 2^32 -> the int32 with the same bits."""
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def pack_rows(q: Tensor, bits: int) -> Tensor:
    """[..., R, C] integers in [0, 2^bits) -> int32 [..., R / p, C]: p consecutive rows per word,
    row p*i + j in bits [bits*j, bits*j + bits) of word i."""
    p = 32 // bits
    *lead, R, C = q.shape
    if R % p:
        raise QuantError(f"cannot pack {R} rows {p} to a word ({bits}-bit): {R} % {p} != 0")
    q = q.to(torch.int64).reshape(*lead, R // p, p, C)
    shifts = (torch.arange(p, dtype=torch.int64) * bits).view(p, 1)
    return _to_int32((q << shifts).sum(-2))


def unpack_rows(words: Tensor, bits: int) -> Tensor:
    """Inverse of pack_rows: int32 [..., R / p, C] -> int32 [..., R, C] in [0, 2^bits)."""
    p = 32 // bits
    *lead, Rp, C = words.shape
    shifts = (torch.arange(p, dtype=torch.int32) * bits).view(p, 1)
    vals = (words.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then mask
    return vals.reshape(*lead, Rp * p, C)


def pack_cols(z: Tensor, bits: int) -> Tensor:
    """[..., R, C] -> int32 [..., R, C / p], packed along the last dim (qzeros)."""
    return pack_rows(z.transpose(-1, -2), bits).transpose(-1, -2).contiguous()


def unpack_cols(words: Tensor, bits: int) -> Tensor:
    return unpack_rows(words.transpose(-1, -2), bits).transpose(-1, -2).contiguous()


# ---- the quantized weight -----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized linear weight of logical shape [..., Dout, Din] as the GPTQ tensors (module doc).
    g_idx is not stored: with desc_act false it is k // group_size (the loader checks it)."""

    qweight: Tensor  # int32 [..., Din / p, Dout]
    scales: Tensor   # fp16 [..., G, Dout]
    qzeros: Tensor   # int32 [..., G, Dout / p]
    bits: int
    group_size: int
    sym: bool
    zero_offset: int = 1

    def __post_init__(self) -> None:
        QuantSpec(self.bits, self.group_size, self.sym, self.zero_offset)  # validates
        p = 32 // self.bits
        for name, t, dt in (("qweight", self.qweight, torch.int32), ("qzeros", self.qzeros, torch.int32),
                            ("scales", self.scales, (torch.float16, torch.bfloat16))):
            if not isinstance(t, Tensor) or t.dim() < 2 or t.dtype not in (dt if isinstance(dt, tuple) else (dt,)):
                raise QuantError(f"{name} must be a >= 2-d {dt} tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
        lead, Dout, Din = self.qweight.shape[:-2], self.qweight.shape[-1], self.qweight.shape[-2] * p
        G = -(-Din // self.group_size)
        want = {"scales": (*lead, G, Dout), "qzeros": (*lead, G, Dout // p)}
        for name, shape in want.items():
            if tuple(getattr(self, name).shape) != shape or Dout % p:
                raise QuantError(f"{name} has shape {list(getattr(self, name).shape)}; expected "
                                 f"{list(shape)} for qweight {list(self.qweight.shape)} ({self.bits}-bit, "
                                 f"group size {self.group_size}; Dout = {Dout} must be a multiple of {p})")

    # -- shape ----------------------------------------------------------------------------------
    @property
    def Dout(self) -> int:
        return self.qweight.shape[-1]

    @property
    def Din(self) -> int:
        return self.qweight.shape[-2] * (32 // self.bits)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical weight shape [..., Dout, Din]."""
        return (*self.qweight.shape[:-2], self.Dout, self.Din)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros))

    @property
    def g_idx(self) -> Tensor:
        return group_index(self.Din, self.group_size)

    def _like(self, **tensors) -> "QuantizedWeight":
        return QuantizedWeight(tensors["qweight"], tensors["scales"], tensors["qzeros"],
                               self.bits, self.group_size, self.sym, self.zero_offset)

    def __getitem__(self, i) -> "QuantizedWeight":
        """Index the leading dims (expert e of an [E, Dout, Din] weight)."""
        if self.qweight.dim() == 2:
            raise QuantError("a single [Dout, Din] quantized weight has no leading dim to index")
        return self._like(qweight=self.qweight[i], scales=self.scales[i], qzeros=self.qzeros[i])

    # -- values ---------------------------------------------------------------------------------
    def codes(self) -> tuple[Tensor, Tensor]:
        """(q int32 [..., Din, Dout], z int32 [..., G, Dout]): the integer weights and true zero points."""
        return unpack_rows(self.qweight, self.bits), unpack_cols(self.qzeros, self.bits) + self.zero_offset

    def kernel_qzeros(self) -> Tensor:
        """qzeros holding the true zero points (the stored ones + zero_offset, repacked), as the
        quantized kernels' repacks take them (ops/quant.py); the stored tensor when the offset
        is 0. A zero beyond 2^bits - 1 is a QuantError."""
        if not self.zero_offset:
            return self.qzeros
        z = unpack_cols(self.qzeros, self.bits) + self.zero_offset
        if int(z.max()) >= 1 << self.bits:
            raise QuantError(f"a {self.bits}-bit zero point reads {int(z.max())} (stored "
                             f"{int(z.max()) - self.zero_offset} + zero_offset {self.zero_offset}); the quantized "
                             f"kernels take zeros in [0, {(1 << self.bits) - 1}]")
        return pack_cols(z, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [..., Dout, Din]: scales * (q - z), computed in fp32 (exact: |q - z| <= 2^b and an
        fp16 scale fit a float's mantissa), then cast to `dtype`."""
        q, z = self.codes()
        gi = self.g_idx.to(q.device)
        w = self.scales.float().index_select(-2, gi) * (q - z.index_select(-2, gi)).float()
        return w.transpose(-1, -2).to(dtype).contiguous()

    def linear(self, x: Tensor) -> Tensor:
        """The PyTorch reference product x [..., Din] @ W^T -> [..., Dout] in x's dtype (fp32 math)."""
        if self.qweight.dim() != 2:
            raise QuantError(f"linear needs an [Dout, Din] weight, got {list(self.shape)}")
        if x.shape[-1] != self.Din:
            raise QuantError(f"x has {x.shape[-1]} input features; the weight has Din = {self.Din}")
        return (x.float() @ self.dequantize().t()).to(x.dtype)

    # -- assembling the model's stacked weights -------------------------------------------------
    @staticmethod
    def _same(ws: list["QuantizedWeight"]) -> None:
        keys = {(w.bits, w.group_size, w.sym, w.zero_offset) for w in ws}
        if len(keys) != 1:
            raise QuantError(f"cannot combine quantized weights with different settings {sorted(keys)}")

    @staticmethod
    def cat_rows(ws: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack along Dout (gate|up, q|k|v): the GPTQ tensors concatenate along their Dout axis."""
        QuantizedWeight._same(ws)
        return ws[0]._like(qweight=torch.cat([w.qweight for w in ws], -1),
                           scales=torch.cat([w.scales for w in ws], -1),
                           qzeros=torch.cat([w.qzeros for w in ws], -1))

    @staticmethod
    def stack(ws: list["QuantizedWeight"]) -> "QuantizedWeight":
        """A new leading dim (the experts of a layer)."""
        return QuantizedWeight.stack_cat([[w] for w in ws])

    @staticmethod
    def stack_cat(parts: list[list["QuantizedWeight"]]) -> "QuantizedWeight":
        """stack([cat_rows(ps) for ps in parts]) with one copy of each tensor (the loader's
        experts: gate|up per expert, then the layer's experts stacked)."""
        flat = [w for ps in parts for w in ps]
        QuantizedWeight._same(flat)

        def build(attr: str) -> Tensor:
            first = [getattr(w, attr) for w in parts[0]]
            out = first[0].new_empty((len(parts), *first[0].shape[:-1], sum(t.shape[-1] for t in first)))
            for e, ps in enumerate(parts):
                torch.cat([getattr(w, attr) for w in ps], -1, out=out[e])
            return out
        return flat[0]._like(qweight=build("qweight"), scales=build("scales"), qzeros=build("qzeros"))

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Inverse of cat_rows."""
        p = 32 // self.bits
        if sum(sizes) != self.Dout or any(s % p for s in sizes):
            raise QuantError(f"cannot split Dout = {self.Dout} into {sizes} (each a multiple of {p})")
        parts = zip(self.qweight.split(sizes, -1), self.scales.split(sizes, -1),
                    self.qzeros.split([s // p for s in sizes], -1))
        return [self._like(qweight=a.contiguous(), scales=b.contiguous(), qzeros=c.contiguous())
                for a, b, c in parts]


def group_index(Din: int, group_size: int) -> Tensor:
    """g_idx int32 [Din] = k // g (desc_act false)."""
    return torch.arange(Din, dtype=torch.int32) // group_size


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


# ---- round-to-nearest quantization --------------------------------------------------------------

def _check_quantizable(w, spec: QuantSpec) -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.dim() < 2:
        raise QuantError(f"quantize needs a >= 2-d float tensor [..., Dout, Din], got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {list(getattr(w, 'shape', []))}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    Dout, Din = w.shape[-2:]
    if Din % spec.pack or Dout % spec.pack:
        raise QuantError(f"weight [Dout, Din] = {[Dout, Din]}: both must be multiples of {spec.pack} for "
                         f"{spec.bits}-bit GPTQ packing")


def quantize(w: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of w [..., Dout, Din] (any float dtype; computed in
    fp32) by the rule of the module docstring. Din and Dout must be multiples of 32 / bits (the GPTQ
    packing); the last group may be partial (Din % g != 0).

    Runs csrc/cpu/quantize_rtn.cpp (one pass over the weight, every core) when the compiled
    module is there, else `quantize_reference`; both give the same bits
    (tests/test_quant.py compares them)."""
    _check_quantizable(w, spec)
    from .ops.backend import BackendUnavailable, native_module
    try:
        mod = native_module("cpu")
    except BackendUnavailable:  # no compiled module: the PyTorch path
        return quantize_reference(w, spec)
    *lead, Dout, Din = w.shape
    x = w.detach().to("cpu")
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x = x.reshape(-1, Dout, Din).contiguous()
    E, p, G = x.shape[0], spec.pack, -(-Din // spec.group_size)
    qweight = torch.empty((E, Din // p, Dout), dtype=torch.int32)
    scales = torch.empty((E, G, Dout), dtype=torch.float16)
    qzeros = torch.empty((E, G, Dout // p), dtype=torch.int32)
    prm = mod.QRtnParams()
    prm.w, prm.qweight, prm.scales, prm.qzeros = (x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                                  qzeros.data_ptr())
    prm.dtype = mod.DType.f32 if x.dtype == torch.float32 else mod.DType.bf16
    prm.E, prm.Dout, prm.Din, prm.bits, prm.group_size = E, Dout, Din, spec.bits, spec.group_size
    prm.zero_offset, prm.sym = spec.zero_offset, spec.sym
    try:
        mod.quantize_rtn_cpu(prm)
    except ValueError as e:
        raise QuantError(str(e).partition(": ")[2] or str(e)) from None
    return QuantizedWeight(qweight.reshape(*lead, Din // p, Dout), scales.reshape(*lead, G, Dout),
                           qzeros.reshape(*lead, G, Dout // p), spec.bits, spec.group_size, spec.sym,
                           spec.zero_offset)


def quantize_reference(w: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """`quantize` in PyTorch ops, step by step as the module docstring states the rule: the
    reference the compiled quantizer is tested against, and the path without it."""
    _check_quantizable(w, spec)
    *lead, Dout, Din = w.shape
    p, g, b = spec.pack, spec.group_size, spec.bits
    x = w.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise QuantError("weight has non-finite values; cannot quantize")
    G = -(-Din // g)
    # zero padding changes neither max|w| nor min(w, 0) / max(w, 0): every statistic below
    # includes 0 by construction
    xg = torch.nn.functional.pad(x, (0, G * g - Din)).reshape(*lead, Dout, G, g)
    maxq = (1 << b) - 1
    if spec.sym:
        s = (2 * xg.abs().amax(-1) / maxq).clamp_min(_MIN_SCALE)
        s16 = _fp16(s)
        z = torch.full_like(s16, 1 << (b - 1), dtype=torch.int32)
    else:
        lo, hi = xg.amin(-1).clamp_max(0), xg.amax(-1).clamp_min(0)
        s16 = _fp16(((hi - lo) / maxq).clamp_min(_MIN_SCALE))
        zf = torch.round(-lo / s16.float())
        low = zf < 1  # z = 0 does not survive the v1 format: put the zero at 1 and widen s
        if bool(low.any()):
            s16 = torch.where(low, _fp16((hi / (maxq - 1)).clamp_min(_MIN_SCALE)), s16)
            zf = torch.where(low, torch.ones_like(zf), zf)
        z = zf.clamp(1, maxq).to(torch.int32)
    q = (torch.round(xg / s16.float().unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, maxq)
    q = q.reshape(*lead, Dout, G * g)[..., :Din].to(torch.int32)                # [..., Dout, Din]
    return QuantizedWeight(pack_rows(q.transpose(-1, -2), b), s16.transpose(-1, -2).contiguous(),
                           pack_cols((z - spec.zero_offset).transpose(-1, -2) & maxq, b),
                           b, g, spec.sym, spec.zero_offset)


def _fp16(s: Tensor) -> Tensor:
    """s rounded UP to fp16, so the group's extreme value stays inside the grid (the clamp
    at q = 0 / 2^b - 1 never adds error beyond half a step)."""
    s16 = s.to(torch.float16)
    s16 = torch.where(s16.float() < s, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    if not bool(torch.isfinite(s16).all()):
        raise QuantError(f"a group scale ({float(s.max()):.3g}) overflows fp16; weights this large "
                         "cannot be stored in the GPTQ format")
    return s16


# ---- sizes (memory preflight) -------------------------------------------------------------------

def quantized_nbytes(Dout: int, Din: int, bits: int, group_size: int) -> int:
    """Bytes of qweight + scales + qzeros + g_idx for one [Dout, Din] linear."""
    G = -(-Din // group_size)
    return Din * Dout * bits // 8 + G * Dout * 2 + G * Dout * bits // 8 + Din * 4


def layout_nbytes(layout: dict[str, tuple[int, ...]], itemsize: int, spec: QuantSpec | None,
                  skip: set[str] = frozenset(), lm_head: QuantSpec | None = None) -> int:
    """Bytes of a checkpoint layout (loader.checkpoint_layout) with the quantizable linears in
    `spec`'s format (None: all in `itemsize` bytes per element) and the lm_head in `lm_head`'s
    (None: `itemsize`)."""
    total = 0
    for name, shape in layout.items():
        if name in skip:
            continue
        if lm_head is not None and name == LM_HEAD:
            total += quantized_nbytes(shape[0], shape[1], lm_head.bits, lm_head.group_size)
        elif spec is not None and QUANTIZABLE.fullmatch(name):
            total += quantized_nbytes(shape[0], shape[1], spec.bits, spec.group_size)
        else:
            total += math.prod(shape) * itemsize
    return total


# ---- the CLIs' flags (one definition for generate, lens, ...) -------------------------------------

def add_quant_arguments(ap) -> None:
    """--quant int8|int4, --group-size, --sym on an argparse parser."""
    ap.add_argument("--quant", choices=list(QUANT_NAMES),
                    help="quantize the linears on load; a GPTQ checkpoint needs no flag (default: the "
                         "checkpoint's own weights)")
    ap.add_argument("--group-size", type=int, default=128, choices=list(GROUP_SIZES),
                    help="with --quant: input channels per scale (default: %(default)s)")
    ap.add_argument("--sym", action="store_true", help="with --quant: symmetric (default: asymmetric)")
    ap.add_argument("--quant-lm-head", action="store_true",
                    help=f"quantize the lm_head to {LM_HEAD_BITS}-bit on load (the model's group size and "
                         "symmetry; default: as the checkpoint stores it)")


def quant_kwargs(args) -> dict:
    """Model.load keyword arguments from add_quant_arguments' flags."""
    return {"quant": args.quant, "group_size": args.group_size, "sym": args.sym,
            "quant_lm_head": args.quant_lm_head}


__all__ = ["add_quant_arguments", "quant_kwargs", "BITS", "GROUP_SIZES", "LM_HEAD", "LM_HEAD_BITS", "QUANTIZABLE",
           "QuantError", "QuantSpec", "QuantizedWeight",
           "group_index", "is_quantized", "layout_nbytes", "lm_head_spec", "lm_head_spec_of", "pack_cols", "pack_rows",
           "quant_spec_of",
           "quantize", "quantized_nbytes", "unpack_cols", "unpack_rows"]
