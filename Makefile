# The README's two commands: `make demo` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 installs a CPU build here.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev]"

demo: install
	default-moe demo

test: install
	$(PYTHON) -m pytest

lint:
	ruff check . && ruff format --check .

bench: install
	$(PYTHON) -m benchmarks
