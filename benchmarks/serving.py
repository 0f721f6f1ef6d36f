"""What serving without the EMA defaults costs: validation loss of a trained checkpoint with and without them.

    python -m benchmarks --only serving --checkpoint RUN/final [--max-eval-tokens N] [--seq-len N] [--out FILE]

A Default MoE checkpoint served through an engine's transformers backend (`trust_remote_code`) keeps its defaults;
one exported with `default-moe export --to mixtral|olmoe|flex_olmo` drops them (stock transformers has no place for
them). This measures what that costs on held-out data, on the built-in corpus' validation split that `default-moe
train` and `default-moe demo` evaluate on, tokenised with the checkpoint's own tokenizer:

  defaults_on   the checkpoint in eval mode, `config.default_in_inference=True` (what it computes when served as is)
  defaults_off  the same weights with `config.default_in_inference=False` (the top-K output only)
  export_<to>   for every export target that accepts the checkpoint: `export(...)` to a temporary folder, loaded with
                transformers' own class (`AutoModelForCausalLM`, no remote code) -- it should equal `defaults_off`

The loss is the mean next-token cross-entropy (nats) over sequences of the same length, as `Trainer.evaluate`
reports it (`eval_loss`), so `defaults_on` reproduces the validation loss a training run printed when given its
sequence length (from the checkpoint's training_summary.json) and its number of validation tokens.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from default_moe.conversion.api import MOE_MODELS, export
from default_moe.conversion.io import ConversionError
from default_moe.training.data import builtin_corpus, load_tokenizer, pack
from default_moe.training.trainer import load_model

EVAL_TOKENS = 65536  # `default-moe train --max-eval-tokens` default; `default-moe demo` uses 16384


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean of the per-batch LM losses weighted by sequences, as `Trainer.evaluate` computes `eval_loss`."""
    model.eval()
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        total += float(model(input_ids=ids, labels=ids).loss) * ids.shape[0]
    return total / blocks.shape[0]


def _sequence_length(checkpoint: Path, seq_len: int | None) -> int:
    if seq_len is not None:
        return seq_len
    summary = checkpoint / "training_summary.json"
    if not summary.is_file():
        raise ValueError(f"{checkpoint} has no training_summary.json: pass --seq-len")
    return int(json.loads(summary.read_text())["sequence_length"])


def run(
    checkpoint: str | Path,
    max_eval_tokens: int = EVAL_TOKENS,
    seq_len: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    checkpoint = Path(checkpoint)
    device = torch.device(device)
    seq_len = _sequence_length(checkpoint, seq_len)
    tokenizer = load_tokenizer(checkpoint)
    blocks = pack(builtin_corpus("validation"), tokenizer, seq_len, max_eval_tokens, what="the validation data")
    model = load_model(checkpoint=str(checkpoint)).to(device)
    config = model.config
    summary_file = checkpoint / "training_summary.json"
    result: dict = {
        "checkpoint": str(checkpoint),
        "model": {
            "routing": config.routing,
            "num_experts": config.num_experts,
            "top_k": config.num_experts_per_tok,
            "layers": config.num_hidden_layers,
            "dense_layers": config.num_dense_layers,
            "hidden_size": config.hidden_size,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "training_summary": json.loads(summary_file.read_text()) if summary_file.is_file() else None,
        "validation": {"sequences": blocks.shape[0], "sequence_length": seq_len, "tokens": blocks.numel()},
        "losses": {},
        "seconds": {},
    }
    losses, seconds = result["losses"], result["seconds"]
    for name, use_defaults in (("defaults_on", True), ("defaults_off", False)):
        config.default_in_inference = use_defaults
        start = time.perf_counter()
        losses[name] = validation_loss(model, blocks, batch_size, device)
        seconds[name] = round(time.perf_counter() - start, 1)
    del model

    from transformers import AutoModelForCausalLM

    result["exports"] = {}
    with tempfile.TemporaryDirectory(prefix="default-moe-serving-") as tmp:
        for target in MOE_MODELS:
            folder = Path(tmp) / target
            try:
                export(checkpoint, folder, to=target)
            except ConversionError as error:
                result["exports"][target] = str(error)
                continue
            exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
            result["exports"][target] = type(exported).__name__
            start = time.perf_counter()
            losses[f"export_{target}"] = validation_loss(exported, blocks, batch_size, device)
            seconds[f"export_{target}"] = round(time.perf_counter() - start, 1)
            del exported
    result["cost_of_dropping_defaults"] = losses["defaults_off"] - losses["defaults_on"]
    return result
