"""FlexOlmo <-> Default MoE.

FlexOlmo (`allenai/FlexOlmo-7x7B-1T` style) is OLMoE with OLMo-2's norms: RMSNorm on the attention and MLP
*outputs* inside the residual branch (`norm_placement="post"`, norms `post_attention_layernorm` and
`post_feedforward_layernorm`), q/k norms over the whole projections, no `clip_qkv`. Its checkpoints name the
experts as OLMoE's do, so the tensor plans are OLMoE's.
"""

from transformers import FlexOlmoConfig

from . import olmoe
from .layout import PlanBuilder, export_decoder_fields, require

MODEL_TYPE = "flex_olmo"


def default_moe_fields(src: FlexOlmoConfig) -> dict:
    return olmoe.default_moe_fields(src) | {"norm_placement": "post"}


def plan(builder: PlanBuilder, config) -> None:
    olmoe.plan(builder, config)


def export_config(config) -> FlexOlmoConfig:
    target = "FlexOlmo"
    olmoe.check_exportable(config, target, "post")
    require(config.clip_qkv is None, target, "FlexOlmo has no clip_qkv")
    return FlexOlmoConfig(
        **export_decoder_fields(config, target),
        attention_bias=config.attention_bias,
        num_experts=config.num_experts,
        norm_topk_prob=config.norm_topk_prob,
    )


def export_plan(builder: PlanBuilder, config) -> None:
    olmoe.export_plan(builder, config)
