"""`transformers serve` (the OpenAI-compatible server that ships with transformers) serves Default MoE checkpoints
as remote code, with and without `--continuous-batching` (paged attention).

It loads a model on its first request (`"model"`: the checkpoint folder) with `--trust-remote-code`. Its
`/v1/completions` takes a text prompt and returns text (this release accepts no `logprobs`: it rejects the field), so
greedy continuations are compared as text with transformers' `generate` decoded by the same tokenizer.
"""

import shutil
import sys
from pathlib import Path

import pytest

from serving.common import CHECKPOINTS, MAX_NEW_TOKENS, PROMPTS, free_port, post, prompt_text, server, tokenizer


@pytest.fixture(scope="module", params=[False, True], ids=["generate", "continuous-batching"])
def completions(request, checkpoints, tmp_path_factory):
    """{checkpoint name: [completion text per prompt]} from one server run per mode."""
    port = free_port()
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    command = [
        executable,
        "serve",
        "--trust-remote-code",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if request.param:
        command.append("--continuous-batching")
    log = tmp_path_factory.mktemp("transformers-serve") / f"{request.node.name}.log"
    texts = {}
    with server(command, "/health", port, log) as url:
        for name in CHECKPOINTS:
            texts[name] = [
                post(
                    f"{url}/v1/completions",
                    {
                        "model": str(checkpoints[name]),
                        "prompt": prompt_text(prompt),
                        "max_tokens": MAX_NEW_TOKENS,
                        "temperature": 0.0,
                    },
                )["choices"][0]["text"]
                for prompt in PROMPTS
            ]
    return texts


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_serve_greedy_matches_generate(completions, reference, name):
    expected = [tokenizer().decode(tokens, skip_special_tokens=True) for tokens in reference(name).tokens]
    assert [text.strip() for text in completions[name]] == expected
