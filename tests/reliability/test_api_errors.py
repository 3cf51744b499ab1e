"""Every bad input to the Python API is a typed exception whose message names the value and
what was expected (issue 13, items 1, 3, 4, 6, 7): one table row per case.

Each row: a call, the exception type, and a regular expression the message must match (it
names the bad value and what was expected).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_engine
from moe_engine import Capture, TapRequest
from moe_engine.config import ConfigError, ModelConfig
from moe_engine.cpu_weights import dense
from moe_engine.loader import CheckpointError, load_checkpoint
from moe_engine.model import KVCache, Model, set_threads


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return Model.load(tiny_ckpt, backend="cpu", progress=False)


def _other_cache(model, **change):
    """A KVCache shaped like new_cache(1, 8) except for `change` (L, Hkv, hd, dtype)."""
    c = model.config
    L, Hkv, hd = change.get("L", c.num_hidden_layers), change.get("Hkv", c.num_key_value_heads), change.get("hd", c.head_dim)
    dt = change.get("dtype", model.dtype)
    k = torch.zeros(L, 1, Hkv, 8, hd, dtype=dt)
    return KVCache(k, k.clone(), torch.zeros(1, 8, dtype=torch.bool), torch.zeros(1, dtype=torch.long))


ONE = torch.tensor([[5]])

# (id, call(model), exception, message pattern)
MODEL_CASES = [
    ("ids-str", lambda m: m.forward("hello"), TypeError, r"input_ids must be token ids.*str 'hello'"),
    ("ids-None", lambda m: m.forward(None), TypeError, r"input_ids must be token ids.*NoneType"),
    ("ids-bytes", lambda m: m.forward(b"ab"), TypeError, r"input_ids.*bytes"),
    ("ids-float", lambda m: m.forward(torch.tensor([[1.5]])), ValueError, r"integer token ids.*float"),
    ("ids-empty", lambda m: m.forward(torch.zeros(1, 0, dtype=torch.long)), ValueError, r"Q >= 1.*\[1, 0\]"),
    ("ids-vocab", lambda m: m.forward(torch.tensor([[10**6]])), ValueError, r"token id 1000000 is outside"),
    ("logits-mode", lambda m: m.forward(ONE, logits="first"), ValueError, r"logits = 'first'"),
    ("step-neg", lambda m: m.forward(ONE, step=-1), ValueError, r"step = -1"),
    ("cache-type", lambda m: m.forward(ONE, cache={"k": 1}), TypeError, r"cache must be a KVCache.*dict"),
    ("capture-type", lambda m: m.forward(ONE, capture=[1]), TypeError, r"capture must be a taps.Capture"),
    ("new-cache-neg", lambda m: m.new_cache(-1, 4), ValueError, r"batch = -1; expected >= 1"),
    ("new-cache-float", lambda m: m.new_cache(1, 2.5), TypeError, r"max_len must be an int.*2.5"),
    ("cache-fewer-layers", lambda m: m.forward(ONE, cache=_other_cache(m, L=2)), ValueError,
     r"cache.k has shape \[2, 1, .*needs \[L=3"),
    ("cache-dtype", lambda m: m.forward(ONE, cache=_other_cache(m, dtype=torch.float32)), ValueError,
     r"cache.k is torch.float32.*needs a contiguous torch.bfloat16"),
    ("cache-head-dim", lambda m: m.forward(ONE, cache=_other_cache(m, hd=8)), ValueError, r"hd=16\]"),
    ("cache-kv-heads", lambda m: m.forward(ONE, cache=_other_cache(m, Hkv=1)), ValueError, r"Hkv=4"),
    ("mask-dense-layer", lambda m: m.forward(ONE, expert_mask={0: [1]}), ValueError,
     r"expert_mask: layer 0 is a dense layer"),
    ("topk-dense-layer", lambda m: m.forward(ONE, topk={0: 1}), ValueError, r"topk: layer 0 is a dense layer"),
    ("force-dense-layer", lambda m: m.forward(ONE, force_experts={0: 1}), ValueError,
     r"force_experts: layer 0 is a dense layer"),
    ("mask-tensor-dense-row", lambda m: m.forward(ONE, expert_mask=torch.eye(3, 8, dtype=torch.bool)), ValueError,
     r"layer 0 is a dense layer"),
    ("topk-str", lambda m: m.forward(ONE, topk="2"), TypeError, r"topk = '2'; expected an int"),
    ("topk-list-str", lambda m: m.forward(ONE, topk=[None, "2", 2]), TypeError, r"topk\[1\] = '2' must be an int"),
    ("mask-ids-str", lambda m: m.forward(ONE, expert_mask={1: "12"}), TypeError, r"expert_mask\[1\] must be a list"),
    ("renormalize-str", lambda m: m.forward(ONE, renormalize="yes"), TypeError, r"renormalize must be"),
    ("tap-positions-empty", lambda m: _tap(m, [99]), LookupError,
     r"positions \[99\] selected no token in 1 call\(s\) \(positions seen: 0..1\)"),
]


def _tap(m, positions):
    cap = Capture(TapRequest(["logits"], positions=positions))
    m.forward(torch.tensor([[5, 6]]), capture=cap)
    return cap["logits"]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model_api_refuses(model, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(model)


def test_a_mask_for_every_moe_layer_still_works(model):
    """A bool [E] mask means every MoE layer: the dense layer's row is not a refusal."""
    mask = torch.zeros(model.config.n_routed_experts, dtype=torch.bool)
    mask[0] = True
    a = model.forward(ONE, expert_mask=mask)
    b = model.forward(ONE, expert_mask={l: [0] for l in model.config.moe_layers})
    assert torch.equal(a, b)


@pytest.mark.parametrize("value,pattern", [
    ("hello", r"TapRequest positions = 'hello'"), ([1, -2], r"-2 is not a non-negative int"),
    ([True], r"True is not a non-negative int"), (3.5, r"TapRequest positions = 3.5"),
    (torch.tensor([1, 2]), r"bool \[B, Q\] mask"),
])
def test_tap_request_refuses(value, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        TapRequest(["logits"], positions=value)


def test_tap_request_name_string_is_one_pattern():
    assert TapRequest("logits").names == ("logits",)


# ---- loading --------------------------------------------------------------------------------

LOAD_CASES = [
    ("path-int", lambda d: Model.load(123), TypeError, r"path must be a str or os.PathLike.*int 123"),
    ("path-file", lambda d: Model.load(d / "config.json"), NotADirectoryError, r"is a file, not a checkpoint"),
    ("path-missing", lambda d: Model.load(d / "nope"), FileNotFoundError, r"nope does not exist"),
    ("nonfinite-flag", lambda d: Model.load(d, allow_nonfinite="yes"), TypeError, r"allow_nonfinite must be a bool"),
    ("ckpt-file", lambda d: load_checkpoint(d / "config.json"), CheckpointError, r"is a file, not a checkpoint"),
    ("dtype", lambda d: Model.load(d, dtype="int8"), ValueError, r"dtype 'int8' is not supported"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_load_refuses(tiny_ckpt, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(tiny_ckpt)


def _poison(ckpt: Path, name: str, value: float) -> None:
    f = ckpt / "model.safetensors"
    t = load_file(str(f))
    t[name] = t[name].clone()
    t[name].view(-1)[7] = value
    save_file(t, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weight_refused_by_name(tiny_ckpt, copy_ckpt, value):
    d = copy_ckpt(tiny_ckpt)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    _poison(d, name, value)
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds {int(value != value)} NaN and "
                                              rf"{int(value == float('inf'))} Inf.*allow_nonfinite"):
        Model.load(d, progress=False)
    m = Model.load(d, progress=False, allow_nonfinite=True)  # the escape hatch loads it as it is
    down = dense(m.weights.layers[2].mlp.experts_down, m.dtype)  # the cpu backend holds panels
    assert not bool(torch.isfinite(down[5]).all())


def test_truncated_while_loading_is_a_checkpoint_error(tiny_ckpt, copy_ckpt, monkeypatch):
    """The file shrinks after its header was checked (another process rewriting it): the read
    comes up short and says so; with a memory map this was SIGBUS."""
    d = copy_ckpt(tiny_ckpt)
    import moe_engine.loader as L
    real = L._check_checkpoint

    def check_then_truncate(ckpt, config):
        out = real(ckpt, config)
        f = d / "model.safetensors"
        os.truncate(f, f.stat().st_size // 2)
        return out

    monkeypatch.setattr(L, "_check_checkpoint", check_then_truncate)
    with pytest.raises(CheckpointError, match=r"the file ended after \d+ bytes, \d+ bytes short"):
        load_checkpoint(d, progress=False)


@pytest.mark.parametrize("shard", ["/etc/model.safetensors", "../outside.safetensors"])
def test_shard_paths_stay_inside_the_checkpoint(tiny_ckpt_sharded, copy_ckpt, shard):
    d = copy_ckpt(tiny_ckpt_sharded)
    index = d / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    first = next(iter(obj["weight_map"]))
    obj["weight_map"][first] = shard
    index.write_text(json.dumps(obj))
    with pytest.raises(CheckpointError, match=rf"shard path '{shard}' points outside the checkpoint directory"):
        load_checkpoint(d, progress=False)


def test_fifo_as_model_safetensors(tiny_ckpt, copy_ckpt):
    d = copy_ckpt(tiny_ckpt)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: is a FIFO, not a regular safetensors file"):
        load_checkpoint(d, progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_directory(tiny_ckpt, copy_ckpt):
    d = copy_ckpt(tiny_ckpt)
    d.chmod(0)
    try:
        with pytest.raises(CheckpointError, match=r"not readable \(permission denied\)"):
            load_checkpoint(d, progress=False)
    finally:
        d.chmod(0o755)


# ---- config ------------------------------------------------------------------------------------

def _cfg(**change):
    base = json.loads((moe_engine.model.default_model_dir() / "config.json").read_text())
    base.update(change)
    return lambda: ModelConfig.from_dict(base, source="test.json")


CONFIG_CASES = [
    ("odd-head-dim", _cfg(hidden_size=36, num_attention_heads=4, num_key_value_heads=4), r"head_dim = 9"),
    ("huge-context", _cfg(max_position_embeddings=10**12), r"RoPE table would take ~[\d,]+ GiB.*max_position_embeddings"),
    ("huge-vocab", _cfg(vocab_size=10**12), r"weights in bfloat16 would take ~[\d,]+ GiB"),
    ("huge-layers", _cfg(num_hidden_layers=10**9), r"weights in bfloat16 would take"),
    ("float-context", _cfg(max_position_embeddings=1e12), r"max_position_embeddings = 1000000000000.0; supported: an integer"),
]


@pytest.mark.parametrize("make,pattern", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_refuses(make, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make()


# ---- threads -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -1, 100000, 2.5, True, "4"])
def test_set_threads_refuses(n):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=rf"threads = {n!r}; expected an integer in 1\.\.\d+"):
        set_threads(n)
    assert torch.get_num_threads() == before


def test_kernels_cap_their_threads(model, tiny_ckpt):
    """Past set_threads (torch.set_num_threads directly), the C++ kernels still cap their
    OpenMP regions at 4x the CPUs, so a pack with 1000 requested runs. (The model's own weights
    are packed already, and packing them again is refused by name.)"""
    from moe_engine.cpu_weights import CpuModelWeights
    with pytest.raises(ValueError, match="already packed"):
        CpuModelWeights.pack(model.weights)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1000)
        CpuModelWeights.pack(load_checkpoint(tiny_ckpt, progress=False)[1])
    finally:
        torch.set_num_threads(before)
