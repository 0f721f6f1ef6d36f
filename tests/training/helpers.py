"""Shared helpers for the training tests: tiny runs of the real commands on the built-in corpus."""

import argparse

from default_moe.training import cli as train_cli

# Data and trainer flags of a run small enough for seconds on one CPU core (add a model: --preset micro).
TINY_RUN = [
    "--seq-len", "32", "--batch-size", "2", "--max-train-tokens", "4096",
    "--max-eval-tokens", "512", "--vocab-size", "512", "--no-progress", "--logging-steps", "1",
]  # fmt: skip


def train_args(*argv) -> argparse.Namespace:
    """The namespace `default-moe train ARGV...` would run with."""
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])
