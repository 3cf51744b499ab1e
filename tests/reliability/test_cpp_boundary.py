"""The C++ boundary refuses what it is handed wrong (issue 13, item 1).

Every entry point of moe_engine._C (cpu launchers) and moe_engine._C_emu (the CUDA launchers,
compiled through the emulator) is driven by a seeded fuzzer: a valid call is built on buffers
far larger than it needs, then one to three wrong values from the entry point's table (a null
pointer it reads, a negative or zero size, sizes that disagree, a value out of range) are put
in; the call must raise a Python exception (pybind11 turns std::invalid_argument into
ValueError) and never crash. tools/fuzz_asan.sh runs this file against an ASan build, where an
out-of-bounds access that happened to land in the generous buffers is reported too.

What this cannot show: a buffer shorter than the sizes claim. The launchers take raw addresses,
so the length behind one is invisible to them; the Python dispatchers check the tensors
(ops/backend.check) and Model._check_cache the KV cache, which the tests at the end pin.
"""
from __future__ import annotations

import random

import pytest
import torch

from moe_engine.ops import available_backends
from moe_engine.ops import backend as backends

SEED = 1313
TRIALS = 25        # random combinations per entry point, on top of every single mutation
BUF = 1 << 16      # bytes behind every pointer of a valid call: more than any call here reads


class Case:
    """A fresh valid call: `p` the Params, `run()` the call, `keep` the buffers behind it."""

    def __init__(self, mod):
        self.mod, self.keep = mod, []

    def buf(self, nbytes: int = BUF, fill=None, dtype=torch.uint8) -> int:
        t = torch.zeros(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
        if fill is not None:
            t.fill_(fill)
        self.keep.append(t)
        return t.data_ptr()

    def int32(self, value: int) -> int:
        return self.buf(64, fill=value, dtype=torch.int32)


def _set(**fields):
    def mutate(case):
        for k, v in fields.items():
            setattr(case.p, k, v)
    mutate.label = ", ".join(f"{k}={v}" for k, v in fields.items())
    return mutate


def _null(*names):
    return [_set(**{n: 0}) for n in names]


# ---- cpu entry points (_C) ------------------------------------------------------------------

def route_cpu(mod):
    c = Case(mod)
    p = c.p = mod.RouteParams()
    p.router_logits, p.logits_dtype, p.logits_stride = c.buf(), mod.DType.f32, 8
    p.T, p.E, p.k_max, p.k = 4, 8, 2, c.int32(2)
    p.topk_ids, p.topk_weights, p.mask_mode = c.buf(), c.buf(), mod.MaskMode.reroute
    c.run = lambda: mod.route_cpu(p)
    return c


def _k_value(v):
    def mutate(case):
        case.p.k = case.int32(v)
    mutate.label = f"*k={v}"
    return mutate


def _force_value(v):
    def mutate(case):
        case.p.force_expert = case.int32(v)
    mutate.label = f"*force_expert={v}"
    return mutate


ROUTE_BAD = [*_null("router_logits", "k", "topk_ids", "topk_weights"),
             _set(T=-1), _set(E=0), _set(E=-3), _set(E=1 << 20), _set(k_max=-1), _set(k_max=9),
             _set(logits_stride=7), _k_value(3), _k_value(-1), _force_value(8), _force_value(-2)]


def align_cpu(mod):
    c = Case(mod)
    p = c.p = mod.AlignParams()
    p.topk_ids, p.T, p.k_max, p.E, p.block_m = c.buf(), 4, 2, 8, 16
    p.expert_counts, p.expert_offsets, p.sorted_slots = c.buf(), c.buf(), c.buf()
    p.tile_experts, p.num_padded = c.buf(), c.buf()
    c.run = lambda: mod.align_cpu(p)
    return c


ALIGN_BAD = [*_null("topk_ids", "expert_counts", "expert_offsets", "sorted_slots", "tile_experts", "num_padded"),
             _set(T=-1), _set(k_max=-1), _set(E=0), _set(E=5000), _set(block_m=0)]


def combine_cpu(mod):
    c = Case(mod)
    p = c.p = mod.CombineParams()
    p.expert_out, p.topk_weights, p.topk_ids, p.out = c.buf(), c.buf(), c.buf(fill=255), c.buf()
    p.dtype, p.T, p.k_max, p.D = mod.DType.f32, 4, 2, 16
    c.run = lambda: mod.combine_cpu(p)
    return c


COMBINE_BAD = [*_null("expert_out", "topk_weights", "topk_ids", "out"),
               _set(T=-1), _set(k_max=-1), _set(D=0), _set(D=-8)]


def pack_weights_cpu(mod):
    c = Case(mod)
    p = c.p = mod.PackParams()
    p.src, p.dst, p.dtype, p.E, p.Dout, p.Din, p.gate_up = c.buf(), c.buf(), mod.DType.f32, 2, 32, 16, True
    c.run = lambda: mod.pack_weights_cpu(p)
    return c


PACK_BAD = [*_null("src", "dst"), _set(E=0), _set(Dout=-1), _set(Din=0), _set(Dout=31)]


def expert_ffn_cpu(mod):
    c = Case(mod)
    p = c.p = mod.ExpertFFNParams()
    p.x, p.w13, p.w2, p.topk_ids, p.expert_out, p.workspace = (c.buf() for _ in range(6))
    p.dtype, p.T, p.k_max, p.D, p.F, p.E = mod.DType.f32, 2, 2, 16, 16, 4
    c.run = lambda: mod.expert_ffn_cpu(p)
    return c


FFN_BAD = [*_null("x", "w13", "w2", "topk_ids", "expert_out", "workspace"),
           _set(T=-1), _set(k_max=-1), _set(D=0), _set(F=0), _set(E=0), _set(E=-1)]


def linear_cpu(mod):
    c = Case(mod)
    p = c.p = mod.LinearParams()
    p.x, p.w, p.y, p.dtype, p.T, p.Dout, p.Din = c.buf(), c.buf(), c.buf(), mod.DType.f32, 2, 32, 16
    c.run = lambda: mod.linear_cpu(p)
    return c


LINEAR_BAD = [*_null("x", "w", "y"), _set(T=-1), _set(Dout=0), _set(Din=0), _set(Din=-16)]


def _fmt(mod, bits, group_size=32):
    f = mod.QFormat()
    f.bits, f.group_size = bits, group_size
    return f


def _formats(**fields):
    """Set QFormat fields (name -> (bits, group_size)) of the Params; bits 0 = bf16/fp32 panels."""
    def mutate(case):
        for k, (bits, g) in fields.items():
            setattr(case.p, k, _fmt(case.mod, bits, g))
    mutate.label = ", ".join(f"{k}=int{b} g{g}" for k, (b, g) in fields.items())
    return mutate


# the one-call paths' per-weight formats: a bad width or group, or w13 and w2 of different kinds
# (each entry is wrong on its own and in any combination)
BAD_PAIR_FORMATS = [_formats(fmt13=(3, 32), fmt2=(3, 32)), _formats(fmt13=(8, 16), fmt2=(8, 16)),
                    _formats(fmt13=(8, 32)), _formats(fmt2=(4, 48))]


def moe_layer_cpu(mod):
    c = Case(mod)
    p = c.p = mod.MoELayerParams()
    for f in ("x", "residual", "router", "w13", "w2", "router_logits", "topk_ids", "topk_weights",
              "expert_out", "out", "workspace"):
        setattr(p, f, c.buf())
    p.k, p.force_expert = c.int32(2), c.int32(-1)
    p.mask_mode, p.dtype = mod.MaskMode.reroute, mod.DType.f32
    p.T, p.D, p.E, p.F, p.S, p.k_max = 2, 16, 4, 16, 0, 2
    c.run = lambda: mod.moe_layer_cpu(p)
    return c


def _shared_without_width(case):
    case.p.shared_w13, case.p.shared_w2 = case.buf(), case.buf()
    case.p.shared_out, case.p.shared_ids = case.buf(), case.buf()
    case.p.S = 0
_shared_without_width.label = "shared weights with S=0"


MOE_LAYER_BAD = [*_null("x", "residual", "router", "w13", "w2", "router_logits", "topk_ids", "topk_weights",
                        "expert_out", "out", "workspace", "k"),
                 _set(T=-1), _set(D=0), _set(E=0), _set(F=0), _set(S=-1), _set(k_max=-1), _set(k_max=5),
                 _set(shared_w13=1 << 20), _shared_without_width, _k_value(3), *BAD_PAIR_FORMATS]


def attention_decode_cpu(mod):
    c = Case(mod)
    p = c.p = mod.AttnDecodeParams()
    p.q, p.k_cache, p.v_cache, p.valid, p.out, p.workspace = (c.buf() for _ in range(6))
    p.scale, p.dtype = 0.5, mod.DType.f32
    p.B, p.H, p.Hkv, p.hd, p.Tkv, p.Tkv_cap, p.valid_stride = 2, 4, 2, 16, 3, 8, 8
    c.run = lambda: mod.attention_decode_cpu(p)
    return c


ATTN_BAD = [*_null("q", "k_cache", "v_cache", "valid", "out", "workspace"),
            _set(B=-1), _set(H=0), _set(Hkv=0), _set(H=3), _set(hd=0), _set(hd=2048), _set(Tkv=0), _set(Tkv=9),
            _set(valid_stride=2)]


def attention_block_decode_cpu(mod):
    c = Case(mod)
    p = c.p = mod.AttnBlockParams()
    for f in ("x", "qkv", "o", "cos", "sin", "k_cache", "v_cache", "valid", "qkv_buf", "attn_buf", "scores", "out"):
        setattr(p, f, c.buf())
    p.scale, p.dtype = 0.5, mod.DType.f32
    p.B, p.D, p.H, p.Hkv, p.hd, p.pos, p.Tkv_cap, p.valid_stride = 2, 32, 4, 2, 8, 2, 8, 8
    c.run = lambda: mod.attention_block_decode_cpu(p)
    return c


BLOCK_BAD = [*_null("x", "qkv", "o", "cos", "sin", "k_cache", "v_cache", "valid", "qkv_buf", "attn_buf",
                    "scores", "out"),
             _set(B=-1), _set(D=0), _set(H=0), _set(Hkv=0), _set(H=3), _set(hd=7), _set(hd=2048), _set(hd=0),
             _set(pos=-1), _set(pos=8), _set(valid_stride=2),
             _formats(qkv_fmt=(8, 32)),  # quantized without a workspace
             _formats(o_fmt=(5, 32)), _formats(qkv_fmt=(4, 100), o_fmt=(4, 32))]


def rms_norm_cpu(mod):
    c = Case(mod)
    p = c.p = mod.RMSNormParams()
    p.x, p.w, p.out, p.eps, p.dtype, p.T, p.D = c.buf(), c.buf(), c.buf(), 1e-6, mod.DType.f32, 2, 16
    c.run = lambda: mod.rms_norm_cpu(p)
    return c


RMS_BAD = [*_null("x", "w", "out"), _set(T=-1), _set(D=0), _set(D=-4)]


def decode_step_cpu(mod):
    c = Case(mod)
    layer = mod.DecodeLayer()
    for f in ("input_norm", "post_norm", "qkv", "o", "w13", "w2"):
        setattr(layer, f, c.buf())
    layer.F = 16
    c.layers = mod.DecodeLayers()
    c.layers.append(layer)
    p = c.p = mod.DecodeStepParams()
    p.ids, p.next_pos = c.buf(64, 0, torch.int64), c.buf(64, 0, torch.int64)
    for f in ("embed", "rope_cos", "rope_sin", "k_cache", "v_cache", "valid", "final_norm", "lm_head", "logits",
              "workspace"):
        setattr(p, f, c.buf())
    p.k, p.force_expert = c.int32(1), c.int32(-1)
    p.eps, p.scale, p.dtype, p.mask_mode = 1e-6, 0.5, mod.DType.f32, mod.MaskMode.reroute
    p.B, p.D, p.H, p.Hkv, p.hd, p.E, p.k_max, p.V = 1, 16, 2, 1, 8, 0, 0, 32
    p.pos, p.rope_len, p.Tkv_cap, p.valid_stride = 0, 4, 4, 4
    p.cache_bytes = 1 * 1 * 1 * 4 * 8 * 4  # L B Hkv Tkv_cap hd, f32
    c.run = lambda: mod.decode_step_cpu(p, c.layers)
    return c


def _ids_value(v):
    def mutate(case):
        case.p.ids = case.buf(64, v, torch.int64)
    mutate.label = f"ids[0]={v}"
    return mutate


def _layer(**fields):
    def mutate(case):
        if not len(case.layers):
            return  # combined with "no layers": nothing to edit (that alone is refused)
        ly = case.layers[0]
        for k, v in fields.items():
            setattr(ly, k, v)
        case.layers[0] = ly  # bind_vector hands out copies
    mutate.label = "layer: " + ", ".join(f"{k}={v}" for k, v in fields.items())
    return mutate


def _layer_formats(**fields):
    def mutate(case):
        if not len(case.layers):
            return
        ly = case.layers[0]
        for k, (bits, g) in fields.items():
            setattr(ly, k, _fmt(case.mod, bits, g))
        case.layers[0] = ly
    mutate.label = "layer: " + ", ".join(f"{k}=int{b} g{g}" for k, (b, g) in fields.items())
    return mutate


def _no_layers(case):
    case.layers.clear()
_no_layers.label = "no layers"


DECODE_BAD = [*_null("ids", "embed", "rope_cos", "rope_sin", "next_pos", "k_cache", "v_cache", "valid",
                     "final_norm", "lm_head", "logits", "workspace"),
              _set(B=0), _set(D=0), _set(H=0), _set(Hkv=0), _set(H=3, Hkv=2), _set(hd=7), _set(hd=2048), _set(V=0),
              _set(E=-1), _set(k_max=1), _set(Tkv_cap=0), _set(rope_len=0), _set(pos=-1), _set(pos=4),
              _set(valid_stride=0), _set(cache_bytes=2 * 128), _set(cache_bytes=64), _set(cache_bytes=-1),
              _ids_value(32), _ids_value(-1), _no_layers, _layer(qkv=0), _layer(F=0), _layer(router=1 << 20),
              _layer(shared_w13=1 << 20), _layer(S=4), _layer_formats(qkv_fmt=(3, 32)),
              _layer_formats(o_fmt=(8, 48)), _layer_formats(fmt13=(4, 32)), _layer_formats(fmt2=(8, 24))]


def decode_step_workspace_bytes(mod):
    c = decode_step_cpu(mod)
    c.run = lambda: mod.decode_step_workspace_bytes(c.p, c.layers)
    return c


WS_BAD = [_set(B=0), _set(hd=7), _set(cache_bytes=256), _no_layers, _layer(F=0)]

CPU_ENTRIES = [
    (route_cpu, ROUTE_BAD), (align_cpu, ALIGN_BAD), (combine_cpu, COMBINE_BAD),
    (pack_weights_cpu, PACK_BAD), (expert_ffn_cpu, FFN_BAD), (linear_cpu, LINEAR_BAD),
    (moe_layer_cpu, MOE_LAYER_BAD), (attention_decode_cpu, ATTN_BAD),
    (attention_block_decode_cpu, BLOCK_BAD), (rms_norm_cpu, RMS_BAD), (decode_step_cpu, DECODE_BAD),
    (decode_step_workspace_bytes, WS_BAD),
]


# ---- CUDA launchers through the emulator (_C_emu) ---------------------------------------------

def route_cuda(mod):
    c = route_cpu(mod)
    c.run = lambda: mod.route_cuda(c.p)
    return c


def align_cuda(mod):
    c = align_cpu(mod)
    c.run = lambda: mod.align_cuda(c.p)
    return c


def combine_cuda(mod):
    c = combine_cpu(mod)
    c.run = lambda: mod.combine_cuda(c.p)
    return c


def expert_gemm_cuda(mod):
    c = Case(mod)
    p = c.p = mod.ExpertGemmParams()
    p.a, p.a_stride, p.w, p.c = c.buf(), 16, c.buf(), c.buf()
    # dense mode (sorted_slots, tile_experts, num_padded null): row i is slot i, expert 0
    p.T, p.k_max, p.E, p.D, p.F, p.capacity, p.block_m, p.up = 2, 1, 2, 16, 16, 2, 16, True
    c.run = lambda: mod.expert_gemm_cuda(p)
    return c


GEMM_BAD = [*_null("a", "w", "c"), _set(sorted_slots=1 << 20), _set(T=-1), _set(k_max=0), _set(E=0),
            _set(capacity=-1), _set(D=12), _set(F=0), _set(block_m=32), _set(a_stride=8), _set(a=8)]


def moe_decode_cuda(mod):
    c = Case(mod)
    p = c.p = mod.MoeDecodeParams()
    p.x, p.topk_ids, p.experts_gate_up, p.experts_down, p.act, p.expert_out = (c.buf() for _ in range(6))
    p.T, p.k_max, p.E, p.D, p.F = 2, 1, 2, 16, 16
    c.run = lambda: mod.moe_decode_cuda(p)
    return c


DECODE_CUDA_BAD = [*_null("x", "experts_gate_up", "experts_down", "act", "expert_out"),
                   _set(T=-1), _set(T=17), _set(k_max=0), _set(E=0), _set(D=12), _set(F=-8)]


def shared_expert_cuda(mod):
    c = Case(mod)
    p = c.p = mod.SharedExpertParams()
    p.x, p.x_stride, p.gate_up, p.down, p.act, p.shared_out = c.buf(), 16, c.buf(), c.buf(), c.buf(), c.buf()
    p.T, p.D, p.S = 2, 16, 16
    c.run = lambda: mod.shared_expert_cuda(p)
    return c


SHARED_BAD = [*_null("x", "gate_up", "down", "act", "shared_out"), _set(T=-1), _set(D=12), _set(S=0)]

# k and force_expert are device values on a GPU: the kernel clamps them (route.cu documents it),
# the host cannot read them without a sync, so they are not refusals there
ROUTE_CUDA_BAD = [m for m in ROUTE_BAD if not m.label.startswith("*")]
EMU_ENTRIES = [(route_cuda, ROUTE_CUDA_BAD), (align_cuda, ALIGN_BAD), (combine_cuda, COMBINE_BAD),
               (expert_gemm_cuda, GEMM_BAD), (moe_decode_cuda, DECODE_CUDA_BAD), (shared_expert_cuda, SHARED_BAD)]


def _mod(backend):
    if backend not in available_backends():
        pytest.skip(f"backend {backend} is not built")
    return backends.native_module(backend)


def _fuzz(mod, build, bad):
    valid = build(mod)
    valid.run()  # the unmutated call is accepted: every refusal below is the mutation's
    rng = random.Random(f"{SEED}:{build.__name__}")
    trials = [[m] for m in bad] + [rng.sample(bad, rng.randint(2, min(3, len(bad)))) for _ in range(TRIALS)]
    for muts in trials:
        case = build(mod)
        for m in muts:
            m(case)
        with pytest.raises((ValueError, TypeError)) as e:
            case.run()
            pytest.fail(f"{build.__name__} accepted " + "; ".join(m.label for m in muts))
        assert str(e.value), muts


@pytest.mark.parametrize("build,bad", CPU_ENTRIES, ids=[b.__name__ for b, _ in CPU_ENTRIES])
def test_cpu_entry_points_refuse_wrong_arguments(build, bad):
    _fuzz(_mod("cpu"), build, bad)


@pytest.mark.parametrize("build,bad", EMU_ENTRIES, ids=[b.__name__ for b, _ in EMU_ENTRIES])
def test_emu_entry_points_refuse_wrong_arguments(build, bad):
    """The emulator runs the CUDA launchers' host code as on a GPU; what it cannot show is a
    device-side fault of a kernel that was launched (none is: every case is refused first)."""
    _fuzz(_mod("emu"), build, bad)


def test_messages_name_the_argument():
    mod = _mod("cpu")
    c = decode_step_cpu(mod)
    c.p.lm_head = 0
    with pytest.raises(ValueError, match=r"decode_step_cpu: lm_head is a null pointer"):
        c.run()
    c = decode_step_cpu(mod)
    c.p.cache_bytes = 64
    with pytest.raises(ValueError, match=r"k_cache/v_cache hold 64 bytes.*need 128"):
        c.run()
    c = linear_cpu(mod)
    c.p.Din = 0
    with pytest.raises(ValueError, match=r"linear_cpu: bad sizes .*Din=0"):
        c.run()


def test_dtype_enum_is_checked_by_the_binding():
    mod = _mod("cpu")
    p = mod.LinearParams()
    with pytest.raises(TypeError):
        p.dtype = 7


def _qfmt(mod, bits=8, group_size=128):
    f = mod.QFormat()
    f.bits, f.group_size, f.scales_bf16 = bits, group_size, True
    return f


# (helper name, backends it is in, valid arguments (mod -> tuple), index of the size to break, its name)
SIZE_HELPERS = [
    ("pack_size_bytes", ["cpu"], lambda m: (m.DType.bf16, 4, 64, 32, True), [(1, "E"), (2, "Dout"), (3, "Din")]),
    ("expert_ffn_workspace_bytes", ["cpu"], lambda m: (m.DType.bf16, 3, 2, 4, 32),
     [(1, "T"), (2, "k_max"), (3, "E"), (4, "F")]),
    ("qpack_size_bytes", ["cpu"], lambda m: (4, 64, 128, _qfmt(m), True), [(0, "E"), (1, "Dout"), (2, "Din")]),
    ("linear_q_workspace_bytes", ["cpu"], lambda m: (3, 128, _qfmt(m)), [(0, "T"), (1, "Din")]),
    ("expert_ffn_q_workspace_bytes", ["cpu"], lambda m: (3, 2, 4, 128, 64, _qfmt(m), _qfmt(m)),
     [(0, "T"), (1, "k_max"), (2, "E"), (3, "D"), (4, "F")]),
    ("align_capacity", ["cpu", "emu"], lambda m: (3, 2, 4, 16), [(0, "T"), (1, "k_max"), (2, "E"), (3, "block_m")]),
    ("align_workspace_size", ["cpu", "emu"], lambda m: (3, 2, 4), [(0, "T"), (1, "k_max"), (2, "E")]),
    ("expert_gemm_block_m", ["emu"], lambda m: (3, 2, 4), [(0, "T"), (1, "k_max"), (2, "E")]),
]


@pytest.mark.parametrize("backend,name,args,sizes", [(b, n, a, s) for n, where, a, s in SIZE_HELPERS for b in where],
                         ids=[f"{b}-{h[0]}" for h in SIZE_HELPERS for b in h[1]])
def test_size_helpers_refuse_negative_sizes(backend, name, args, sizes):
    """A size helper is plain arithmetic: a negative size made a negative or garbage byte count
    that a caller could allocate. Each size is refused by name; the valid call still answers."""
    mod = _mod(backend)
    fn = getattr(mod, name)
    ok = args(mod)
    assert fn(*ok) >= 0
    for i, arg in sizes:
        bad = list(ok)
        bad[i] = -1
        with pytest.raises(ValueError, match=rf"{name}: {arg}=-1, expected >= \d"):
            fn(*bad)


def test_size_helpers_refuse_a_zero_divisor():
    mod = _mod("cpu")
    with pytest.raises(ValueError, match=r"align_capacity: block_m=0, expected >= 1"):
        mod.align_capacity(3, 2, 4, 0)
    with pytest.raises(ValueError, match=r"qpack_size_bytes: fmt.group_size=0, expected >= 1"):
        mod.qpack_size_bytes(4, 64, 128, _qfmt(mod, group_size=0), True)
