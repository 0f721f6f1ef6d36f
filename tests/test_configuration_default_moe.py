"""DefaultMoeConfig: defaults, round trip, and a clear ValueError naming the field for every invalid value."""

import pytest

from default_moe import DefaultMoeConfig


def test_defaults_follow_the_paper():
    config = DefaultMoeConfig()
    assert config.model_type == "default_moe"
    assert config.routing == "default"
    assert config.default_ema_beta == 0.9
    assert config.default_ema_weighting == "mean"
    assert config.default_ema_update == "before_use"
    assert config.default_in_inference is True
    assert config.default_term == "forward"
    assert config.default_ema_source == "routed"
    assert config.all_reduce_router_stats is True
    assert config.norm_topk_prob is False
    assert config.router_aux_loss_coef == 0.01
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.num_local_experts == config.num_experts  # Mixtral's name works too


@pytest.mark.parametrize(
    "fields",
    [
        dict(qk_norm=True, norm_placement="post", clip_qkv=8.0, num_dense_layers=1, sliding_window=128),
        dict(
            qk_norm="head",
            dense_layers=[2, 0],
            shared_expert_intermediate_size=48,
            sliding_window=16,
            layer_types=["full_attention", "sliding_attention"] * 4,
            rope_parameters={
                "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
            },
        ),
    ],
    ids=["olmoe-style", "qwen-olmo3-style"],
)
def test_save_and_load_round_trip(tmp_path, fields):
    config = DefaultMoeConfig(
        hidden_size=64,
        num_attention_heads=4,
        routing="topk",
        default_ema_weighting="router_prob",
        default_ema_update="after_use",
        **fields,
    )
    config.save_pretrained(tmp_path)
    loaded = DefaultMoeConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_per_layer_fields_and_their_shorthands():
    """`dense_layers` and `layer_types` are always lists after construction; configs written before they existed
    (`num_dense_layers`, a `sliding_window` for every layer, `qk_norm=True`) load as they always did."""
    old = DefaultMoeConfig(num_hidden_layers=4, num_dense_layers=2, sliding_window=8, qk_norm=True)
    assert (old.dense_layers, old.moe_layers, old.num_dense_layers) == ([0, 1], [2, 3], 2)
    assert old.layer_types == ["sliding_attention"] * 4 and old.qk_norm == "projection"
    plain = DefaultMoeConfig(num_hidden_layers=3)
    assert (plain.dense_layers, plain.moe_layers, plain.layer_types) == ([], [0, 1, 2], ["full_attention"] * 3)
    anywhere = DefaultMoeConfig(num_hidden_layers=4, dense_layers=[3, 1])
    assert (anywhere.dense_layers, anywhere.moe_layers, anywhere.num_dense_layers) == ([1, 3], [0, 2], 2)
    assert DefaultMoeConfig.from_dict(anywhere.to_dict()).dense_layers == [1, 3]  # the count agrees on reload


@pytest.mark.parametrize(
    ("overrides", "field", "accepted"),
    [
        (dict(default_ema_beta=1.0), "default_ema_beta", "[0, 1)"),
        (dict(default_ema_beta=-0.1), "default_ema_beta", "[0, 1)"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok", "at most num_experts=4"),
        (dict(routing="dense"), "routing", "'default', 'topk'"),
        (dict(norm_placement="sandwich"), "norm_placement", "'pre', 'post'"),
        (dict(default_ema_weighting="median"), "default_ema_weighting", "'mean', 'router_prob'"),
        (dict(default_ema_update="later"), "default_ema_update", "'before_use', 'after_use'"),
        (dict(default_term="backward"), "default_term", "'forward', 'gradient'"),
        (dict(default_ema_source="all"), "default_ema_source", "'routed', 'unrouted'"),
        (dict(default_probe_stride=0), "default_probe_stride", "positive integer"),
        (dict(hidden_size=100, num_attention_heads=16), "num_attention_heads", "divisor of hidden_size=100"),
        (dict(num_attention_heads=16, num_key_value_heads=5), "num_key_value_heads", "divisor of num_attention"),
        (dict(num_experts=0), "num_experts", "positive integer"),
        (dict(num_hidden_layers=2, num_dense_layers=3), "num_dense_layers", "[0, num_hidden_layers=2]"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef", "non-negative"),
        (dict(clip_qkv=0.0), "clip_qkv", "positive"),
        (dict(qk_norm="per_head"), "qk_norm", "(False, 'projection', 'head')"),
        (dict(qk_norm=1), "qk_norm", "(False, 'projection', 'head')"),
        (dict(num_hidden_layers=2, layer_types=["full_attention"]), "layer_types", "num_hidden_layers=2"),
        (
            dict(num_hidden_layers=2, sliding_window=4, layer_types=["full_attention", "chunked_attention"]),
            "layer_types",
            "('full_attention', 'sliding_attention')",
        ),
        (
            dict(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"]),
            "sliding_window",
            "layer_types has sliding layers",
        ),
        (dict(num_hidden_layers=2, dense_layers=[2]), "dense_layers", "[0, num_hidden_layers=2)"),
        (dict(num_hidden_layers=2, dense_layers=[1, 1]), "dense_layers", "distinct"),
        (dict(num_hidden_layers=3, dense_layers=[2], num_dense_layers=2), "num_dense_layers", "len(dense_layers)=1"),
        (dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size", "None or a positive integer"),
        (
            dict(
                num_hidden_layers=2,
                sliding_window=4,
                layer_types=["full_attention", "sliding_attention"],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}},
            ),
            "rope_parameters",
            "one entry per attention kind",
        ),
    ],
)
def test_invalid_values_raise_value_error_naming_field(overrides, field, accepted):
    with pytest.raises(ValueError) as error:
        DefaultMoeConfig(**overrides)
    assert f"DefaultMoeConfig.{field}=" in str(error.value)
    assert accepted in str(error.value)


def test_explicit_head_dim_allows_non_dividing_hidden_size():
    config = DefaultMoeConfig(hidden_size=100, num_attention_heads=4, head_dim=32)
    assert config.head_dim == 32
