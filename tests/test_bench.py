"""The benchmark scripts run end to end on a tiny shape and print the promised JSON. No timing is
asserted (performance lives in bench/, never in a test); what is checked is the arithmetic the
numbers rest on: the weight bytes of a decode step, and that every figure is finite and positive."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def run(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_throughput_json(backend):
    from moe_engine.ops import available_backends
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not built")
    r = run("throughput.py", "--preset", "tiny", "--backend", backend, "--threads", "1", "--prompt-len", "12",
            "--gen-len", "5", "--reps", "1", "--moe-tokens", "1,64", "--topk", "1")
    for key in ("prefill_tok_s", "decode_tok_s", "moe_layer_us", "bandwidth_floor_fraction", "read_bandwidth_gb_s",
                "decode_read_bandwidth_gb_s", "decode_bytes_per_step"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["topk"] == 1 and r["distinct_experts_per_moe_layer"] == 1.0
    assert r["cpu_isa"] in (("avx512", "avx2", "portable") if "cpu" in available_backends() else (None,))
    assert [row["tokens"] for row in r["moe_layers"]] == [1, 64]
    assert all(row["floor_us"] > 0 and row["bandwidth_floor_fraction"] > 0 for row in r["moe_layers"])


def test_decode_bytes_count_every_weight_a_step_reads(tiny_dir):
    """Bytes.step against a sum written out from the config: attention, dense MLP, routers,
    shared experts, the chosen experts, the lm_head."""
    import moe_engine
    from throughput import Bytes
    m = moe_engine.load(tiny_dir, dtype="bfloat16", backend="torch", progress=False)
    c = m.config
    D, hd = c.hidden_size, c.head_dim
    attn = D * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd + c.num_attention_heads * hd * D
    dense = 3 * D * c.intermediate_size
    moe_fixed = c.n_routed_experts * D + 3 * D * c.moe_intermediate_size * c.n_shared_experts
    n_moe = len(c.moe_layers)
    want = 2 * (c.num_hidden_layers * attn + (c.num_hidden_layers - n_moe) * dense + n_moe * moe_fixed
                + c.vocab_size * D + 5 * 3 * D * c.moe_intermediate_size)
    assert Bytes(m).step(5) == want
    assert torch.empty(0, dtype=m.dtype).element_size() == 2


def test_decode_bytes_of_a_quantized_model_are_its_quantized_panels(tiny_dir):
    """throughput.py --quant: the floor counts the quantized panels the cpu kernels stream (each
    once: q, k, v share one), the router and lm_head in bf16; not the bf16 size."""
    import moe_engine
    from moe_engine.ops import available_backends
    from throughput import Bytes
    if "cpu" not in available_backends():
        pytest.skip("cpu backend not built")
    m = moe_engine.load(tiny_dir, dtype="bfloat16", backend="cpu", progress=False, quant="int4", group_size=32)
    c, cpu = m.config, m._cpu_weights()
    want = c.vocab_size * c.hidden_size * 2
    for lw, lc in zip(m.weights.layers, cpu.layers):
        want += lc.qkv.nbytes + lc.o.nbytes
        if lc.dense is not None:
            want += lc.dense.w13.nbytes + lc.dense.w2.nbytes
        else:
            want += math.prod(lw.mlp.router.shape) * 2 + lc.moe.shared.w13.nbytes + lc.moe.shared.w2.nbytes
            want += 5 * (lc.moe.experts.w13.nbytes + lc.moe.experts.w2.nbytes) // c.n_routed_experts
    assert Bytes(m).step(5 * len(c.moe_layers)) == want
    bf16 = Bytes(moe_engine.load(tiny_dir, dtype="bfloat16", backend="torch", progress=False))
    head = c.vocab_size * c.hidden_size * 2  # bf16 in both
    assert want - head < 0.4 * (bf16.step(5 * len(c.moe_layers)) - head)


def test_kernels_json():
    from moe_engine.ops import available_backends
    backends = [b for b in ("torch", "cpu") if b in available_backends()]
    r = run("kernels.py", "--threads", "1", "--tokens", "1", "--backends", ",".join(backends))
    ops = {row["op"] for row in r["rows"]}
    assert {"route", "align", "shared", "combine"} <= ops, ops
    assert {row["backend"] for row in r["rows"]} == set(backends)
    assert r["cpu_isa"] in (("avx512", "avx2", "portable") if "cpu" in backends else (None,))
    assert all(math.isfinite(row["us"]) and row["us"] > 0 for row in r["rows"])


def test_throughput_refuses_a_run_beyond_the_context():
    """The bundled model's context is 512: the default 512-token prompt + 64 steps cannot fit."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--model",
                          str(ROOT / "src" / "moe_engine" / "assets" / "small"), "--batch", "4", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "--prompt-len 512 + --gen-len 64 = 576 tokens exceed the model's context of 512" in out.stderr
    assert "expected --prompt-len <= 448" in out.stderr
