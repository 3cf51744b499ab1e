"""The 8-bit lm_head option (docs/quantization.md): `load(..., quant_lm_head=True)` and
`python -m moe_engine.quantize ... --lm-head` give the same bits (GPTQModel's `"lm_head": true`
with a `dynamic` bits override when the model is 4-bit); a GPTQ lm_head written by the
independent packer of test_quant.py loads exactly; the cpu backend's logits (prefill kernels and
the one-call decode step) match the dequantize-then-matmul reference, the decode step is
bit-identical to the layer loop and to itself on 1 and 2 threads; the memory preflight counts the
quantized lm_head; the lens decodes through it; the bundled model generates with it."""
import copy
import json
import random
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_engine
from moe_engine import Capture, TapRequest
from moe_engine.config import ModelConfig
from moe_engine.loader import CheckpointError
from moe_engine.memory import estimate_bytes
from moe_engine.ops import available_backends
from moe_engine.quant import (LM_HEAD_BITS, QuantError, QuantizedWeight, QuantSpec, lm_head_spec, lm_head_spec_of,
                              quantized_nbytes)
from moe_engine.quantize import main as quantize_main
from test_quant import reference_gptq
from tolerances import assert_close

IDS = torch.arange(1, 30)
needs_cpu = pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")


@pytest.fixture(scope="module")
def q4h_dir(tiny_ckpt, tmp_path_factory):
    """tiny -> 4-bit asym g32 GPTQ with the lm_head at 8 bits (--lm-head)."""
    out = tmp_path_factory.mktemp("qh") / "tiny-int4-lmh"
    assert quantize_main([str(tiny_ckpt), str(out), "--bits", "4", "--group-size", "32", "--lm-head",
                          "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def q4_dir(tiny_ckpt, tmp_path_factory):
    """tiny -> 4-bit asym g32 GPTQ, lm_head left in bf16 (the default)."""
    out = tmp_path_factory.mktemp("q") / "tiny-int4"
    assert quantize_main([str(tiny_ckpt), str(out), "--bits", "4", "--group-size", "32", "--no-progress"]) == 0
    return out


def _same_qweight(a, b, what):
    assert isinstance(a, QuantizedWeight) and isinstance(b, QuantizedWeight), what
    assert (a.bits, a.group_size, a.sym, a.zero_offset) == (b.bits, b.group_size, b.sym, b.zero_offset), what
    for t in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(a, t), getattr(b, t)), (what, t)


def test_config_round_trip_and_refusals():
    s4, s8 = QuantSpec(4, 64, False), QuantSpec(8, 32, True)
    qc = s4.to_config(lm_head=lm_head_spec(s4))
    assert qc["lm_head"] is True and qc["dynamic"] == {"+:lm_head": {"bits": LM_HEAD_BITS}}
    qc8 = s8.to_config(lm_head=lm_head_spec(s8))
    assert qc8["lm_head"] is True and "dynamic" not in qc8  # same bits: nothing to override
    assert s4.to_config()["lm_head"] is False and "dynamic" not in s4.to_config()

    def cfg(qc):  # what lm_head_spec_of reads of a ModelConfig
        return types.SimpleNamespace(extra={"quantization_config": qc}, source="config.json")

    assert lm_head_spec_of(cfg(qc)) == QuantSpec(8, 64, False)
    assert lm_head_spec_of(cfg(qc8)) == QuantSpec(8, 32, True)
    assert lm_head_spec_of(cfg(s4.to_config())) is None
    # a plain `"lm_head": true` (GPTQModel's default): the lm_head in the model's own format
    assert lm_head_spec_of(cfg({**s4.to_config(), "lm_head": True})) == QuantSpec(4, 64, False)
    # an un-prefixed key is a positive match too; the override may change group size and symmetry
    other = {**s4.to_config(), "lm_head": True, "dynamic": {"lm_head": {"bits": 8, "group_size": 128, "sym": True}}}
    assert lm_head_spec_of(cfg(other)) == QuantSpec(8, 128, True)
    for bad, match in [({"dynamic": {r"+:.*\.1\..*": {"bits": 8}}}, "dynamic"),
                       ({"dynamic": {"-:lm_head": {}}}, "dynamic"),
                       ({"dynamic": {"+:lm_head": {"bits": 8}}, "lm_head": False}, "expected true"),
                       ({"dynamic": {"+:lm_head": {"bits": 3}}, "lm_head": True}, "bits = 3"),
                       ({"dynamic": {"+:lm_head": {"damp": 0.1}}, "lm_head": True}, "supported keys"),
                       ({"lm_head": "yes"}, "lm_head")]:
        with pytest.raises(QuantError, match=match):
            lm_head_spec_of(cfg({**s4.to_config(), **bad}))


def test_cli_and_quantize_on_load_give_the_same_bits(q4h_dir, q4_dir, tiny_ckpt):
    qc = json.loads((q4h_dir / "config.json").read_text())["quantization_config"]
    assert qc["lm_head"] is True and qc["dynamic"] == {"+:lm_head": {"bits": 8}}
    names = load_file(q4h_dir / "model.safetensors").keys()
    assert "lm_head.qweight" in names and "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    disk = moe_engine.load(q4h_dir, backend="torch", progress=False)
    on_load = moe_engine.load(tiny_ckpt, backend="torch", progress=False, quant="int4", group_size=32,
                              quant_lm_head=True)
    # the int4 checkpoint without a quantized lm_head, its lm_head quantized on load
    gptq_plus = moe_engine.load(q4_dir, backend="torch", progress=False, quant_lm_head=True)
    assert disk.weights.lm_head.shape == (512, 64) and disk.weights.lm_head.bits == 8
    assert disk.weights.lm_head.group_size == 32 and not disk.weights.lm_head.sym
    for other, what in ((on_load, "quantize on load"), (gptq_plus, "GPTQ checkpoint + quant_lm_head")):
        _same_qweight(disk.weights.lm_head, other.weights.lm_head, what)
        _same_qweight(disk.weights.layers[1].q, other.weights.layers[1].q, what + " (q_proj)")
        assert torch.equal(disk.forward(IDS), other.forward(IDS)), what
    assert torch.equal(disk.weights.embed, on_load.weights.embed)  # the embedding stays as stored
    plain = moe_engine.load(q4_dir, backend="torch", progress=False)
    assert isinstance(plain.weights.lm_head, torch.Tensor)  # off by default
    with pytest.raises(CheckpointError, match="already quantized"):
        moe_engine.load(q4h_dir, backend="torch", progress=False, quant_lm_head=True)
    with pytest.raises(TypeError, match="quant_lm_head must be a bool"):
        moe_engine.load(q4_dir, backend="torch", progress=False, quant_lm_head="int8")


def test_gptq_lm_head_from_the_independent_packer(q4_dir, copy_ckpt):
    """A GPTQModel-style checkpoint: the int4 model with an 8-bit lm_head (v1 zeros, g32, a
    `dynamic` bits override) packed by test_quant.reference_gptq from the published description."""
    ck = copy_ckpt(q4_dir)
    rng = random.Random(7)
    V, D, bits, g = 512, 64, 8, 32
    q = [[rng.randint(0, 255) for _ in range(V)] for _ in range(D)]          # [K, N]
    z = [[rng.randint(1, 255) for _ in range(V)] for _ in range(D // g)]
    scales = [[float(torch.tensor(rng.uniform(1e-3, 2e-2)).half()) for _ in range(V)] for _ in range(D // g)]
    qweight, qzeros, s16, w = reference_gptq(q, z, scales, bits, g, v1=True)
    t = load_file(ck / "model.safetensors")
    del t["lm_head.weight"]
    t.update({"lm_head.qweight": qweight, "lm_head.qzeros": qzeros, "lm_head.scales": s16,
              "lm_head.g_idx": torch.arange(D, dtype=torch.int32) // g})
    save_file(t, ck / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"].update(lm_head=True, dynamic={"+:lm_head": {"bits": 8}})
    (ck / "config.json").write_text(json.dumps(cfg))
    m = moe_engine.load(ck, backend="torch", progress=False, dtype="float32")
    torch.testing.assert_close(m.weights.lm_head.dequantize().double(), w, atol=0, rtol=0)
    if "cpu" in available_backends():
        c = moe_engine.load(ck, backend="cpu", progress=False, dtype="float32")
        assert_close(c.forward(IDS), m.forward(IDS), "model_logits_vs_backend", torch.float32)
    # a bits override that does not fit the tensors is named
    cfg["quantization_config"]["dynamic"] = {"+:lm_head": {"bits": 4}}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lm_head.qweight"):
        moe_engine.load(ck, backend="torch", progress=False)


@needs_cpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_logits_match_the_dequantized_reference(tiny_ckpt, dtype):
    """Prefill (linear_q_cpu on 29 tokens) and the one-call decode step: logits against the final
    norm's output times the dequantized lm_head (fp32 exact, then the model dtype), and the whole
    model against the torch backend (which dequantizes per call). Routing pinned in bf16, where
    the reference's bf16-rounded weights flip near-ties (test_quant_model's rule)."""
    m = moe_engine.load(tiny_ckpt, backend="cpu", progress=False, dtype=dtype, quant="int8", group_size=64,
                        quant_lm_head=True)
    dt = m.dtype
    packed = m._cpu_weights()
    assert type(packed.lm_head).__name__ == "PackedQWeight" and packed.lm_head.bits == 8
    assert type(m.weights.lm_head).__name__ == "PackedRows"  # the only copy: a view of the panels
    kw = {} if dt == torch.float32 else {"topk": 1, "force_experts": {1: 5, 2: 3}}
    cap = Capture(TapRequest(["hook_final_norm"]))
    got = m.forward(IDS, capture=cap, **kw)[0]
    want = (cap["hook_final_norm"].reshape(-1, m.config.hidden_size).float() @ m.weights.lm_head.dequantize(torch.float32).t()).to(dt).float()
    assert_close(got, want, "model_logits_vs_backend", dt, "prefill vs final norm @ dequantized lm_head")
    assert_close(got, m.forward(IDS, backend="torch", **kw)[0], "model_logits_vs_backend" if dt == torch.float32
                 else "model_logits", dt, "cpu vs torch backend")
    # decode: one-call step vs the same model's torch backend from the same cache
    cache_c, cache_t = m.new_cache(1, 40), m.new_cache(1, 40)
    m.forward(IDS[None], cache=cache_c, **kw)
    m.forward(IDS[None], cache=cache_t, backend="torch", **kw)
    tok = torch.tensor([[7]])
    lc = m.forward(tok, cache=cache_c, logits="last", **kw)
    lt = m.forward(tok, cache=cache_t, logits="last", backend="torch", **kw)
    assert_close(lc, lt, "model_logits_vs_backend" if dt == torch.float32 else "model_logits", dt, "decode step")


@needs_cpu
def test_decode_step_is_the_layer_loop_and_thread_invariant(tiny_ckpt, monkeypatch):
    """decode_step_cpu with a quantized lm_head (lm_head_fmt) gives the layer loop's bits, and the
    same bits on 1 and 2 threads."""
    import moe_engine.runner as runner_mod
    from moe_engine.cpu_weights import CpuModelWeights
    m = moe_engine.load(tiny_ckpt, backend="cpu", progress=False, dtype="bfloat16", quant="int4", group_size=128,
                        sym=True, quant_lm_head=True)
    prefilled = m.new_cache(2, 8)
    m(torch.tensor([[3, 8, 1], [4, 2, 9]]), cache=prefilled)
    calls = []
    real = CpuModelWeights.decode_step
    monkeypatch.setattr(CpuModelWeights, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(threads=None):
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            cache = copy.deepcopy(prefilled)
            return torch.stack([m(torch.tensor([[3], [4]]), cache=cache, logits="last") for _ in range(2)])
        finally:
            torch.set_num_threads(old)

    one, one1, one2 = run(), run(1), run(2)
    assert len(calls) == 6
    monkeypatch.setattr(runner_mod, "DECODE_STEP_MAX_B", 0)  # the layer loop, same kernels
    loop = run()
    assert len(calls) == 6
    assert torch.equal(one, loop), "decode step vs layer loop"
    assert torch.equal(one1, one2), "1 vs 2 threads"


def test_memory_preflight_counts_the_quantized_lm_head(tiny_ckpt, q4h_dir):
    cfg = ModelConfig.from_json(tiny_ckpt / "config.json")
    s4 = QuantSpec(4, 32, False)
    plain = estimate_bytes(cfg, quant=s4, context=64)
    head = estimate_bytes(cfg, quant=s4, context=64, lm_head=lm_head_spec(s4))
    V, D = cfg.vocab_size, cfg.hidden_size
    # the bf16 lm_head is counted twice (the model's tensor and its panels), the 8-bit one once
    assert plain["weights"] - head["weights"] == V * D * 2 - quantized_nbytes(V, D, 8, 32)
    assert plain["packed"] - head["packed"] == V * D * 2
    assert estimate_bytes(ModelConfig.from_json(q4h_dir / "config.json"), context=64) == head


@needs_cpu
def test_lens_decodes_through_the_quantized_lm_head(tiny_ckpt):
    """logit_lens of the last layer's resid_post reproduces the model's own logits (the lens runs
    the model's quantized lm_head, not a bf16 copy, which no longer exists)."""
    from moe_engine.lens import logit_lens
    m = moe_engine.load(tiny_ckpt, backend="cpu", progress=False, dtype="float32", quant="int4", group_size=32,
                        quant_lm_head=True)
    name = f"blocks.{m.config.num_hidden_layers - 1}.hook_resid_post"
    cap = Capture(TapRequest([name]))
    logits = m.forward(IDS, capture=cap)[0]
    out = logit_lens(m, cap[name].reshape(-1, m.config.hidden_size), top=3, full=True, vocab=m.config.vocab_size)
    assert_close(out.logprobs, torch.log_softmax(logits, -1), "model_logits_vs_backend", torch.float32)
    assert torch.equal(out.top_ids, logits.topk(3, -1).indices)


@needs_cpu
def test_bundled_model_generates_with_an_int8_lm_head():
    m = moe_engine.load(quant="int4", quant_lm_head=True, progress=False)
    assert type(m._cpu_weights().lm_head).__name__ == "PackedQWeight"
    out = m.generate("The", max_new_tokens=6, temperature=0)[0]
    assert len(out.token_ids) == 6


def test_cli_flags(tiny_ckpt, q4h_dir, tmp_path, capsys):
    from moe_engine.generate import main as generate_main
    assert generate_main(["--model", str(tiny_ckpt), "--quant", "int4", "--group-size", "32", "--quant-lm-head",
                          "--backend", "torch", "--prompt", "The", "--max-new-tokens", "3"]) == 0
    assert generate_main(["--model", str(q4h_dir), "--quant-lm-head", "--backend", "torch", "--prompt", "The",
                          "--max-new-tokens", "3"]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")


def test_a_tied_lm_head_is_refused(tmp_path, capsys):
    """With tie_word_embeddings the lm_head is the embedding, which stays unquantized: both ways
    of asking for a quantized lm_head say so, and a checkpoint claiming one is refused."""
    from moe_engine.synthetic import make_checkpoint
    tied = make_checkpoint(tmp_path / "tied", "tiny", overrides={"tie_word_embeddings": True})
    with pytest.raises(CheckpointError, match="tied"):
        moe_engine.load(tied, backend="torch", progress=False, quant="int8", quant_lm_head=True)
    assert quantize_main([str(tied), str(tmp_path / "out"), "--bits", "8", "--lm-head", "--no-progress"]) == 1
    assert "tied" in capsys.readouterr().err
    assert quantize_main([str(tied), str(tmp_path / "q8"), "--bits", "8", "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "q8" / "config.json").read_text())
    cfg["quantization_config"]["lm_head"] = True
    (tmp_path / "q8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tied"):
        moe_engine.load(tmp_path / "q8", backend="torch", progress=False)
