"""The path rule (src/moe_engine/runner.py): one table decides which path a forward call takes.
Each row of the rule's table is checked here, with the Runner reading a stand-in for the
packed weights (only `one_call` and `layers` are read), then once end to end: the path the rule
names is the one a Model call takes."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import moe_engine
import moe_engine.runner as runner_mod
from moe_engine import Capture, TapRequest
from moe_engine.cpu_weights import CpuModelWeights, CpuMoEWeights
from moe_engine.ops import available_backends
from moe_engine.runner import DECODE_STEP_MAX_B, Runner

CFG = SimpleNamespace(max_position_embeddings=8, rope_scaling=None)
CPU = torch.device("cpu")


def cache(B=1, used=0, Tkv_cap=4):
    return SimpleNamespace(k=torch.empty(1, B, 1, Tkv_cap, 1), used=used, capacity=Tkv_cap)


def packed(one_call=True):
    return SimpleNamespace(one_call=one_call, layers=("layer0",))


ONE = torch.tensor([[3]])
# (backend, one_call, ids, cache, keyword args, config) -> decode_step?
DECODE_STEP = [
    ("cpu", True, ONE, cache(), {}, CFG, True),
    ("cpu", True, torch.tensor([3]), cache(), {}, CFG, True),                   # [T] = one token
    ("cpu", True, ONE.int(), cache(), {}, CFG, True),
    ("cpu", False, ONE, cache(), {}, CFG, False),                                # quantized model
    ("torch", None, ONE, cache(), {}, CFG, False),
    ("emu", None, ONE, cache(), {}, CFG, False),
    ("cpu", True, ONE, None, {}, CFG, False),                                    # no cache
    ("cpu", True, ONE, cache(), {"attention_mask": torch.ones(1, 1)}, CFG, False),
    ("cpu", True, ONE, cache(), {"capture": object()}, CFG, False),
    ("cpu", True, torch.tensor([[3, 4]]), cache(), {}, CFG, False),              # T = 2
    ("cpu", True, [[3]], cache(), {}, CFG, False),                               # not a tensor
    ("cpu", True, ONE.float(), cache(), {}, CFG, False),
    ("cpu", True, torch.zeros(DECODE_STEP_MAX_B, 1, dtype=torch.long), cache(DECODE_STEP_MAX_B), {}, CFG, True),
    ("cpu", True, torch.zeros(DECODE_STEP_MAX_B + 1, 1, dtype=torch.long), cache(DECODE_STEP_MAX_B + 1), {}, CFG,
     False),
    ("cpu", True, ONE, cache(B=2), {}, CFG, False),                              # cache of another batch
    ("cpu", True, ONE, cache(used=4, Tkv_cap=4), {}, CFG, False),                      # no free column
    ("cpu", True, ONE, cache(used=8, Tkv_cap=12), {}, CFG, False),                     # beyond the context
    ("cpu", True, ONE, cache(used=8, Tkv_cap=12), {}, SimpleNamespace(max_position_embeddings=8,
     rope_scaling=SimpleNamespace(type="linear")), True),                        # scaled: table rows
    ("cpu", True, ONE, cache(used=8, Tkv_cap=12), {}, SimpleNamespace(max_position_embeddings=8,
     rope_scaling=SimpleNamespace(type="dynamic")), False),                      # per-call base
]


@pytest.mark.parametrize("backend, one_call, ids, kv, kw, cfg, want", DECODE_STEP)
def test_decode_step_rule(backend, one_call, ids, kv, kw, cfg, want):
    run = Runner(backend, packed(one_call) if backend == "cpu" else None)
    assert run.decode_step(ids, kv, cfg, CPU, **kw) is want


@pytest.mark.parametrize("backend, one_call, capture, T, fused_moe, fused_attention", [
    ("cpu", True, None, 1, True, True),
    ("cpu", True, None, 7, True, False),
    ("cpu", True, object(), 1, False, True),     # taps need the op-by-op MoE tensors
    ("cpu", False, None, 1, False, False),       # quantized: op by op
    ("torch", None, None, 1, False, False),
    ("cuda", None, None, 1, False, False),
    ("emu", None, None, 1, False, False),
])
def test_fused_rules(backend, one_call, capture, T, fused_moe, fused_attention):
    run = Runner(backend, packed(one_call) if backend == "cpu" else None)
    assert run.fused_moe(capture) is fused_moe
    assert run.fused_attention(T) is fused_attention


def test_packed_weights_go_with_the_cpu_backend_only():
    with pytest.raises(ValueError, match="packed cpu weights go with backend 'cpu' only"):
        Runner("torch", packed())
    with pytest.raises(ValueError, match="packed cpu weights go with backend 'cpu' only"):
        Runner("cpu", None)


def test_repacked_quantized_weights_go_with_cuda_and_emu_only():
    quant = SimpleNamespace(layer=lambda l, lw, dtype: (lw, f"q{l}"))
    for be in ("torch", "cpu"):
        with pytest.raises(ValueError, match="repacked quantized weights go with backend 'cuda' or 'emu'"):
            Runner(be, packed() if be == "cpu" else None, quant=quant)
    lw = SimpleNamespace()
    assert Runner("emu", quant=quant).layer(1, lw, torch.bfloat16) == (lw, "q1")


def test_layer_reads_the_packed_copy_on_cpu_and_the_weights_elsewhere():
    lw = SimpleNamespace()
    assert Runner("cpu", packed()).layer(0, lw, torch.float32) == (lw, "layer0")


@pytest.fixture(scope="module")
def cpu_model(tiny_fp32_dir):
    if "cpu" not in available_backends():
        pytest.skip("cpu backend not built")
    return moe_engine.load(tiny_fp32_dir, dtype="float32", backend="cpu", progress=False)


def test_the_model_takes_the_path_the_rule_names(cpu_model, monkeypatch):
    """decode_step for a plain decode step, fused MoE for a prefill, op by op with a capture;
    the counts of each come from wrapping the one-call entry points."""
    m = cpu_model
    seen = []
    step, fused = CpuModelWeights.decode_step, CpuMoEWeights.fused
    monkeypatch.setattr(CpuModelWeights, "decode_step", lambda *a, **k: seen.append("step") or step(*a, **k))
    monkeypatch.setattr(CpuMoEWeights, "fused", lambda *a, **k: seen.append("moe") or fused(*a, **k))
    n_moe = len(m.config.moe_layers)
    kv = m.new_cache(2, 8)
    m(torch.tensor([[3, 4, 5], [6, 7, 8]]), cache=kv)
    assert seen == ["moe"] * n_moe
    seen.clear()
    before = copy.deepcopy(kv)
    a = m(torch.tensor([[9], [10]]), cache=kv)
    assert seen == ["step"]
    seen.clear()
    cap = Capture(TapRequest(["blocks.*.moe.hook_topk_ids"]))
    b = m(torch.tensor([[9], [10]]), cache=before, capture=cap)
    assert seen == [] and torch.equal(a, b)
    seen.clear()
    monkeypatch.setattr(runner_mod, "DECODE_STEP_MAX_B", 1)  # a batch of 2 no longer fits the step
    m(torch.tensor([[11], [12]]), cache=kv)
    assert seen == ["moe"] * n_moe
