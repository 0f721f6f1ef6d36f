"""The suite's own rules (tests/conftest.py and pyproject's `filterwarnings`), run on a small test file in a fresh
pytest process with this project's configuration: a deprecation fails the test that triggers it, whether
transformers warns or logs it; under CI a skip for something missing fails, the allowed skips stay skips."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from deprecations import deprecations_in

TESTS = Path(__file__).parent

CASES = """
import warnings

import pytest
import torch
from transformers import PretrainedConfig
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg


@deprecate_kwarg("old_name", version="99.0", new_name="new_name")
def renamed(new_name=None):
    return new_name


def test_deprecated_argument():
    assert renamed(old_name=1) == 1  # transformers' decorator warns (FutureWarning)


def test_deprecation_warning():
    warnings.warn("`x` is deprecated", DeprecationWarning)


def test_logged_deprecation():
    assert PretrainedConfig(dtype="float32").torch_dtype == torch.float32  # logs "`torch_dtype` is deprecated!"


def test_accepted_deprecation():  # deprecations.ACCEPTED: DDP's broadcast_buffers
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2), broadcast_buffers=False)
    finally:
        torch.distributed.destroy_process_group()


def test_logged_warning_that_is_no_deprecation():
    logging.get_logger("transformers.modeling_utils").warning("the checkpoint has no generation config")


def test_allowed_skip():
    pytest.skip("a CUDA device is present")


def test_skip_for_a_missing_tool():
    pytest.skip("the tool is not on PATH")
"""

MISSING_PACKAGE = 'import pytest\n\npytest.importorskip("a_package_nobody_installed")\n\n\ndef test_it():\n    pass\n'

# Outcome of each case without CI and with CI set.
EXPECTED = {
    "test_deprecated_argument": ("failure", "failure"),
    "test_deprecation_warning": ("failure", "failure"),
    "test_logged_deprecation": ("failure", "failure"),
    "test_accepted_deprecation": ("passed", "passed"),
    "test_logged_warning_that_is_no_deprecation": ("passed", "passed"),
    "test_allowed_skip": ("skipped", "skipped"),
    "test_skip_for_a_missing_tool": ("skipped", "failure"),
    "test_missing_package": ("skipped", "error"),
}


@pytest.fixture(scope="module", params=[False, True], ids=["local", "CI"])
def outcomes(request, tmp_path_factory):
    """Runs the cases with this project's pytest configuration and conftest; {test name: outcome}."""
    folder = tmp_path_factory.mktemp("ci" if request.param else "local")
    (folder / "test_cases.py").write_text(CASES)
    (folder / "test_missing_package.py").write_text(MISSING_PACKAGE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    if request.param:
        env["CI"] = "1"
    command = [sys.executable, "-m", "pytest", "-c", str(TESTS.parent / "pyproject.toml"), "-p", "conftest"]
    command += ["-p", "no:cacheprovider", "--continue-on-collection-errors", "--junitxml", str(folder / "out.xml")]
    subprocess.run([*command, str(folder)], cwd=folder, env=env, capture_output=True, timeout=300)
    found = {}
    for case in ET.parse(folder / "out.xml").iter("testcase"):
        children = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        name = case.get("name") or case.get("classname").rpartition(".")[2]
        found[name] = children[0] if children else "passed"
    return request.param, found


@pytest.mark.parametrize("name", EXPECTED)
def test_outcome(outcomes, name):
    ci, found = outcomes
    assert found[name] == EXPECTED[name][ci], found


# A line of a subprocess's stderr, and whether it is reported as a deprecation.
STDERR = {
    "/venv/torch/nn/parallel/distributed.py:971: FutureWarning: `broadcast_buffers` is deprecated. Use "
    "`forward_sync_buffers` instead. IMPORTANT: ...": False,  # accepted
    "/work/src/default_moe/x.py:3: FutureWarning: `old` is deprecated": True,
    "/venv/peft/tuners/lora.py:9: DeprecationWarning: use `new`": True,
    "[transformers] The `moe_tp_experts` parallel style has been deprecated (removal in v5.28.0).": True,
    "[transformers] Setting `pad_token_id` to `eos_token_id`.": False,
    "loss 1.25 deprecated_flag=0": False,
}


@pytest.mark.parametrize("line", STDERR)
def test_deprecations_in_a_subprocess_stderr(line):
    stderr = f"starting\n{line}\n  model = DistributedDataParallel(model)\n"
    assert deprecations_in(stderr) == ([line] if STDERR[line] else [])
