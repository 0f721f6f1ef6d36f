"""Helpers shared by the card, Hub and PEFT tests: a tiny Default MoE, a tiny tokenizer, and subprocess environments."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import default_moe
from default_moe import DefaultMoeConfig, DefaultMoeForCausalLM
from default_moe.conversion.calibrate import warm_defaults
from deprecations import deprecations_in

SRC = Path(default_moe.__file__).resolve().parent.parent  # the folder the editable install puts on sys.path
INPUT_IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [6, 2, 8, 10, 1, 12, 3, 9]])


def tiny_config(**overrides) -> DefaultMoeConfig:
    fields = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        num_dense_layers=1,
        max_position_embeddings=64,
        eos_token_id=1,
        pad_token_id=0,
    )
    fields.update(overrides)
    return DefaultMoeConfig(**fields)


def tiny_model(seed: int = 0, warm_ema: bool = True, **overrides) -> DefaultMoeForCausalLM:
    """A tiny model in eval mode; with `warm_ema` one forward has moved the EMA defaults off zero."""
    torch.manual_seed(seed)
    model = DefaultMoeForCausalLM(tiny_config(**overrides))
    if warm_ema:
        warm_defaults(model, [INPUT_IDS])
    return model.eval()


def ema_state(model) -> dict[str, torch.Tensor]:
    """The EMA default buffers by layer index (PEFT-wrapped or not: whatever the forward reads)."""
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    return {str(i): layer.mlp.default_outputs.ema.detach().clone() for i, layer in enumerate(layers) if layer.is_moe}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(29)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def hub_env(endpoint: str | None, home: Path, token: str | None = None) -> dict[str, str]:
    """Environment for a subprocess that talks to the loopback Hub: online, fresh HF_HOME (no saved token, empty
    cache and remote-code module cache), no proxy for 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if token:
        env["HF_TOKEN"] = token
    return env


# Prepended to scripts run by `run_clean`: drops the editable install from sys.path and proves the package is gone.
CLEAN_PREAMBLE = f"""
import importlib.util, sys
from pathlib import Path
sys.path = [p for p in sys.path if not p or Path(p).resolve() != Path({str(SRC)!r})]
sys.path = [p for p in sys.path if p]
assert importlib.util.find_spec("default_moe") is None, "default_moe is still importable"
"""


def run_clean(script: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` in `python -I` (no PYTHONPATH, no script dir on sys.path), from `cwd`, where `default_moe` is not
    importable."""
    path = cwd / "clean_script.py"
    path.write_text(CLEAN_PREAMBLE + script)
    result = subprocess.run(
        [sys.executable, "-I", str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"clean subprocess failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert not deprecations_in(result.stderr), deprecations_in(result.stderr)  # the Hub files on this release
    return result
