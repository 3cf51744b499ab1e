"""Quantized checkpoints end to end: `python -m moe_engine.quantize` writes a GPTQ checkpoint that
loads into exactly what quantize-on-load holds (same bits); a quantized model's logits are those
of the same model with the dequantized weights as plain tensors; the cpu backend agrees with the
torch reference on it (generation, taps, interventions) while holding each quantized weight once
(quantized panels only, no bf16 copy; resident memory: tests/test_one_copy.py); broken GPTQ
checkpoints fail with CheckpointErrors that name the file and tensor; the memory preflight
refuses with the numbers."""
import copy
import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moe_engine
from moe_engine import Capture, TapRequest
from moe_engine.loader import CheckpointError, LayerWeights, ModelWeights, dequantized_layer
from moe_engine.memory import MemoryPreflightError, estimate_bytes, preflight
from moe_engine.model import Model
from moe_engine.ops import available_backends
from moe_engine.quant import QuantizedWeight, QuantSpec, layout_nbytes
from moe_engine.quantize import main as quantize_main
from test_model_backends import chose_other, routed  # one rule for "routing differs" (near-ties)
from tolerances import assert_close

IDS = torch.arange(1, 30)


@pytest.fixture(scope="module")
def q4_dir(tiny_ckpt_sharded, tmp_path_factory):
    """tiny (sharded source) -> 4-bit asym g32 GPTQ, written in 3+ shards."""
    out = tmp_path_factory.mktemp("q") / "tiny-int4"
    assert quantize_main([str(tiny_ckpt_sharded), str(out), "--bits", "4", "--group-size", "32",
                          "--max-shard-size", "0.0001"]) == 0
    return out


def _quantized_tensors(w: ModelWeights):
    for l, lw in enumerate(w.layers):
        m = lw.mlp
        named = {"q": lw.q, "k": lw.k, "v": lw.v, "o": lw.o}
        # ep: the expert-parallel shard (distributed.py), None in one process
        named.update({f"mlp.{k}": v for k, v in vars(m).items() if k not in ("shared", "ep")})
        if getattr(m, "shared", None) is not None:
            named.update({"shared.gate_up": m.shared.gate_up, "shared.down": m.shared.down})
        for k, v in named.items():
            yield f"{l}.{k}", v


def test_cli_output_is_a_gptq_checkpoint(q4_dir, tiny_ckpt):
    cfg = json.loads((q4_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"],
            qc["checkpoint_format"]) == ("gptq", 4, 32, False, False, "gptq")
    assert (q4_dir / "tokenizer.json").read_bytes() == (tiny_ckpt / "tokenizer.json").read_bytes()
    index = json.loads((q4_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3
    p = "model.layers.1.mlp.experts.3.down_proj"
    with safe_open(str(q4_dir / index[p + ".qweight"]), framework="pt") as f:
        qweight = f.get_tensor(p + ".qweight")
    with safe_open(str(q4_dir / index[p + ".g_idx"]), framework="pt") as f:
        g_idx = f.get_tensor(p + ".g_idx")
    assert qweight.dtype == torch.int32 and list(qweight.shape) == [32 // 8, 64]  # [Din/p, Dout]: Din=F=32, Dout=D=64
    assert g_idx.tolist() == [k // 32 for k in range(32)]
    assert "model.layers.1.mlp.gate.weight" in index and "model.layers.1.mlp.gate.qweight" not in index
    assert "lm_head.weight" in index and "model.embed_tokens.weight" in index


def test_quantize_on_load_gives_the_same_bits(q4_dir, tiny_ckpt):
    a = moe_engine.load(q4_dir, backend="torch", progress=False)
    b = moe_engine.load(tiny_ckpt, backend="torch", progress=False, quant="int4", group_size=32)
    n = 0
    for (name, x), (_, y) in zip(_quantized_tensors(a.weights), _quantized_tensors(b.weights)):
        if isinstance(x, QuantizedWeight):
            n += 1
            assert isinstance(y, QuantizedWeight), name
            for t in ("qweight", "qzeros", "scales"):
                assert torch.equal(getattr(x, t), getattr(y, t)), (name, t)
        else:
            assert torch.equal(x, y), name
    assert n >= 4 * 3 + 2 * 2 + 2  # attention x3 layers, experts + shared x2, dense MLP
    assert torch.equal(a.forward(IDS), b.forward(IDS))


def test_quantized_model_is_its_dequantized_model(q4_dir):
    """The reference: the same Model over plain tensors holding the dequantized weights."""
    m = moe_engine.load(q4_dir, backend="torch", progress=False)
    plain = ModelWeights(m.weights.embed, [dequantized_layer(lw, m.dtype) for lw in m.weights.layers],
                         m.weights.final_norm, m.weights.lm_head)
    assert not any(isinstance(v, QuantizedWeight) for _, v in _quantized_tensors(plain))
    ref = Model(m.config, plain, backend="torch")
    assert torch.equal(m.forward(IDS), ref.forward(IDS))
    lw = m.weights.layers[1]
    assert isinstance(lw.mlp.experts_gate_up, QuantizedWeight) and lw.mlp.experts_gate_up.shape == (8, 64, 64)
    assert m.weights.layers[1].mlp.router.dtype == torch.bfloat16  # the router stays unquantized


@pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")
def test_cpu_backend_runs_a_quantized_model(q4_dir):
    """fp32, so bf16 near-ties in the router cannot pick different experts on the two backends."""
    t = moe_engine.load(q4_dir, backend="torch", progress=False, dtype="float32")
    c = moe_engine.load(q4_dir, backend="cpu", progress=False, dtype="float32")
    assert_close(c.forward(IDS), t.forward(IDS), "model_logits_vs_backend", torch.float32)
    assert c.generate("The", max_new_tokens=6, topk=1)[0].text == t.generate("The", max_new_tokens=6, topk=1)[0].text
    cap = Capture(TapRequest(["blocks.*.moe.hook_topk_ids"]))
    c.forward(IDS, capture=cap, topk=1)
    assert cap["blocks.2.moe.hook_topk_ids"].shape == (IDS.numel(), 1)


def test_v2_zero_convention_reads_the_same(q4_dir, tmp_path):
    """Rewrite the checkpoint in gptq_v2 (true zeros stored): same weights."""
    v2 = shutil.copytree(q4_dir, tmp_path / "v2")
    for f in v2.glob("*.safetensors"):
        t = load_file(f)
        for k in [k for k in t if k.endswith(".qzeros")]:
            z = t[k]
            w = torch.zeros_like(z)
            for j in range(8):  # +1 per 4-bit field (stored z - 1 <= 14, so no carry)
                w |= (((z >> (4 * j)) & 0xF) + 1) << (4 * j)
            t[k] = w
        save_file(t, f, metadata={"format": "pt"})
    cfg = json.loads((v2 / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (v2 / "config.json").write_text(json.dumps(cfg))
    a = moe_engine.load(q4_dir, backend="torch", progress=False)
    b = moe_engine.load(v2, backend="torch", progress=False)
    assert not torch.equal(a.weights.layers[0].q.qzeros, b.weights.layers[0].q.qzeros)
    assert torch.equal(a.forward(IDS), b.forward(IDS))


def _edit(ckpt, name, fn):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    f = ckpt / index[name]
    t = load_file(f)
    t[name] = fn(t[name])
    save_file(t, f, metadata={"format": "pt"})
    return f


@pytest.mark.parametrize("name,fn,match", [
    ("model.layers.1.self_attn.o_proj.qweight", lambda t: t[:-1].contiguous(),
     r"o_proj.qweight has shape \[7, 64\], expected \[8, 64\]"),
    ("model.layers.2.mlp.experts.0.up_proj.scales", lambda t: t.float(),
     r"up_proj.scales has unsupported dtype F32; supported: F16, BF16"),
    ("model.layers.0.mlp.down_proj.g_idx", lambda t: t.flip(0).contiguous(), r"down_proj.g_idx is not k // 32"),
])
def test_broken_gptq_checkpoints_are_named(q4_dir, copy_ckpt, name, fn, match):
    ckpt = copy_ckpt(q4_dir)
    _edit(ckpt, name, fn)
    with pytest.raises(CheckpointError, match=match):
        moe_engine.load(ckpt, backend="torch", progress=False)


def test_bad_quantization_config_and_requests(q4_dir, copy_ckpt, tiny_ckpt):
    ckpt = copy_ckpt(q4_dir)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"quantization_config.bits = 3; supported: 4, 8"):
        moe_engine.load(ckpt, backend="torch", progress=False)
    with pytest.raises(CheckpointError, match="already quantized"):
        moe_engine.load(q4_dir, backend="torch", progress=False, quant="int8")
    with pytest.raises(ValueError, match="quant = 'int3'"):
        moe_engine.load(tiny_ckpt, backend="torch", progress=False, quant="int3")


def test_cli_errors(tmp_path, tiny_ckpt, q4_dir, capsys):
    assert quantize_main([str(tmp_path / "nope"), str(tmp_path / "o"), "--bits", "8"]) == 1
    assert capsys.readouterr().err.startswith("error: ") 
    assert quantize_main([str(q4_dir), str(tmp_path / "o2"), "--bits", "8"]) == 1
    assert "already quantized" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert quantize_main([str(tiny_ckpt), str(tmp_path / "full"), "--bits", "8"]) == 1
    assert "not an empty directory" in capsys.readouterr().err


def test_memory_preflight(tiny_ckpt):
    cfg = moe_engine.ModelConfig.from_json(tiny_ckpt / "config.json")
    bf16 = estimate_bytes(cfg, backend="torch", context=512)
    q4 = estimate_bytes(cfg, backend="torch", context=512, quant=QuantSpec(4, 32))
    assert q4["weights"] < 0.5 * bf16["weights"] and q4["kv_cache"] == bf16["kv_cache"]
    assert bf16["kv_cache"] == 2 * 3 * 4 * 16 * 512 * 2  # 2 (k, v) x L x Hkv x hd x tokens x bf16
    with pytest.raises(MemoryPreflightError, match=r"needs .* GB .* available; --quant int8 needs .* "
                                                   r"--quant int4 needs"):
        preflight(tiny_ckpt, backend="cpu", available=10 ** 6)
    assert preflight(tiny_ckpt, backend="cpu", available=10 ** 12)["total"] > bf16["total"]
    # the cpu backend's panels replace the tensors they are packed from (one copy); packing adds
    # the largest layer (its tensors and panels are both held while it is packed)
    layout = moe_engine.loader.checkpoint_layout(cfg)
    layer1 = {n: s for n, s in layout.items() if n.startswith("model.layers.1.")}
    q4_cpu = estimate_bytes(cfg, backend="cpu", context=512, quant=QuantSpec(4, 32))
    assert q4_cpu["packed"] == layout_nbytes(layer1, 2, QuantSpec(4, 32)) and q4_cpu["weights"] == q4["weights"]
    bf16_cpu = estimate_bytes(cfg, backend="cpu", context=512)
    assert bf16_cpu["packed"] == layout_nbytes(layer1, 2, None) and bf16_cpu["weights"] == bf16["weights"]


def test_16b_preset(tmp_path):
    """The full-size preset is the published config at 28 layers, written in 7 shards; checked
    here without writing 33 GB: its config, its size estimate, and its sharding on tiny shapes."""
    from moe_engine.synthetic import PRESETS, PUBLISHED_CONFIG, make_checkpoint
    cfg = moe_engine.ModelConfig.from_dict({**PUBLISHED_CONFIG, **PRESETS["16b"]})
    assert cfg.num_hidden_layers == 28 and cfg.n_routed_experts == 64 and cfg.hidden_size == 2048
    est = estimate_bytes(cfg, backend="torch", context=4096)
    assert abs(est["weights"] - 16_375_728_128 * 2) < 1e6  # the published parameter count, bf16
    q4 = estimate_bytes(cfg, backend="torch", context=4096, quant=QuantSpec(4, 64))
    assert 8e9 < q4["weights"] < 10e9
    out = make_checkpoint(tmp_path / "small16b", "16b", overrides=PRESETS["tiny"])
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 7
    assert moe_engine.load(out, backend="torch", progress=False, quant="int8").config.num_hidden_layers == 3


def test_eval_quant_scores_padded_batches_like_single_chunks(tiny_ckpt):
    """tools/eval_quant.py batches chunks of different lengths with left padding: the per-chunk
    NLL and argmax must be those of each chunk run alone; and its card section renders."""
    import sys
    from pathlib import Path
    import torch.nn.functional as Fn
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import eval_quant
    import eval_small
    m = moe_engine.load(tiny_ckpt, backend="torch", progress=False, dtype="float32")
    chunks = [list(range(5, 25)), list(range(30, 37)), list(range(40, 52))]
    nll, top1 = eval_quant.score(m, chunks, batch=3)
    want_top1 = []
    for c, got in zip(chunks, nll):
        logits = m.forward(torch.tensor(c[:-1]))[0]
        want = float(Fn.cross_entropy(logits, torch.tensor(c[1:])))
        assert abs(got - want) < 1e-4
        want_top1.append(logits.argmax(-1))
    assert torch.equal(top1, torch.cat(want_top1))
    lines = []
    q = {"chunk_tokens": 8, "compute": "fp32", "command": "x",
         "ppl": {"bf16": {d: 10.0 for d in eval_small.DOMAINS}, "int4": {d: 10.5 for d in eval_small.DOMAINS}},
         "top1_agreement": {"bf16": {d: 1.0 for d in eval_small.DOMAINS}, "int4": {d: 0.9 for d in eval_small.DOMAINS}}}
    eval_small._quant_section(lines.append, q)
    assert "| int4 | 10.50 | 10.50 | 10.50 | 10.50 | +5.00% | 90.00% |" in lines


# ---- the cpu backend on quantized weights: the quantized kernels, one copy ------------------------

# (bits, group size, sym): each width and symmetry, two group sizes (tiny's K is 64 or 32)
FORMATS = [(8, 32, True), (8, 64, False), (4, 32, False), (4, 64, True)]


def _tensors(obj, seen=None):
    """Every tensor reachable from obj through dataclass fields, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)


@pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")
@pytest.mark.parametrize("bits,group_size,sym", FORMATS, ids=[f"int{b}-g{g}-{'sym' if s else 'asym'}"
                                                              for b, g, s in FORMATS])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_quantized_kernels_match_the_dequantized_reference(tiny_ckpt, bits, group_size, sym, dtype):
    """The cpu backend (quantized kernels) vs the torch backend on the same model (dequantize, then
    torch matmuls): logits, greedy tokens, every routing intervention, a tap. fp32 logits are
    compared at the fp32 bar, every routing alike. In bf16 the reference rounds every dequantized
    weight to bf16 while the kernels dequantize in fp32 registers (the oracle-vs-engine kind of
    difference: the bf16 "model_logits" bar), and on this random tiny model the router's near-ties
    then flip experts within a few tokens, so bf16 is checked with the routing pinned (top-1,
    forced expert in every MoE layer); greedy tokens on the fp32 model."""
    c = moe_engine.load(tiny_ckpt, backend="cpu", progress=False, dtype=dtype, quant=f"int{bits}",
                        group_size=group_size, sym=sym)
    dt = c.dtype
    assert c._cpu_weights().one_call  # decode takes the one-call paths (cpu_weights.CpuModelWeights.one_call)
    what = "model_logits_vs_backend" if dt == torch.float32 else "model_logits"
    ids = IDS[None]
    pinned = {"topk": 1, "force_experts": {1: 5, 2: 3}}
    cases = [pinned] if dt == torch.bfloat16 else [
        {}, pinned, {"topk": 1}, {"expert_mask": {1: [0, 3]}, "mask_mode": "zero"},
        {"expert_mask": {2: [1, 5]}}, {"force_experts": {1: 5}, "topk": 3}]
    for kw in cases:
        case = f"int{bits} g{group_size} sym={sym} {kw}"
        (lt, rt), (lc, rc) = routed(c, ids, backend="torch", **kw), routed(c, ids, **kw)
        flip = torch.zeros(ids.numel(), dtype=torch.bool)  # the flip rule of test_model_backends.compare
        for a, b in zip(rt, rc):
            flip |= chose_other(a, b)
        flip = flip.view(ids.shape).cummax(1).values
        assert not ((dt == torch.float32 or kw is pinned) and flip.any()), f"routing differs [{case}]"
        assert flip.float().mean() <= 0.25, f"routing differs on {int(flip.sum())} of {ids.numel()} tokens [{case}]"
        assert_close(lc[~flip], lt[~flip], what, dt, case)
    if dt == torch.float32:  # the tap: every token routed alike (checked above)
        name = "blocks.1.moe.hook_expert_out"
        got, want = Capture(TapRequest([name])), Capture(TapRequest([name]))
        c.forward(IDS, capture=got)
        c.forward(IDS, capture=want, backend="torch")
        assert_close(got[name], want[name], "expert_ffn", dt, "tap")
        gen = [c.generate("The", max_new_tokens=8, temperature=0, backend=be)[0].token_ids for be in ("cpu", "torch")]
        assert gen[0] == gen[1] and len(gen[0]) == 8


@pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")
def test_cpu_quantized_model_holds_each_weight_once(tiny_ckpt):
    """After load on the cpu backend the quantized linears exist only as quantized panels: no
    QuantizedWeight (GPTQ tensors) and no float tensor of a quantized linear's size anywhere in
    the model; float bytes are those of what stays unquantized (embedding, norms, and the packed
    panels of the routers and lm_head, each once)."""
    ref = moe_engine.load(tiny_ckpt, backend="torch", progress=False, quant="int4", group_size=32)
    linears = {tuple(w.shape) for _, w in _quantized_tensors(ref.weights) if isinstance(w, QuantizedWeight)}
    m = moe_engine.load(tiny_ckpt, backend="cpu", progress=False, quant="int4", group_size=32)
    cpu = m._cpu_weights()
    views = [w for name, w in _quantized_tensors(m.weights) if not name.endswith("router")]
    assert views and all(type(w).__name__ == "PackedRows" for w in views)
    for lc in cpu.layers:
        parts = [lc.qkv, lc.o] + ([lc.dense.w13, lc.dense.w2] if lc.dense is not None else
                                  [lc.moe.experts.w13, lc.moe.experts.w2, lc.moe.shared.w13, lc.moe.shared.w2])
        assert all(type(p).__name__ == "PackedQWeight" and p.data.dtype == torch.uint8 for p in parts)
    tensors = {t.data_ptr(): t for t in _tensors((m.weights, cpu))}.values()
    floats = [t for t in tensors if t.is_floating_point()]
    assert not any(tuple(t.shape[-2:]) in {s[-2:] for s in linears} for t in floats if t.dim() >= 2)
    w = m.weights
    routers = sum(math.prod(lw.mlp.router.shape) for lw in w.layers if isinstance(lw.mlp, moe_engine.loader.MoEWeights))
    norms = sum(lw.input_norm.numel() + lw.post_attn_norm.numel() for lw in w.layers) + w.final_norm.numel()
    expect = (w.embed.numel() + norms + routers + math.prod(w.lm_head.shape)) * 2  # bf16
    float_bytes = sum(t.numel() * t.element_size() for t in floats)
    assert float_bytes <= expect * 1.05 + 4096  # panel padding
    # it still serves the reference path, dequantizing per call
    assert torch.equal(m.forward(IDS, backend="torch"), ref.forward(IDS))


@pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")
def test_cpu_gptq_checkpoint_and_quantize_on_load_agree(q4_dir, tiny_ckpt):
    """The on-disk GPTQ checkpoint (v1 zeros, repacked with + zero_offset) and quantize-on-load
    give the same bits on the cpu backend, prefill and decode."""
    a = moe_engine.load(q4_dir, backend="cpu", progress=False)
    b = moe_engine.load(tiny_ckpt, backend="cpu", progress=False, quant="int4", group_size=32)
    assert torch.equal(a.forward(IDS), b.forward(IDS))
    ga, gb = (m.generate("The", max_new_tokens=6, temperature=0)[0].token_ids for m in (a, b))
    assert ga == gb


ONE_CALL_FORMATS = [(8, 64, False, "float32"), (4, 32, True, "float32"), (4, 128, False, "bfloat16"),
                    (8, 32, True, "bfloat16")]


@pytest.fixture(scope="module", params=ONE_CALL_FORMATS,
                ids=[f"int{b}-g{g}-{'sym' if s else 'asym'}-{d}" for b, g, s, d in ONE_CALL_FORMATS])
def q_cpu(request, tiny_ckpt):
    bits, group_size, sym, dtype = request.param
    return moe_engine.load(tiny_ckpt, backend="cpu", progress=False, dtype=dtype, quant=f"int{bits}",
                           group_size=group_size, sym=sym)


@pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")
def test_cpu_quantized_fused_layer_is_bit_identical_to_op_by_op(q_cpu):
    """moe_layer_cpu (one call) on quantized routed and shared experts against moe_layer's op-by-op
    path (router, route, expert_ffn_q_cpu, combine): the same kernels, so the same bits, usage
    counters included, at decode and prefill sizes and with interventions."""
    from moe_engine.interventions import Interventions
    from moe_engine.moe import moe_layer
    c, dt = q_cpu.config, q_cpu.dtype
    l = c.moe_layers[0]
    packed = q_cpu._cpu_weights().layers[l].moe
    assert type(packed.experts).__name__ == "QuantExperts" and type(packed.shared).__name__ == "QuantExperts"
    for N, kw in [(1, {}), (3, {"topk": 1}), (20, {"expert_mask": {l: [2]}, "mask_mode": "zero"})]:
        routing = Interventions(**kw).resolve(c, q_cpu.device)
        u, r = torch.randn(N, c.hidden_size).to(dt), torch.randn(N, c.hidden_size).to(dt)
        usage = [torch.zeros(c.n_routed_experts, dtype=torch.int32) for _ in range(2)]
        a = moe_layer(u, r, q_cpu.weights.layers[l].mlp, routing, l, backend="cpu", cpu=packed, usage=usage[0])
        b = moe_layer(u, r, q_cpu.weights.layers[l].mlp, routing, l, backend="cpu", cpu=packed, usage=usage[1],
                      fused=False)
        assert torch.equal(a, b), f"fused vs op-by-op N={N} {kw}"
        assert torch.equal(usage[0], usage[1]), f"usage counters N={N} {kw}"


def _decode_run(m, prefilled, usage0, first, kw, steps=3):
    cache, usage, tok, out = copy.deepcopy(prefilled), usage0.clone(), first, []
    for _ in range(steps):
        lg = m(tok, cache=cache, usage=usage, logits="last", **kw).reshape(tok.shape[0], -1)
        out.append(lg)
        tok = lg.argmax(-1, keepdim=True)
    return torch.stack(out), usage, cache.k[:, :, :, :cache.used], cache.v[:, :, :, :cache.used]


@pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")
@pytest.mark.parametrize("kw", [{}, {"topk": 1, "force_experts": {2: 5}},
                                {"expert_mask": {1: [0, 2]}, "mask_mode": "zero", "renormalize": True}],
                         ids=["default", "force", "mask-zero"])
def test_cpu_quantized_decode_step_matches_the_layer_loop(q_cpu, monkeypatch, kw):
    """The one-call decode step (decode_step_cpu with quantized qkv, o, experts, shared and dense
    MLP) against Model.forward's layer loop on the same weights: bit-identical logits, usage and
    KV cache when the loop runs the same kernels (attention block and MoE layer in one call
    each); and within the model_logits bar of the loop as it ran before quantized models took
    the one-call paths (torch rope and SDPA around linear_q_cpu: another attention kernel)."""
    import moe_engine.model as model_mod
    import moe_engine.runner as runner_mod
    from moe_engine.cpu_weights import CpuModelWeights
    m, dt = q_cpu, q_cpu.dtype
    assert m._cpu_weights().one_call
    ids, mask = model_mod.left_pad([[5, 9, 11, 300, 2], [17, 4]])
    prefilled, usage0 = m.new_cache(2, 8), m.new_usage_counters()
    first = m(ids, attention_mask=mask, cache=prefilled, usage=usage0, logits="last", **kw).argmax(-1, keepdim=True)
    calls = []
    real = CpuModelWeights.decode_step
    monkeypatch.setattr(CpuModelWeights, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    one = _decode_run(m, prefilled, usage0, first.view(2, 1), kw)
    assert len(calls) == 3, "every step must take the one-call decode step"
    monkeypatch.setattr(runner_mod, "DECODE_STEP_MAX_B", 0)  # turns only the one-call step off
    loop = _decode_run(m, prefilled, usage0, first.view(2, 1), kw)
    assert len(calls) == 3
    for name, a, b in zip(("logits", "usage", "k cache", "v cache"), one, loop):
        assert torch.equal(a, b), f"decode step vs layer loop: {name} differ ({kw})"
    monkeypatch.setattr(CpuModelWeights, "one_call", property(lambda self: False))
    old = _decode_run(m, prefilled, usage0, first.view(2, 1), kw, steps=1)
    assert len(calls) == 3
    assert_close(one[0][0], old[0][0], "model_logits", dt, f"one-call vs op-by-op {kw}")


@pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")
def test_cpu_quantized_decode_threads_1_and_2_identical(q_cpu):
    """The quantized one-call decode step gives the same bits on 1 and 2 threads (fixed order)."""
    old = torch.get_num_threads()
    prefilled = q_cpu.new_cache(2, 6)
    q_cpu(torch.tensor([[3, 8, 1], [4, 2, 9]]), cache=prefilled)
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            cache = copy.deepcopy(prefilled)
            outs.append(torch.stack([q_cpu(torch.tensor([[3], [4]]), cache=cache) for _ in range(2)]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]), "quantized decode logits differ between 1 and 2 threads"
