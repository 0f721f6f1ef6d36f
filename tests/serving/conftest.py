"""Checkpoints and transformers references for the serving tests (`make test-serving`).

These tests need a serving engine, which lives in its own environment (`.venv/serving`: vLLM CPU pins a transformers
below our floor), so the normal `pytest` run does not collect them: the test files here are collected only where vLLM
is importable. In the serving environment nothing is left out, and nothing here skips.

Both checkpoints are trained a few steps (their EMA defaults are warm), saved with the remote code next to the weights,
and have head_dim 64. `reference()` is transformers' own greedy `generate` on the saved folder, in the serving
environment, i.e. on the transformers release vLLM pins.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from serving.common import CHECKPOINTS, MAX_NEW_TOKENS, PROMPTS, Greedy, tokenizer, train, zero_defaults

collect_ignore_glob = ["test_*.py"] if importlib.util.find_spec("vllm") is None else []
# No usage report from vLLM (it would try the network), for its engines here and the servers these tests start.
os.environ["VLLM_NO_USAGE_STATS"] = "1"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """ "plain", "qwen" (trained, warm defaults) and "plain-zero-ema" (plain with its EMA defaults zeroed)."""
    root = tmp_path_factory.mktemp("checkpoints")
    models = {name: train(fields) for name, fields in CHECKPOINTS.items()}
    models["plain-zero-ema"] = zero_defaults(models["plain"])
    folders = {}
    for name, model in models.items():
        folder = root / name
        model.save_pretrained(folder)
        tokenizer().save_pretrained(folder)
        assert (folder / "modeling_default_moe.py").is_file(), "the remote code was not saved"
        folders[name] = folder
    return folders


@pytest.fixture(scope="session")
def reference(checkpoints):
    """`reference(name, default_in_inference=True)`: transformers' `generate` on the saved folder, one prompt at a
    time (no padding), loaded as a remote-code checkpoint is."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def run(name: str, default_in_inference: bool = True) -> Greedy:
        key = (name, default_in_inference)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(
                checkpoints[name],
                trust_remote_code=True,
                dtype=torch.float32,
                default_in_inference=default_in_inference,
            ).eval()
            tokens, logprobs = [], []
            for prompt in PROMPTS:
                out = model.generate(
                    torch.tensor([prompt]),
                    do_sample=False,
                    max_new_tokens=MAX_NEW_TOKENS,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                new = out.sequences[0, len(prompt) :].tolist()
                steps = torch.stack(out.logits)[:, 0].float().log_softmax(-1)
                tokens.append(new)
                logprobs.append([steps[i, token].item() for i, token in enumerate(new)])
            cache[key] = Greedy(tokens, logprobs)
        return cache[key]

    return run
