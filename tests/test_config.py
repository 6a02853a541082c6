"""config.json -> Config: both RoPE spellings, the GELU names, and clear refusals."""

import json

import pytest

from refprism.checkpoints.synth import make_config
from refprism.errors import ConfigError
from refprism.gemma.config import Config, read_config


def test_gemma_2b_config_fields():
    cfg = Config.from_hf(make_config("gemma-2b"))
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size) == \
        (18, 2048, 8, 1, 256, 16384, 256000)
    assert cfg.group_size == 8 and [cfg.kv_head(h) for h in range(8)] == [0] * 8
    assert cfg.rope_theta == 10000.0 and cfg.rms_norm_eps == 1e-6


def test_rope_parameters_of_transformers_5():
    hf = make_config()
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert Config.from_hf(hf).rope_theta == 1234.0
    hf["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1234.0, "factor": 2.0}
    assert Config.from_hf(hf).rope_scale == 2.0
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1234.0, "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        Config.from_hf(hf)


@pytest.mark.parametrize("act", [{"hidden_act": "gelu"}, {"hidden_activation": "gelu_pytorch_tanh"},
                                 {"hidden_act": "gelu", "hidden_activation": None}])
def test_activation_spellings_all_mean_tanh_gelu(act):
    hf = make_config()
    hf.pop("hidden_act", None), hf.pop("hidden_activation", None)
    hf.update(act)
    assert Config.from_hf(hf).activation == "gelu_pytorch_tanh"


def test_unknown_activation_refused():
    hf = make_config()
    hf.pop("hidden_activation")
    hf["hidden_act"] = "relu"
    with pytest.raises(ConfigError, match="relu"):
        Config.from_hf(hf)


@pytest.mark.parametrize("model_type", ["gemma3", "llama", "recurrent_gemma", None])
def test_other_model_types_refused(model_type):
    hf = make_config()
    hf["model_type"] = model_type
    with pytest.raises(ConfigError, match="model_type"):
        Config.from_hf(hf)


@pytest.mark.parametrize("change, message", [
    (dict(num_attention_heads=0), "num_attention_heads|n_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of"),
    (dict(hidden_size=-64), "positive"),
    (dict(head_dim=15), "even"),
    (dict(vocab_size="512"), "integer"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
])
def test_absurd_values_refused(change, message):
    hf = make_config()
    hf.update(change)
    with pytest.raises(ConfigError, match=message):
        Config.from_hf(hf)


def test_missing_key_named():
    hf = make_config()
    del hf["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        Config.from_hf(hf)


def test_read_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(make_config()))
    assert read_config(tmp_path).n_layers == 2


def test_gemma4_vision_bidirectional_is_causal_text_and_read():
    """Gemma 4's use_bidirectional_attention "vision" opens attention only within runs of image tokens: a text
    prompt is causal, so the config reads as without it (tests/test_parity_gemma4.py holds HF to that)."""
    plain = Config.from_hf(make_config("tiny-gemma4"))
    assert Config.from_hf({**make_config("tiny-gemma4"), "use_bidirectional_attention": "vision"}) == plain
    assert Config.from_hf({**make_config("tiny-gemma4"), "use_bidirectional_attention": None}) == plain


@pytest.mark.parametrize("preset, value", [("tiny-gemma4", "all"), ("tiny-gemma4", True), ("tiny-gemma4", "text"),
                                           ("tiny-gemma3", True), ("tiny-gemma3", "vision")])
def test_bidirectional_text_attention_refused_in_one_line(preset, value):
    """Any value under which HF lets text tokens see later ones (Gemma 4's "all"; Gemma 3 reads any truthy value
    as bidirectional), or that HF does not define, is refused naming the key and the value."""
    with pytest.raises(ConfigError, match=f"use_bidirectional_attention {value!r} is not supported") as e:
        Config.from_hf({**make_config(preset), "use_bidirectional_attention": value})
    assert "\n" not in str(e.value)
