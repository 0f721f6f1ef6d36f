"""OLMoE <-> Default MoE.

OLMoE normalises q and k with an RMSNorm over the *whole* projection before the per-head reshape (`q_norm` of
width heads*head_dim, `k_norm` of width kv_heads*head_dim), optionally clamps q, k and v to `clip_qkv`, and does not
renormalise the top-k probabilities (`norm_topk_prob=False` in the released models). Hub checkpoints name the
experts `mlp.experts.{e}.{gate,up,down}_proj`; transformers 5 can also save them fused.
"""

import logging

from transformers import OlmoeConfig

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
)

logger = logging.getLogger(__name__)

MODEL_TYPE = "olmoe"
BLOCK = "mlp"
PER_EXPERT = ("gate_proj", "up_proj", "down_proj")


def default_moe_fields(src: OlmoeConfig) -> dict:
    return (
        decoder_config_fields(src)
        | {
            "intermediate_size": src.intermediate_size,
            "attention_bias": bool(src.attention_bias),
            "norm_placement": "pre",
            "qk_norm": "projection",
            "clip_qkv": getattr(src, "clip_qkv", None),  # FlexOlmo (flex_olmo.py) has none
            "sliding_window": None,
            "router_jitter_noise": 0.0,
            "norm_topk_prob": bool(src.norm_topk_prob),
        }
        | router_fields(src, src.num_experts)
    )


def plan(builder: PlanBuilder, config) -> None:
    plan_decoder(builder, config, lambda b, layer: plan_moe_source_layer(b, layer, config, BLOCK, PER_EXPERT))


def check_exportable(config, target: str, norm_placement: str) -> None:
    """What OLMoE and FlexOlmo share: q/k norms over the whole projections, no sliding window, dense layers or shared
    expert, head_dim = hidden/heads."""
    require_norm_placement(config, target, norm_placement)
    require(
        config.qk_norm == "projection",
        target,
        f"{target} always has q/k norms over the whole projections (qk_norm={config.qk_norm!r} here)",
    )
    require("sliding_attention" not in config.layer_types, target, f"{target} has no sliding window")
    require(not config.dense_layers, target, f"{target} has no dense layers (dense_layers={config.dense_layers})")
    require(config.shared_expert_intermediate_size is None, target, f"{target} has no shared expert")
    require(
        config.head_dim * config.num_attention_heads == config.hidden_size,
        target,
        f"{target}'s head_dim is hidden_size/num_attention_heads (head_dim={config.head_dim} here)",
    )
    if config.router_jitter_noise:
        logger.warning("%s has no router jitter: router_jitter_noise=%s is dropped", target, config.router_jitter_noise)


def export_config(config) -> OlmoeConfig:
    check_exportable(config, "OLMoE", "pre")
    return OlmoeConfig(
        **export_decoder_fields(config, "OLMoE"),
        attention_bias=config.attention_bias,
        clip_qkv=config.clip_qkv,
        num_experts=config.num_experts,
        norm_topk_prob=config.norm_topk_prob,
    )


def export_plan(builder: PlanBuilder, config) -> None:
    cache = TensorCache(builder.reader)
    plan_decoder(builder, config, lambda b, layer: plan_moe_export_layer(b, cache, layer, config, BLOCK, PER_EXPERT))
