"""Loader: packed weights equal the raw safetensors tensor by tensor (single file and shards,
bf16 and fp32, tied embeddings), and every broken checkpoint gives a CheckpointError that names
the file and the tensor. Also pins the synthetic checkpoint's layout guarantees."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_engine.config import ModelConfig
from moe_engine.loader import (CheckpointError, DenseMLPWeights, MoEWeights, checkpoint_layout,
                               load_checkpoint, load_weights)
from moe_engine.synthetic import make_checkpoint

INDEX = "model.safetensors.index.json"


def raw_tensors(ckpt):
    """name -> tensor as stored, through the index when sharded."""
    index = ckpt / INDEX
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    out = {}
    for f in files:
        with safe_open(str(ckpt / f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def unpack(w, c):
    """HF name -> tensor view of the packed ModelWeights (inverse of the loader's packing)."""
    out = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm,
           "lm_head.weight": w.lm_head}

    def mlp(prefix, m: DenseMLPWeights):
        F = m.down.shape[1]
        out.update({prefix + "gate_proj.weight": m.gate_up[:F],
                    prefix + "up_proj.weight": m.gate_up[F:], prefix + "down_proj.weight": m.down})

    for l, L in enumerate(w.layers):
        p = f"model.layers.{l}."
        out.update({p + "input_layernorm.weight": L.input_norm,
                    p + "post_attention_layernorm.weight": L.post_attn_norm,
                    p + "self_attn.q_proj.weight": L.q, p + "self_attn.k_proj.weight": L.k,
                    p + "self_attn.v_proj.weight": L.v, p + "self_attn.o_proj.weight": L.o})
        if isinstance(L.mlp, MoEWeights):
            F = c.moe_intermediate_size
            out[p + "mlp.gate.weight"] = L.mlp.router
            for e in range(c.n_routed_experts):
                q = f"{p}mlp.experts.{e}."
                out.update({q + "gate_proj.weight": L.mlp.experts_gate_up[e, :F],
                            q + "up_proj.weight": L.mlp.experts_gate_up[e, F:],
                            q + "down_proj.weight": L.mlp.experts_down[e]})
            if L.mlp.shared is not None:
                mlp(p + "mlp.shared_experts.", L.mlp.shared)
        else:
            mlp(p + "mlp.", L.mlp)
    return out


def all_tensors(w):
    yield w.embed, w.final_norm, w.lm_head
    for L in w.layers:
        yield L.input_norm, L.post_attn_norm, L.q, L.k, L.v, L.o
        m = L.mlp
        if isinstance(m, MoEWeights):
            yield m.router, m.experts_gate_up, m.experts_down
            m = m.shared
        if m is not None:
            yield m.gate_up, m.down


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_round_trip(tiny_ckpt, tiny_ckpt_sharded, sharded, dtype):
    ckpt = tiny_ckpt_sharded if sharded else tiny_ckpt
    c, w = load_checkpoint(ckpt, dtype=dtype, progress=False)
    raw = raw_tensors(ckpt)
    got = unpack(w, c)
    assert set(got) == set(raw) == set(checkpoint_layout(c))
    for name, t in raw.items():
        assert got[name].dtype == dtype and torch.equal(got[name], t.to(dtype)), name
    for group in all_tensors(w):
        assert all(t.is_contiguous() and t.dtype == dtype for t in group)
    E, F, D, I = c.n_routed_experts, c.moe_intermediate_size, c.hidden_size, c.intermediate_size
    assert [isinstance(L.mlp, MoEWeights) for L in w.layers] == [False, True, True]
    assert w.layers[0].mlp.gate_up.shape == (2 * I, D) and w.layers[0].mlp.down.shape == (D, I)
    moe = w.layers[1].mlp
    assert moe.router.shape == (E, D)
    assert moe.experts_gate_up.shape == (E, 2 * F, D) and moe.experts_down.shape == (E, D, F)
    assert moe.shared.gate_up.shape == (2 * c.shared_width, D)
    assert w.lm_head.data_ptr() != w.embed.data_ptr()


def test_sharded_equals_single_and_splits_a_layer(tiny_ckpt, tiny_ckpt_sharded):
    assert {k: v.tolist() for k, v in raw_tensors(tiny_ckpt).items()} == \
           {k: v.tolist() for k, v in raw_tensors(tiny_ckpt_sharded).items()}
    weight_map = json.loads((tiny_ckpt_sharded / INDEX).read_text())["weight_map"]
    shards_of_layer = {}
    for name, shard in weight_map.items():
        if m := re.match(r"model\.layers\.(\d+)\.", name):
            shards_of_layer.setdefault(int(m.group(1)), set()).add(shard)
    assert len(set(weight_map.values())) == 3
    assert any(len(s) > 1 for s in shards_of_layer.values()), shards_of_layer


def test_fp32_checkpoint_loads_as_bf16(tmp_path):
    ckpt = make_checkpoint(tmp_path, "tiny", dtype="float32", layers=2)
    c, w = load_checkpoint(ckpt, dtype="bfloat16", progress=False)
    got = unpack(w, c)
    for name, t in raw_tensors(ckpt).items():
        assert t.dtype == torch.float32 and torch.equal(got[name], t.to(torch.bfloat16)), name


def test_tied_embeddings(tmp_path):
    ckpt = make_checkpoint(tmp_path, "tiny", overrides={"tie_word_embeddings": True})
    assert "lm_head.weight" not in raw_tensors(ckpt)
    c, w = load_checkpoint(ckpt, progress=False)
    assert w.lm_head is w.embed and w.lm_head.data_ptr() == w.embed.data_ptr()
    # A tied checkpoint that also stores lm_head (some exports do) loads the same.
    tensors = load_file(ckpt / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
              ckpt / "model.safetensors")
    c2, w2 = load_checkpoint(ckpt, progress=False)
    assert w2.lm_head is w2.embed and torch.equal(w2.embed, w.embed)


def test_no_shared_experts_and_moe_layer_freq(tmp_path):
    ckpt = make_checkpoint(tmp_path, "tiny", layers=4,
                           overrides={"n_shared_experts": 0, "moe_layer_freq": 2})
    c, w = load_checkpoint(ckpt, progress=False)
    assert c.moe_layers == (2,)
    assert [type(L.mlp).__name__ for L in w.layers] == ["DenseMLPWeights"] * 2 + [
        "MoEWeights", "DenseMLPWeights"]
    assert w.layers[2].mlp.shared is None


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_ckpt):
    again = make_checkpoint(tmp_path / "a", "tiny")
    other = make_checkpoint(tmp_path / "b", "tiny", seed=1)
    weights = (tiny_ckpt / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    assert (again / "tokenizer.json").read_text() == (tiny_ckpt / "tokenizer.json").read_text()


def test_weights_do_not_alias_the_files(tiny_ckpt, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt)
    c, w = load_checkpoint(ckpt, progress=False)
    before = {k: v.clone() for k, v in unpack(w, c).items()}
    f = ckpt / "model.safetensors"
    with open(f, "r+b") as fh:  # overwrite in place: a mapped tensor would see the zeros
        fh.write(bytes(f.stat().st_size))
    assert all(torch.equal(v, before[k]) for k, v in unpack(w, c).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda(tiny_ckpt):
    c, w = load_checkpoint(tiny_ckpt, device="cuda", progress=False)
    _, ref = load_checkpoint(tiny_ckpt, progress=False)
    got, want = unpack(w, c), unpack(ref, c)
    for name, t in got.items():
        assert t.is_cuda and torch.equal(t.cpu(), want[name]), name


def test_progress_bar(tiny_ckpt, capsys):
    load_checkpoint(tiny_ckpt, progress=True)
    assert "tensor" in capsys.readouterr().err
    load_checkpoint(tiny_ckpt, progress=False)
    assert capsys.readouterr().err == ""


def test_unsupported_load_dtype(tiny_ckpt):
    with pytest.raises(ValueError, match="float16"):
        load_checkpoint(tiny_ckpt, dtype=torch.float16, progress=False)


def test_cli(tmp_path):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "make_checkpoint_cli", Path(__file__).parents[1] / "tools" / "make_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path), "--preset", "tiny", "--layers", "2", "--shards", "2",
                     "--dtype", "float32", "--set", "rope_theta=500000",
                     "--set", 'rope_scaling={"type":"dynamic","factor":2}']) == 0
    c, w = load_checkpoint(tmp_path, dtype="float32", progress=False)
    assert (c.num_hidden_layers, c.rope_theta, c.rope_scaling.type) == (2, 500000.0, "dynamic")
    assert c.torch_dtype == "float32" and (tmp_path / INDEX).exists()


# ---- broken checkpoints -----------------------------------------------------------------------

EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


def rewrite(ckpt, edit, file="model.safetensors"):
    tensors = load_file(ckpt / file)
    edit(tensors)
    save_file(tensors, ckpt / file)


def expect_error(ckpt, *needles):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, progress=False)
    msg = str(e.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in: {msg}"
    assert isinstance(e.value, ValueError)
    return msg


def test_missing_tensor(tiny_ckpt, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt)
    rewrite(ckpt, lambda t: t.pop(EXPERT))
    expect_error(ckpt, ckpt / "model.safetensors", EXPERT, "missing", "[32, 64]")


def test_unexpected_tensor(tiny_ckpt, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt)
    extra = {"model.layers.1.mlp.gate.bias": torch.zeros(8),
             "model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(1)}
    rewrite(ckpt, lambda t: t.update(extra))
    expect_error(ckpt, ckpt / "model.safetensors", "unexpected", "model.layers.1.mlp.gate.bias",
                 "model.layers.0.mlp.experts.0.up_proj.weight")


def test_ignored_rotary_buffer(tiny_ckpt, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt)
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite(ckpt, lambda t: t.update({buffer: torch.ones(8)}))
    load_checkpoint(ckpt, progress=False)


def test_wrong_shape(tiny_ckpt, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt)
    rewrite(ckpt, lambda t: t.update({EXPERT: t[EXPERT].T.contiguous()}))
    expect_error(ckpt, ckpt / "model.safetensors", EXPERT, "[64, 32]", "expected [32, 64]")


@pytest.mark.parametrize("dtype,label", [(torch.int64, "I64"), (torch.float64, "F64")])
def test_unsupported_dtype(tiny_ckpt, copy_ckpt, dtype, label):
    ckpt = copy_ckpt(tiny_ckpt)
    rewrite(ckpt, lambda t: t.update({EXPERT: t[EXPERT].to(dtype)}))
    expect_error(ckpt, ckpt / "model.safetensors", EXPERT, label, "dtype")


def test_truncated_file(tiny_ckpt, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    expect_error(ckpt, f, "truncated", "lm_head.weight")  # the last tensor is the one cut off
    f.write_bytes(data[:5000])  # cut inside the header
    expect_error(ckpt, f, "truncated", "header length")
    f.write_bytes(data[:3])
    expect_error(ckpt, f, "truncated")


def test_corrupt_header(tiny_ckpt, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt)
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\x00{["
    f.write_bytes(bytes(data))
    expect_error(ckpt, f, "corrupt", "JSON")


def test_corrupt_offsets(tiny_ckpt, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    begin, end = header[EXPERT]["data_offsets"]
    header[EXPERT]["data_offsets"] = [begin, end + 2]  # wrong size for its shape
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])
    expect_error(ckpt, f, EXPERT, "corrupt", "data_offsets")


def test_missing_shard(tiny_ckpt_sharded, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt_sharded)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    weight_map = json.loads((ckpt / INDEX).read_text())["weight_map"]
    msg = expect_error(ckpt, ckpt / INDEX, "model-00002-of-00003.safetensors", "missing")
    assert any(n in msg for n, s in weight_map.items() if s == "model-00002-of-00003.safetensors")


def test_index_points_to_wrong_shard(tiny_ckpt_sharded, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt_sharded)
    index = json.loads((ckpt / INDEX).read_text())
    name, shard = next((n, s) for n, s in index["weight_map"].items()
                       if s == "model-00001-of-00003.safetensors")
    index["weight_map"][name] = "model-00003-of-00003.safetensors"
    (ckpt / INDEX).write_text(json.dumps(index))
    expect_error(ckpt, ckpt / INDEX, name, "model-00003-of-00003.safetensors", "does not hold")


def test_truncated_shard(tiny_ckpt_sharded, copy_ckpt):
    ckpt = copy_ckpt(tiny_ckpt_sharded)
    f = ckpt / "model-00003-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    expect_error(ckpt, f, "truncated", "lm_head.weight")


def test_missing_config_directory_and_weights(tiny_ckpt, copy_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt)
    (ckpt / "config.json").unlink()
    expect_error(ckpt, ckpt / "config.json", "missing")
    expect_error(tmp_path / "nowhere", tmp_path / "nowhere", "not found")
    (ckpt / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    (ckpt / "model.safetensors").rename(ckpt / "weights.safetensors")
    expect_error(ckpt, "model.safetensors", INDEX, "weights.safetensors")


def test_config_of_another_shape(tiny_ckpt):
    d = json.loads((tiny_ckpt / "config.json").read_text())
    config = ModelConfig.from_dict({**d, "moe_intermediate_size": 48}, source="other/config.json")
    with pytest.raises(CheckpointError) as e:
        load_weights(tiny_ckpt, config, progress=False)
    msg = str(e.value)
    assert "model.safetensors" in msg and "other/config.json" in msg and "expected [48, 64]" in msg
