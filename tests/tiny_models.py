"""Tiny Default MoE configurations shared by the tests (importable because pyproject puts tests/ on sys.path)."""

import torch

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


def tiny_config(**overrides) -> DefaultMoeConfig:
    return DefaultMoeConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> DefaultMoeForCausalLM:
    torch.manual_seed(seed)
    return DefaultMoeForCausalLM(tiny_config(**overrides))


def random_ids(batch: int = 2, seq: int = 12, vocab: int = TINY["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
