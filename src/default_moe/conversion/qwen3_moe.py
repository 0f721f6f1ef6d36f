"""Qwen3-MoE <-> Default MoE, and what Qwen2-MoE (qwen2_moe.py) shares with it.

Qwen3-MoE (`Qwen/Qwen3-30B-A3B` style: 128 experts, top-8, renormalised) normalises q and k *per head*: one RMSNorm
of width head_dim applied after the head reshape (`qk_norm="head"`), and its head_dim is often not hidden/heads.
Every layer is MoE except those in `mlp_only_layers` and those with (i + 1) % `decoder_sparse_step` != 0, which
have a dense MLP of width `intermediate_size` (our `dense_layers` and `dense_intermediate_size`; the experts' width
is `moe_intermediate_size`). With `use_sliding_window` transformers' model slides on *every* layer (it ignores
`max_window_layers`). Hub checkpoints name the experts `mlp.experts.{e}.{gate,up,down}_proj`; transformers 5 can
also save them fused.
"""

import logging

from transformers import Qwen3MoeConfig

from .io import ConversionError
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

logger = logging.getLogger(__name__)

MODEL_TYPE = "qwen3_moe"
BLOCK = "mlp"
PER_EXPERT = ("gate_proj", "up_proj", "down_proj")


def dense_layers(src) -> list[int]:
    """Qwen-MoE's rule: layer i has a dense MLP if listed in `mlp_only_layers` or if (i + 1) % decoder_sparse_step."""
    step = src.decoder_sparse_step
    if not isinstance(step, int) or step < 1:
        raise ConversionError(f"decoder_sparse_step={step!r} in config.json: expected a positive integer")
    if src.num_experts < 1:
        raise ConversionError(f"num_experts={src.num_experts} in config.json: a model without experts is dense")
    only = set(src.mlp_only_layers or ())
    return [i for i in range(src.num_hidden_layers) if i in only or (i + 1) % step]


def moe_fields(src) -> dict:
    """The fields Qwen3-MoE and Qwen2-MoE map alike."""
    return (
        decoder_config_fields(src)
        | {
            "intermediate_size": src.moe_intermediate_size,
            "dense_intermediate_size": src.intermediate_size,
            "dense_layers": dense_layers(src),
            "norm_placement": "pre",
            "clip_qkv": None,
            "router_jitter_noise": 0.0,
            "norm_topk_prob": bool(src.norm_topk_prob),
        }
        | router_fields(src, src.num_experts)
    )


def default_moe_fields(src: Qwen3MoeConfig) -> dict:
    kind = "full_attention" if src.sliding_window is None else "sliding_attention"  # None unless use_sliding_window
    return moe_fields(src) | {
        "attention_bias": bool(src.attention_bias),
        "qk_norm": "head",
        "layer_types": [kind] * src.num_hidden_layers,
        "sliding_window": src.sliding_window,
    }


def plan(builder: PlanBuilder, config) -> None:
    plan_decoder(builder, config, lambda b, layer: plan_moe_source_layer(b, layer, config, BLOCK, PER_EXPERT))


def export_fields(config, target: str) -> dict:
    """The fields Qwen3-MoE and Qwen2-MoE export alike; checks what neither can express."""
    require_norm_placement(config, target, "pre")
    require(config.clip_qkv is None, target, f"{target} has no clip_qkv")
    if config.router_jitter_noise:
        logger.warning("%s has no router jitter: router_jitter_noise=%s is dropped", target, config.router_jitter_noise)
    return export_decoder_fields(config, target) | {
        "intermediate_size": config.dense_intermediate_size,
        "moe_intermediate_size": config.intermediate_size,
        "num_experts": config.num_experts,
        "norm_topk_prob": config.norm_topk_prob,
        "mlp_only_layers": list(config.dense_layers),
        "decoder_sparse_step": 1,
    }


def export_config(config) -> Qwen3MoeConfig:
    target = "Qwen3-MoE"
    fields = export_fields(config, target)
    require(
        config.qk_norm == "head",
        target,
        f"Qwen3-MoE always normalises q and k per head (qk_norm={config.qk_norm!r} here)",
    )
    require(config.shared_expert_intermediate_size is None, target, "Qwen3-MoE has no shared expert")
    sliding_window = uniform_sliding_window(config, target)
    return Qwen3MoeConfig(
        **fields,
        head_dim=config.head_dim,
        attention_bias=config.attention_bias,
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
    )


def export_plan(builder: PlanBuilder, config) -> None:
    cache = TensorCache(builder.reader)
    plan_decoder(builder, config, lambda b, layer: plan_moe_export_layer(b, cache, layer, config, BLOCK, PER_EXPERT))
