import pytest
import torch

import kiln
from kiln.config import PRESETS, ModelConfig, RopeScaling


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_count_parameters_exactly(name):
    config = kiln.preset(name)
    # On the meta device even the billion-parameter presets build in no memory and no time.
    with torch.device("meta"):
        model = kiln.Transformer(config)
    assert model.num_parameters() == config.num_parameters()
    assert len(model.layers) == config.num_layers


@pytest.mark.parametrize(
    "overrides",
    [
        dict(position="learned", norm="layernorm", mlp="plain", activation="gelu_tanh", qkv_bias=True),
        dict(position="alibi", embedding_norm=True, out_bias=True, mlp_bias=True),
        dict(num_kv_heads=1, head_dim=24, tie_word_embeddings=False),
    ],
)
def test_parameter_count_matches_model(overrides):
    config = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, **overrides)
    assert kiln.Transformer(config).num_parameters() == config.num_parameters()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=5), "not divisible by num_heads"),
        (dict(num_kv_heads=3), "must be a multiple of num_kv_heads"),
        (dict(position="sinusoidal"), "position must be one of learned, rope, alibi"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(head_dim=7), "RoPE needs an even head_dim"),
        (dict(position="alibi", rope_scaling=RopeScaling(kind="linear", factor=2.0)), "rope_scaling is set"),
        (dict(sliding_window=0), "sliding_window must be positive"),
        (dict(vocab_size=0), "vocab_size must be positive"),
        (dict(norm_eps=0.0), "norm_eps must be > 0"),
    ],
)
def test_invalid_configs_raise_clear_errors(overrides, message):
    values = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4) | overrides
    with pytest.raises(ValueError, match=message):
        ModelConfig(**values)


def test_rope_scaling_validation():
    with pytest.raises(ValueError, match="rope scaling kind 'yarn' is not supported"):
        RopeScaling(kind="yarn", factor=2.0)


def test_round_trip_through_dict():
    config = kiln.preset("tiny", rope_scaling=RopeScaling(kind="llama3", factor=8.0))
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ModelConfig fields: bogus"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        kiln.preset("huge")
