"""One copy of the weights on the cpu backend (src/moe_engine/cpu_weights.py): once a model is
packed, its ModelWeights hold PackedRows views of the panels instead of the checkpoint-layout
tensors, every path still runs (decode, prefill, the torch reference on views unpacked per call)
with the bits of a model that kept its tensors, and resident memory after load is the weights
once (bf16 and quantized, measured on bench-small in a fresh process)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_engine
from moe_engine.cpu_weights import PackedRows, dense, dense_all
from moe_engine.loader import MoEWeights
from moe_engine.memory import estimate_bytes
from moe_engine.ops import available_backends
from moe_engine.ops.packed import pack_weight, unpack_weight
from moe_engine.quant import QuantSpec
from moe_engine.synthetic import make_checkpoint
from tolerances import assert_close
from test_quant_model import _tensors  # every tensor reachable through dataclasses, lists, dicts

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="cpu backend not built")

IDS = torch.arange(1, 40)  # 39 tokens: above SMALL_N, so prefill takes torch's GEMMs where they win


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("E,N,K,gate_up", [(1, 32, 64, False), (1, 37, 3, False), (3, 70, 33, False),
                                           (1, 2, 1, True), (2, 34, 17, True), (1, 64, 64, True)])
def test_unpack_weight_inverts_pack_weight(dtype, E, N, K, gate_up):
    """Exact at awkward sizes: rows and K not multiples of the panel, odd K (bf16 pairs), gate|up."""
    w = torch.randn(E, N, K, generator=torch.Generator().manual_seed(N * K)).to(dtype)
    assert torch.equal(unpack_weight(pack_weight(w, gate_up=gate_up)), w)
    view = PackedRows(pack_weight(w[0]), 1, N, False)
    assert view.shape == (N - 1, K) and torch.equal(view.dequantize(dtype), w[0, 1:])


def _linears(w):
    """(name, weight) of every linear of a ModelWeights: attention, MLPs, routers, lm_head."""
    for l, lw in enumerate(w.layers):
        yield from ((f"{l}.{n}", getattr(lw, n)) for n in "qkvo")
        m = lw.mlp
        if isinstance(m, MoEWeights):
            yield from ((f"{l}.{n}", getattr(m, n)) for n in ("router", "experts_gate_up", "experts_down"))
            m = m.shared
        if m is not None:
            yield f"{l}.gate_up", m.gate_up
            yield f"{l}.down", m.down
    yield "lm_head", w.lm_head


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_model_holds_views_and_keeps_its_bits(tiny_ckpt, dtype):
    """Every linear is a view of the panels and no float tensor of a linear's shape is left; the
    cpu backend and the torch reference on the unpacked views give the bits of models that keep
    their tensors, at prefill (torch GEMMs where they win) and decode sizes."""
    ref = moe_engine.load(tiny_ckpt, backend="torch", progress=False, dtype=dtype)
    m = moe_engine.load(tiny_ckpt, backend="cpu", progress=False, dtype=dtype)
    names = []
    for (name, v), (_, t) in zip(_linears(m.weights), _linears(ref.weights)):
        assert isinstance(v, PackedRows), name
        assert v.shape == t.shape and torch.equal(dense(v, t.dtype), t), name
        names.append(name)
    assert len(names) == 3 * 4 + 2 + 2 * 5 + 1
    q, k, v = dense_all([m.weights.layers[0].q, m.weights.layers[0].k, m.weights.layers[0].v], m.dtype)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # one unpacking of q|k|v
    shapes = {tuple(t.shape) for _, t in _linears(ref.weights)}
    floats = [t for t in _tensors((m.weights, m._cpu_weights())) if t.is_floating_point() and t.dim() >= 2]
    assert [tuple(t.shape) for t in floats] == [tuple(m.weights.embed.shape)]  # the embedding only
    assert torch.equal(m.forward(IDS, backend="torch"), ref.forward(IDS))
    # the cpu paths (prefill: torch GEMMs on views unpacked per call where they win; decode) run
    # on the views and leave them as they were; fp32: no bf16 near-ties in the router, so one
    # tolerance covers every logit (test_model_backends.py covers bf16 and interventions)
    logits = m.forward(IDS)
    if m.dtype == torch.float32:
        assert_close(logits, ref.forward(IDS), "model_logits_vs_backend", m.dtype, "one copy")
    assert len(m.generate("The", max_new_tokens=5, temperature=0)[0].token_ids) == 5
    assert all(isinstance(v, PackedRows) for _, v in _linears(m.weights))
    assert torch.equal(m.forward(IDS), logits)
    assert torch.equal(m.forward(IDS, backend="torch"), ref.forward(IDS))


def test_tied_lm_head_stays_the_embedding(tiny_ckpt, tmp_path):
    """A tied lm_head is the embedding, which stays a tensor (a row gather); its panels are the
    one thing packed beside a tensor, and the preflight counts them."""
    d = make_checkpoint(tmp_path / "tied", "tiny", overrides={"tie_word_embeddings": True})
    m = moe_engine.load(d, backend="cpu", progress=False)
    ref = moe_engine.load(d, backend="torch", progress=False)
    assert m.weights.lm_head is m.weights.embed
    assert torch.equal(m.forward(IDS, backend="torch"), ref.forward(IDS))
    cfg = m.config
    untied = estimate_bytes(moe_engine.ModelConfig.from_json(tiny_ckpt / "config.json"), backend="cpu")
    tied = estimate_bytes(cfg, backend="cpu")
    assert tied["packed"] - untied["packed"] == cfg.vocab_size * cfg.hidden_size * 2


_RSS_SCRIPT = """
import json, sys
import moe_engine
quant = None if sys.argv[2] == "bf16" else sys.argv[2]
m = moe_engine.load(sys.argv[1], backend="cpu", progress=False, quant=quant, group_size=128)
out = m.generate("The", max_new_tokens=4, temperature=0)
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("Vm")}
print(json.dumps({"rss": status["VmRSS"], "peak": status["VmHWM"]}))
"""


@pytest.fixture(scope="module")
def bench_small_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench-small"), "bench-small")


@pytest.mark.parametrize("fmt", ["bf16", "int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_cpu_resident_memory_is_one_copy_on_bench_small(bench_small_ckpt, fmt):
    """Resident memory after a cpu load (and a short generate) <= the weight bytes in the held
    format x 1.1 + the KV cache + 300 MB, in a fresh process; a second copy of the linears
    (bench-small: ~400 MB in bf16) would break it."""
    src = Path(__file__).resolve().parents[1] / "src"
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(bench_small_ckpt), fmt], capture_output=True,
                       text=True, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    cfg = moe_engine.ModelConfig.from_json(bench_small_ckpt / "config.json")
    spec = None if fmt == "bf16" else QuantSpec(int(fmt[3:]), 128)
    est = estimate_bytes(cfg, backend="cpu", quant=spec, context=64)
    bound = est["weights"] * 1.1 + est["kv_cache"] + 300 * 2 ** 20
    assert got["rss"] <= bound, (f"{fmt}: RSS {got['rss'] / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB "
                                 f"(weights {est['weights'] / 2**20:.0f} MiB; peak {got['peak'] / 2**20:.0f} MiB)")
