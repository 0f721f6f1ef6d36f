"""Tiny seeded transformers models saved in the real Hub layouts, shared by the conversion tests.

Each source folder holds what a Hub repo would: config.json, (sharded) safetensors, a tokenizer and a generation
config. Sources are built once per session; tests that damage a source copy it first.
"""

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast

VOCAB = 128
HIDDEN = 32
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def write_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (ids < VOCAB), saved like any Hub tokenizer."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *CHARS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


@dataclass
class Source:
    """A source checkpoint: its folder, the transformers class that loads it, and what it was built from."""

    name: str
    folder: Path
    model_class: type
    model_type: str
    dtype: torch.dtype
    expected_export: Path | None = None  # the same weights in the original per-expert layout
    options: dict = field(default_factory=dict)

    def load_reference(self):
        return self.model_class.from_pretrained(self.folder, dtype=torch.float32).eval()


# name -> (model_type, config kwargs, layout, dtype, max_shard_size)
MOE_SOURCES = {
    "mixtral-original-sharded-fp32": (
        "mixtral",
        dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02),
        "original",
        "fp32",
        "8KB",
    ),
    "mixtral-fused-bf16-tied-sliding": (
        "mixtral",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=True,
            sliding_window=4,
            router_jitter_noise=0.1,
        ),
        "fused",
        "bf16",
        None,
    ),
    "olmoe-original-sharded-fp32-clip": (
        "olmoe",
        dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.3),
        "original",
        "fp32",
        "8KB",
    ),
    "olmoe-fused-bf16-tied-bias-renorm": (
        "olmoe",
        dict(num_experts=4, num_experts_per_tok=3, tie_word_embeddings=True, attention_bias=True, norm_topk_prob=True),
        "fused",
        "bf16",
        "20KB",
    ),
    # OLMoE with OLMo-2's norms on the sublayer outputs (norm_placement="post").
    "flex_olmo-original-sharded-fp32": (
        "flex_olmo",
        dict(num_experts=4, num_experts_per_tok=2, attention_bias=True),
        "original",
        "fp32",
        "8KB",
    ),
    "flex_olmo-fused-bf16-tied-renorm": (
        "flex_olmo",
        dict(num_experts=4, num_experts_per_tok=3, tie_word_embeddings=True, norm_topk_prob=True),
        "fused",
        "bf16",
        None,
    ),
    # Qwen3-MoE: q/k norms per head (head_dim 16, not hidden/heads = 8), a dense layer in the middle.
    "qwen3_moe-original-sharded-fp32-dense-middle": (
        "qwen3_moe",
        dict(
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            router_aux_loss_coef=0.002,
        ),
        "original",
        "fp32",
        "8KB",
    ),
    # decoder_sparse_step=2: layer 0 dense, layer 1 MoE; every layer slides.
    "qwen3_moe-fused-bf16-tied-bias-sliding-step2": (
        "qwen3_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=3,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=4,
        ),
        "fused",
        "bf16",
        None,
    ),
    # Qwen2-MoE: a shared expert with its sigmoid gate, q/k/v biases, sliding attention on layer 0 only.
    "qwen2_moe-original-sharded-fp32-sliding-layer0": (
        "qwen2_moe",
        dict(num_experts=4, num_experts_per_tok=2, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "original",
        "fp32",
        "8KB",
    ),
    "qwen2_moe-fused-bf16-tied-renorm-nobias-dense0": (
        "qwen2_moe",
        dict(
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            qkv_bias=False,
            mlp_only_layers=[0],
            tie_word_embeddings=True,
        ),
        "fused",
        "bf16",
        "20KB",
    ),
}

DENSE_SOURCES = {
    "llama-sharded-fp32": ("llama", dict(), "fp32", "8KB"),
    "llama-tied-bias-bf16": (
        "llama",
        dict(tie_word_embeddings=True, attention_bias=True, intermediate_size=48),
        "bf16",
        None,
    ),
    "mistral-sliding-fp32": ("mistral", dict(sliding_window=4), "fp32", None),
    "qwen2-tied-fp32": ("qwen2", dict(tie_word_embeddings=True), "fp32", "8KB"),
    "olmo2-sharded-bias-fp32": ("olmo2", dict(attention_bias=True), "fp32", "8KB"),
    "olmo2-tied-bf16": ("olmo2", dict(tie_word_embeddings=True, intermediate_size=48), "bf16", None),
    # Qwen2/Qwen3 slide from max_window_layers on: layer 0 full, layer 1 sliding.
    "qwen2-sliding-upper-fp32": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "fp32",
        None,
    ),
    "qwen3-sharded-fp32-sliding-upper": (
        "qwen3",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, head_dim=16),
        "fp32",
        "8KB",
    ),
    "qwen3-tied-bias-bf16": (
        "qwen3",
        dict(tie_word_embeddings=True, attention_bias=True, intermediate_size=48),
        "bf16",
        None,
    ),
    # OLMo-3: OLMo-2 with sliding and full layers, and RoPE per attention kind (here YaRN on the full layers only).
    "olmo3-sharded-bias-fp32-yarn": (
        "olmo3",
        dict(
            attention_bias=True,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
        "fp32",
        "8KB",
    ),
    "olmo3-tied-bf16": (
        "olmo3",
        dict(tie_word_embeddings=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
        "bf16",
        None,
    ),
}

CLASSES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
    "flex_olmo": (transformers.FlexOlmoConfig, transformers.FlexOlmoForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "olmo3": (transformers.Olmo3Config, transformers.Olmo3ForCausalLM),
}
DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3")
# Qwen-MoE sizes: experts of width moe_intermediate_size, dense layers (and Qwen2-MoE's shared expert) wider.
QWEN_MOE_WIDTHS = dict(moe_intermediate_size=16, intermediate_size=24, shared_expert_intermediate_size=20)


def build_model(model_type: str, seed: int, **kwargs):
    config_class, model_class = CLASSES[model_type]
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32 if model_type in DENSE_TYPES else 16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "qwen3_moe":
        fields |= {k: v for k, v in QWEN_MOE_WIDTHS.items() if k != "shared_expert_intermediate_size"}
    elif model_type == "qwen2_moe":
        fields |= QWEN_MOE_WIDTHS
    config = config_class(**(fields | kwargs))
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped or dropped norm weight shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model


def save_source(model, folder: Path, layout: str, dtype: str, max_shard_size: str | None) -> None:
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, save_original_format=layout == "original", **kwargs)
    write_tokenizer(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=7, do_sample=False).save_pretrained(
        folder
    )


def folder_digest(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under `folder` (to prove SRC is never modified)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def copy_source(source: Source, dst: Path) -> Path:
    shutil.copytree(source.folder, dst)
    return dst


def random_inputs(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)
