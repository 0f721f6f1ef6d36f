"""What the serving tests share: the checkpoints' configs, the prompts, the tolerances, and a server launcher."""

import copy
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from default_moe import DefaultMoeConfig, DefaultMoeForCausalLM
from tiny_models import QWEN_STYLE, TINY

VOCAB = TINY["vocab_size"]
# Two prompts of different lengths, both longer than the Qwen-style sliding window (4): the sliding layers must mask.
PROMPTS = [[5, 17, 42, 8, 77, 23, 61, 12, 30], [88, 3, 14, 50, 9, 71]]
MAX_NEW_TOKENS = 8
# head_dim 64: vLLM's CPU attention refuses 16 ("Unsupported CPU attention configuration").
CHECKPOINTS = {
    "plain": dict(TINY, head_dim=64),
    "qwen": dict(TINY, **QWEN_STYLE) | dict(head_dim=64),
}
# float32 on both sides; the measured differences are in docs/serving.md.
LOGPROB_ATOL = 1e-4
# What the warm defaults move the greedy logprobs by (at least), so "differs" is not float noise.
DEFAULTS_EFFECT = 1e-2
KV_CACHE_BYTES = 1 << 26  # 64 MiB: 16,384 tokens of KV cache for these models
SERVER_START_TIMEOUT = 900  # seconds; vLLM's CPU startup takes minutes on a busy 2-core machine


def tokenizer():
    """A word-level tokenizer over the model's whole vocabulary: "w5" is token 5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def prompt_text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def train(fields: dict, seed: int = 0, steps: int = 30) -> DefaultMoeForCausalLM:
    """A few AdamW steps on sequences that follow a fixed random successor map, so greedy decoding is not one token
    repeated; the EMA defaults warm up as in any training run."""
    torch.manual_seed(seed)
    model = DefaultMoeForCausalLM(DefaultMoeConfig(**fields, eos_token_id=1, pad_token_id=0))
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(VOCAB - 3, generator=generator) + 3
    tokens = torch.randint(3, VOCAB, (8, 1), generator=generator)
    for _ in range(23):
        tokens = torch.cat([tokens, successor[tokens[:, -1:] - 3]], dim=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for layer in model.model.layers:
        if layer.is_moe:
            assert layer.mlp.default_outputs.ema.abs().min() > 0, "training left an EMA default at zero"
    return model


def zero_defaults(model: DefaultMoeForCausalLM) -> DefaultMoeForCausalLM:
    zeroed = copy.deepcopy(model)
    for layer in zeroed.model.layers:
        if layer.is_moe:
            layer.mlp.default_outputs.ema.zero_()
    return zeroed


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


@dataclass
class Greedy:
    """Greedy continuations of PROMPTS: the generated token ids and the log-probability of each, per prompt."""

    tokens: list[list[int]]
    logprobs: list[list[float]]

    def assert_matches(self, tokens: list[list[int]], logprobs: list[list[float]] | None, what: str) -> None:
        assert tokens == self.tokens, f"{what}: greedy tokens {tokens} differ from generate's {self.tokens}"
        if logprobs is not None:
            diff = max_difference(self.logprobs, logprobs)
            print(f"{what}: max |logprob - generate's| = {diff:.2e}")
            assert diff <= LOGPROB_ATOL, f"{what}: logprobs differ from generate's by {diff:.2e} > {LOGPROB_ATOL}"

    def differs_from(self, other: "Greedy") -> bool:
        return self.tokens != other.tokens or max_difference(self.logprobs, other.logprobs) > DEFAULTS_EFFECT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def server(command: list[str], ready_path: str, port: int, log: Path):
    """Run `command` (a server on 127.0.0.1:`port`) until GET `ready_path` answers 200, yield its base URL, and kill
    its whole process group at the end. Fails with the log's tail if it exits or is not ready in time."""
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", HF_HUB_OFFLINE="1")
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, (
                f"server not ready in {SERVER_START_TIMEOUT} s:\n{log.read_text()[-4000:]}"
            )
            try:
                with urllib.request.urlopen(base + ready_path, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
