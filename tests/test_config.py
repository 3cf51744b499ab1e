"""ModelConfig: the published 16B config, round trips, derived shapes, every refused field."""

import dataclasses
import json

import pytest

from moe_engine.config import ConfigError, ModelConfig, RopeScaling
from moe_engine.synthetic import PUBLISHED_CONFIG


def write(tmp_path, d):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    return p


def test_published_16b_config():
    c = ModelConfig.from_dict(PUBLISHED_CONFIG)
    assert (c.hidden_size, c.head_dim, c.num_key_value_heads) == (2048, 128, 16)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.shared_width) == (64, 6, 2816)
    assert c.moe_layers == tuple(range(1, 28))
    assert not c.is_moe_layer(0) and c.is_moe_layer(27)
    assert c.norm_topk_prob is False and c.rope_scaling is None


def test_round_trip_keeps_extra_keys(tmp_path):
    c = ModelConfig.from_json(write(tmp_path, PUBLISHED_CONFIG))
    assert c.source.endswith("config.json")
    d = c.to_dict()
    assert d["aux_loss_alpha"] == 0.001 and d["auto_map"] == PUBLISHED_CONFIG["auto_map"]
    assert d["architectures"] == ["DeepseekForCausalLM"]
    assert ModelConfig.from_dict(d) == c
    assert ModelConfig.from_json(write(tmp_path, d)) == c
    assert ModelConfig.from_json(tmp_path) == c  # a directory holding config.json
    assert hash(c) == hash(ModelConfig.from_dict(d))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 1


def test_defaults_and_optional_fields():
    d = {k: v for k, v in PUBLISHED_CONFIG.items()
         if k not in ("num_key_value_heads", "architectures", "model_type")}
    c = ModelConfig.from_dict({**d, "n_shared_experts": None})
    assert c.num_key_value_heads == 16 and c.n_shared_experts == 0 and c.shared_width == 0
    assert c.architectures == ("DeepseekForCausalLM",) and c.model_type == "deepseek"


def test_moe_layer_freq():
    c = ModelConfig.from_dict({**PUBLISHED_CONFIG, "num_hidden_layers": 7,
                               "first_k_dense_replace": 1, "moe_layer_freq": 2})
    assert c.moe_layers == (2, 4, 6)
    with pytest.raises(IndexError):
        c.is_moe_layer(7)


@pytest.mark.parametrize("rope", [
    {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 4},
    {"rope_type": "linear", "factor": 1.5}])
def test_rope_scaling_accepted(rope):
    c = ModelConfig.from_dict({**PUBLISHED_CONFIG, "rope_scaling": rope})
    assert c.rope_scaling == RopeScaling(rope.get("type", rope.get("rope_type")),
                                         float(rope["factor"]))
    assert ModelConfig.from_dict(c.to_dict()) == c


REFUSED = [
    ("architectures", ["LlamaForCausalLM"]), ("model_type", "deepseek_v2"),
    ("scoring_func", "sigmoid"), ("hidden_act", "gelu"), ("attention_bias", True),
    ("pretraining_tp", 2), ("rope_scaling", {"type": "yarn", "factor": 4.0}),
    ("rope_scaling", {"type": "linear", "factor": 0.5}), ("rope_scaling", "linear"),
    ("num_experts_per_tok", 65), ("num_experts_per_tok", 0), ("num_attention_heads", 15),
    ("num_key_value_heads", 3), ("hidden_size", "2048"), ("vocab_size", 0),
    ("torch_dtype", "int8"), ("rms_norm_eps", 0), ("rope_theta", -1.0),
    ("bos_token_id", 102400), ("eos_token_id", -1), ("norm_topk_prob", "yes"),
    ("tie_word_embeddings", 1), ("n_shared_experts", -1), ("first_k_dense_replace", -1),
    ("moe_layer_freq", 0), ("max_position_embeddings", 0), ("n_routed_experts", True),
]


@pytest.mark.parametrize("field,value", REFUSED, ids=[f"{f}={v!r}" for f, v in REFUSED])
def test_refused_field(tmp_path, field, value):
    path = write(tmp_path, {**PUBLISHED_CONFIG, field: value})
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(path)
    msg = str(e.value)
    assert str(path) in msg and field in msg and "supported" in msg, msg
    assert repr(value) in msg or json.dumps(value) in msg or str(value) in msg, msg
    assert isinstance(e.value, ValueError)


def test_missing_required_field(tmp_path):
    d = {k: v for k, v in PUBLISHED_CONFIG.items() if k != "n_routed_experts"}
    with pytest.raises(ConfigError, match=r"config\.json.*missing required.*n_routed_experts"):
        ModelConfig.from_json(write(tmp_path, d))


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json.*JSON"):
        ModelConfig.from_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json(bad)
