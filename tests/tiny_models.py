"""Tiny Default MoE configurations shared by the tests (importable because pyproject puts tests/ on sys.path)."""

import torch
from transformers import PreTrainedModel, TrainingArguments

from default_moe import DefaultMoeConfig, DefaultMoeForCausalLM

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=2,
)


# Qwen3-MoE / Qwen2-MoE / OLMo-3 features together: per-head q/k norms, a dense layer between MoE layers, a gated
# shared expert, sliding and full layers with a RoPE each.
QWEN_STYLE = dict(
    num_hidden_layers=3,
    dense_layers=[1],
    shared_expert_intermediate_size=16,
    qk_norm="head",
    head_dim=16,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
        "full_attention": {
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e3},
    },
)


def tiny_config(**overrides) -> DefaultMoeConfig:
    return DefaultMoeConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> DefaultMoeForCausalLM:
    torch.manual_seed(seed)
    return DefaultMoeForCausalLM(tiny_config(**overrides))


def random_ids(batch: int = 2, seq: int = 12, vocab: int = TINY["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# transformers 5.23 renamed gradient checkpointing to activation checkpointing; the old names warn from 5.25, and
# 5.20-5.22 know only them.
NEW_CHECKPOINTING_NAMES = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def enable_activation_checkpointing(model, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    if NEW_CHECKPOINTING_NAMES:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_argument(enabled: bool) -> dict[str, bool]:
    """The TrainingArguments field that turns activation checkpointing on, under the running release's name."""
    new = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if new else "gradient_checkpointing": enabled}
