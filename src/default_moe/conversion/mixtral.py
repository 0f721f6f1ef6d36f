"""Mixtral <-> Default MoE.

Mixtral's router always renormalises the top-k probabilities (`norm_topk_prob=True`), it has a sliding window
option and multiplicative router jitter in training; no attention bias, no q/k norm. Hub checkpoints name the
experts `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2` (down); transformers 5 can also save them fused as
`mlp.experts.gate_up_proj` / `down_proj`, which is our layout already.
"""

from transformers import MixtralConfig

from .layout import (
    PlanBuilder,
    TensorCache,
    decoder_config_fields,
    export_decoder_fields,
    plan_decoder,
    plan_moe_export_layer,
    plan_moe_source_layer,
    require,
    require_norm_placement,
    router_fields,
    uniform_sliding_window,
)

MODEL_TYPE = "mixtral"
BLOCK = "block_sparse_moe"
PER_EXPERT = ("w1", "w3", "w2")  # gate, up, down


def default_moe_fields(src: MixtralConfig) -> dict:
    return (
        decoder_config_fields(src)
        | {
            "intermediate_size": src.intermediate_size,
            "attention_bias": False,
            "qk_norm": False,
            "clip_qkv": None,
            "sliding_window": src.sliding_window,
            "router_jitter_noise": src.router_jitter_noise,
            "norm_topk_prob": True,
        }
        | router_fields(src, src.num_local_experts)
    )


def plan(builder: PlanBuilder, config) -> None:
    plan_decoder(builder, config, lambda b, layer: plan_moe_source_layer(b, layer, config, BLOCK, PER_EXPERT))


def export_config(config) -> MixtralConfig:
    target = "Mixtral"
    require_norm_placement(config, target, "pre")
    require(config.norm_topk_prob, target, "Mixtral always renormalises the top-k weights (norm_topk_prob=False here)")
    require(not config.qk_norm, target, f"Mixtral has no q/k norm (qk_norm={config.qk_norm!r} here)")
    require(config.clip_qkv is None, target, "Mixtral has no clip_qkv")
    require(not config.attention_bias, target, "Mixtral has no attention bias")
    require(
        not config.dense_layers,
        target,
        f"Mixtral has no dense layers (dense_layers={config.dense_layers})",
    )
    require(config.shared_expert_intermediate_size is None, target, "Mixtral has no shared expert")
    fields = export_decoder_fields(config, target)
    fields["num_local_experts"] = config.num_experts
    return MixtralConfig(
        **fields,
        head_dim=config.head_dim,
        sliding_window=uniform_sliding_window(config, target),
        router_jitter_noise=config.router_jitter_noise,
    )


def export_plan(builder: PlanBuilder, config) -> None:
    cache = TensorCache(builder.reader)
    plan_decoder(builder, config, lambda b, layer: plan_moe_export_layer(b, cache, layer, config, BLOCK, PER_EXPERT))
