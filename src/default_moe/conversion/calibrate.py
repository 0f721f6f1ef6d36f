"""Warm the EMA defaults of a freshly converted checkpoint on a little text, instead of leaving them at zero.

A MoE block (routing="default") commits its EMA update for a training-mode forward that trains; a forward of a
frozen model (nothing requires grad) with gradients enabled counts, and builds no graph. Calibration loads the
converted folder, puts only the MoE blocks in training mode (attention dropout stays off) with the router jitter
disabled, runs such forwards over the first N tokens of a text file, and writes the resulting `default_outputs.ema`
buffers back into the shards in place. Unlike conversion this holds the whole model in memory.
"""

from collections.abc import Iterable
from pathlib import Path

import torch

from .io import ConversionError, patch_tensor


def read_tokens(tokenizer, path: Path, num_tokens: int) -> list[int]:
    """The first `num_tokens` token ids of a UTF-8 text file, read in 1 MB pieces."""
    ids: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        while len(ids) < num_tokens:
            text = handle.read(1 << 20)
            if not text:
                break
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[:num_tokens]


def warm_defaults(model, batches: Iterable[torch.Tensor]) -> None:
    """Update the EMA defaults of `model` from forwards over `batches` of input ids, changing nothing else.

    Only the MoE blocks are in training mode (no dropout elsewhere) and no parameter requires grad meanwhile, so each
    forward commits its update at once; training modes and `requires_grad` flags are restored afterwards.
    """
    modes = {module: module.training for module in model.modules()}
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    model.eval().requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "default_outputs"):
            module.train()
    try:
        with torch.enable_grad():
            for input_ids in batches:
                model(input_ids=input_ids, use_cache=False)
    finally:
        for module, training in modes.items():
            module.train(training)
        for parameter, requires_grad in flags.items():
            parameter.requires_grad_(requires_grad)


def calibrate(folder: Path, text_file: Path, num_tokens: int, seq_len: int) -> int:
    """Update the defaults of the checkpoint in `folder` in place; returns the number of tokens used."""
    from transformers import AutoTokenizer

    from default_moe import DefaultMoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = read_tokens(tokenizer, text_file, num_tokens)
    if not ids:
        raise ConversionError(f"calibration data {text_file} holds no tokens")
    model = DefaultMoeForCausalLM.from_pretrained(folder)
    model.config.router_jitter_noise = 0.0  # calibration should see the model as it is
    seq_len = min(seq_len, model.config.max_position_embeddings)
    warm_defaults(model, (torch.tensor([ids[start : start + seq_len]]) for start in range(0, len(ids), seq_len)))
    blocks = {name: module for name, module in model.named_modules() if hasattr(module, "default_outputs")}
    for name, block in blocks.items():
        patch_tensor(folder, f"{name}.default_outputs.ema", block.default_outputs.ema.detach().float().contiguous())
    return len(ids)
