"""`transformers serve` cannot serve a remote-code model: it loads the model class by name from the transformers
package (`getattr(transformers, config.architectures[0])` in `transformers/cli/serving/model_manager.py`), so a class
that exists only in the checkpoint's code (`DefaultMoeForCausalLM`) fails with AttributeError (HTTP 500), with or
without `--trust-remote-code` and `--continuous-batching` (the failure comes before generation).

This test pins that: when it fails, `transformers serve` has learned to load remote-code models, and it should become
a comparison with `generate` (with and without `--continuous-batching`) like the vLLM tests.
"""

import shutil
import sys
import urllib.error
from pathlib import Path

import pytest

from serving.common import MAX_NEW_TOKENS, PROMPTS, free_port, post, prompt_text, server


def test_transformers_serve_refuses_remote_code_models(checkpoints, tmp_path):
    port = free_port()
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    command = [executable, "serve", "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "serve.log"
    with server(command, "/health", port, log) as url:
        body = {"model": str(checkpoints["plain"]), "prompt": prompt_text(PROMPTS[0]), "max_tokens": MAX_NEW_TOKENS}
        with pytest.raises(urllib.error.HTTPError) as error:
            post(f"{url}/v1/completions", body)
    assert error.value.code == 500
    assert "module transformers has no attribute DefaultMoeForCausalLM" in log.read_text()
