"""Qwen2-MoE <-> Default MoE.

Qwen2-MoE (`Qwen/Qwen1.5-MoE-A2.7B`, `Qwen/Qwen2-57B-A14B` style) is Qwen3-MoE's layout (qwen3_moe.py: experts,
dense layers by `mlp_only_layers` / `decoder_sparse_step`) without q/k norms, with Qwen2's attention biases (q, k
and v when `qkv_bias`, never o_proj: written as zeros, since `attention_bias=True` covers all four here), per-layer
attention kinds (`layer_types`, from `use_sliding_window` and `max_window_layers`), and a *shared expert*: a dense
SwiGLU MLP `mlp.shared_expert` of width `shared_expert_intermediate_size` that every token goes through, scaled by
`sigmoid(mlp.shared_expert_gate(x))` and added to the routed experts' output.
"""

from transformers import Qwen2MoeConfig

from . import qwen3_moe
from .layout import (
    PlanBuilder,
    TensorCache,
    layer_type_fields,
    plan_decoder,
    plan_moe_export_layer,
    plan_moe_source_layer,
    require,
    require_zero,
)

MODEL_TYPE = "qwen2_moe"
BLOCK, PER_EXPERT = qwen3_moe.BLOCK, qwen3_moe.PER_EXPERT


def default_moe_fields(src: Qwen2MoeConfig) -> dict:
    return (
        qwen3_moe.moe_fields(src)
        | layer_type_fields(src)
        | {
            "attention_bias": bool(src.qkv_bias),
            "qk_norm": False,
            "shared_expert_intermediate_size": src.shared_expert_intermediate_size,
        }
    )


def plan(builder: PlanBuilder, config) -> None:
    zero_fill = ("o_proj.bias",) if config.attention_bias else ()
    plan_decoder(
        builder,
        config,
        lambda b, layer: plan_moe_source_layer(b, layer, config, BLOCK, PER_EXPERT),
        zero_fill=zero_fill,
    )


def export_config(config) -> Qwen2MoeConfig:
    target = "Qwen2-MoE"
    fields = qwen3_moe.export_fields(config, target)
    require(not config.qk_norm, target, f"Qwen2-MoE has no q/k norm (qk_norm={config.qk_norm!r} here)")
    require(config.shared_expert_intermediate_size is not None, target, "Qwen2-MoE always has a shared expert")
    sliding = "sliding_attention" in config.layer_types
    return Qwen2MoeConfig(
        **fields,
        qkv_bias=config.attention_bias,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        layer_types=list(config.layer_types),
        use_sliding_window=sliding,
        sliding_window=config.sliding_window if sliding else None,
    )


def export_plan(builder: PlanBuilder, config) -> None:
    dropped = ()
    if config.attention_bias:  # Qwen2-MoE's o_proj has no bias: drop ours, if it is still the zeros we wrote
        dropped = ("o_proj.bias",)
        names = [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(config.num_hidden_layers)]
        require_zero(builder.reader, names, "Qwen2-MoE", "Qwen2-MoE's o_proj has no bias")
    cache = TensorCache(builder.reader)
    plan_decoder(
        builder,
        config,
        lambda b, layer: plan_moe_export_layer(b, cache, layer, config, BLOCK, PER_EXPERT),
        dropped=dropped,
    )
