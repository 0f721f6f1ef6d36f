"""DefaultMoeConfig: defaults, round trip, a clear ValueError naming the field for every invalid value, and the
tensor- and expert-parallel plans it gives a model."""

import re

import pytest
import torch
import transformers

from default_moe import DefaultMoeConfig
from default_moe.configuration_default_moe import EXPERTS_IN_TP_PLAN
from tiny_models import tiny_config, tiny_model


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


PLAN_CONFIGS = {
    "plain": dict(),
    "dense-first-layer": dict(num_hidden_layers=3, num_dense_layers=1),
    "olmoe-style": dict(qk_norm="projection"),
    "qwen-style": dict(num_hidden_layers=3, dense_layers=[1], qk_norm="head", shared_expert_intermediate_size=16),
    "qwen-tied": dict(
        num_hidden_layers=3,
        dense_layers=[1],
        qk_norm="head",
        shared_expert_intermediate_size=16,
        tie_word_embeddings=True,
    ),
    "tied": dict(tie_word_embeddings=True),
}


def wildcard(name: str) -> str:
    """`model.layers.3.mlp.experts` -> `model.layers.*.mlp.experts`, the form plan rules take."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


@pytest.mark.parametrize("name", list(PLAN_CONFIGS))
def test_parallel_plans_name_exactly_the_modules_the_model_has(name):
    """Every rule of the model's TP and EP plans (the config's, transformers' embedding rule, the head's) names a
    module or parameter of the model built from that config; conversely every projection is split by the TP plan
    (the shared expert's one-output gate and the router stay replicated), a tied embedding with its head, and the
    experts by the EP plan (and by the TP plan only up to transformers 5.24)."""
    model = tiny_model(**PLAN_CONFIGS[name])
    names = {wildcard(n) for n, _ in [*model.named_modules(), *model.named_parameters()]}
    for plan in (model.tp_plan, model.ep_plan):
        assert set(plan) <= names, set(plan) - names
    linears = {wildcard(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    replicated = {"model.layers.*.mlp.gate", "model.layers.*.mlp.shared_expert_gate"}
    assert linears - replicated <= set(model.tp_plan)
    assert replicated.isdisjoint(model.tp_plan)
    if model.config.tie_word_embeddings:
        assert {"model.embed_tokens", "lm_head"} <= set(model.tp_plan)
    experts = {"model.layers.*.mlp.experts", "model.layers.*.mlp.experts.gate_up_proj"}
    experts.add("model.layers.*.mlp.experts.down_proj")
    assert experts <= set(model.ep_plan)
    assert (experts <= set(model.tp_plan)) == EXPERTS_IN_TP_PLAN
    assert experts.isdisjoint(model.tp_plan) == (not EXPERTS_IN_TP_PLAN)


def test_parallel_plans_of_a_qwen_style_config():
    """The whole plans, for a config with every optional module (a dense layer, a shared expert, per-head q/k norms)
    and tied embeddings. transformers adds the embedding's rule itself (5.20 for tied embeddings, in the config; 5.25
    for every model with a TP plan, when the model is built)."""
    model = tiny_model(**PLAN_CONFIGS["qwen-tied"])
    tp_plan = {
        "model.embed_tokens": "embedding_rowwise",
        "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "model.layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "model.layers.*.mlp.shared_expert.gate_proj": "colwise",
        "model.layers.*.mlp.shared_expert.up_proj": "colwise",
        "model.layers.*.mlp.shared_expert.down_proj": "rowwise",
        "lm_head": "colwise_gather_output",
    }
    if EXPERTS_IN_TP_PLAN:  # transformers 5.20-5.24
        tp_plan |= {
            "model.layers.*.mlp.experts.gate_up_proj": "packed_colwise",
            "model.layers.*.mlp.experts.down_proj": "rowwise",
            "model.layers.*.mlp.experts": "moe_tp_experts",
        }
    assert model.tp_plan == tp_plan
    assert model.ep_plan == {
        "model.layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "model.layers.*.mlp.experts.down_proj": "grouped_gemm",
        "model.layers.*.mlp.experts": "ep_dispatch_experts",
    }


@pytest.mark.parametrize(
    ("fields", "absent"),
    [
        (dict(), ("mlp.gate_proj", "mlp.shared_expert")),
        (
            dict(num_hidden_layers=2, num_dense_layers=2, shared_expert_intermediate_size=16),
            ("experts", "shared_expert"),
        ),
    ],
    ids=["no-dense-layer", "no-moe-layer"],
)
def test_tensor_parallel_plan_has_no_rule_for_an_absent_module(fields, absent):
    plan = tiny_config(**fields).base_model_tp_plan
    assert not [rule for rule in plan if any(part in rule for part in absent)]


def test_experts_leave_the_tensor_parallel_plan_from_transformers_5_25():
    """5.25 deprecates the `moe_tp_experts` style (removal in 5.28) and moves its own MoEs' experts to the EP plan."""
    release = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    assert EXPERTS_IN_TP_PLAN == (release < (5, 25))
