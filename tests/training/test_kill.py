"""Killing `default-moe train` (real SIGKILL and SIGTERM to a real subprocess) at chosen moments loses nothing and
leaves nothing behind: a chain of runs, each killed at another moment and continued with `--resume`, ends with the
model of one uninterrupted run."""

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from default_moe.training import cli as train_cli
from kill_points import Command, hidden
from training.helpers import train_args

STEPS = 24
RUN = ["--preset", "micro", "--seq-len", 32, "--batch-size", 2, "--vocab-size", 512, "--max-steps", STEPS]
RUN += ["--save-steps", 1, "--logging-steps", 1, "--lr", "3e-3", "--no-progress", "--no-monitor"]
RUN += ["--set", "default_ema_beta=0.5"]  # a fast-moving EMA makes a wrong restore visible
STAGING = ".final.tmp-staging"  # where the final model is written before its rename


def test_killed_runs_resume_from_the_newest_complete_checkpoint_and_end_like_an_uninterrupted_run(tmp_path):
    # A small text file and, after the reference run, its tokenizer: each killed run starts in a few seconds.
    data = tmp_path / "data.txt"
    data.write_text("".join(Path(module.__file__).read_text() for module in (json, re, signal)))
    reference = train_cli.train(train_args(*RUN, "--data", data, "--output-dir", tmp_path / "reference"))
    files = {p.name for p in (tmp_path / "reference" / "checkpoint-1").iterdir()}
    out, logs = tmp_path / "run", tmp_path / "logs"
    runs = iter(range(100))

    def start():
        argv = ["train", *RUN, "--data", data, "--tokenizer", tmp_path / "reference" / "final", "--output-dir", out]
        return Command([*argv, *(["--resume"] if out.exists() else [])], logs, next(runs))

    def complete(step):  # the test's own judgement: every file of an uninterrupted run's checkpoint, state readable
        folder = out / f"checkpoint-{step}"
        try:
            names = {p.name for p in folder.iterdir()}
            return names == files and isinstance(json.loads((folder / "trainer_state.json").read_text()), dict)
        except (OSError, ValueError):
            return False

    def on_disk():
        return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))

    def freeze_mid_checkpoint(run, first):
        """Freeze `run` while it writes a checkpoint (its folder there, trainer_state.json not yet)."""
        for step in range(first, STEPS + 1):
            folder = out / f"checkpoint-{step}"
            run.freeze_when(folder.is_dir)
            if not (folder / "trainer_state.json").exists():
                return step
            run.go_on()  # too late for this one: try the next checkpoint
        raise AssertionError("never caught a checkpoint half-written")

    def preempted_at(run):
        """The checkpoint that the one-line SIGTERM message names (exit status 143)."""
        assert run.wait() == 143
        last = run.stderr().strip().splitlines()[-1]
        match = re.fullmatch(
            rf"error: stopped by SIGTERM after step (\d+): checkpoint saved to {re.escape(str(out))}/checkpoint-(\d+) "
            r"\(continue with --resume\)",
            last,
        )
        assert match and match[1] == match[2], last
        assert "Traceback" not in run.stderr()
        return int(match[1])

    # 1. SIGKILL while checkpoint-N is half-written: N is incomplete, N-1 complete.
    run = start()
    killed = freeze_mid_checkpoint(run, 2)
    run.send(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert not complete(killed) and complete(killed - 1) and on_disk()[-1] == killed

    # 2. --resume continues from N-1, removes N and says so in one line; SIGTERM in a step saves at the step's end.
    run = start()
    run.freeze_when((out / f"checkpoint-{killed + 3}" / "trainer_state.json").exists)
    run.send(signal.SIGTERM)
    saved = preempted_at(run)
    assert (
        f"resuming from {out / f'checkpoint-{killed - 1}'}; removed incomplete checkpoint-{killed} "
        "(missing trainer_state.json"
    ) in run.stderr()
    assert saved >= killed + 3 and on_disk() == list(range(1, saved + 1))
    assert all(complete(step) for step in on_disk()) and hidden(out) == []

    # 3. SIGTERM while a checkpoint is being written: that checkpoint completes and is the last.
    run = start()
    signalled = freeze_mid_checkpoint(run, saved + 3)
    run.send(signal.SIGTERM)
    assert preempted_at(run) == signalled and on_disk() == list(range(1, signalled + 1))
    assert "incomplete" not in run.stderr() and all(complete(step) for step in on_disk())

    # 4. SIGKILL between two checkpoints.
    run = start()
    run.freeze_when(lambda: complete(signalled + 3))
    run.send(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL

    # 5. SIGKILL while the final model is written: no final/, its temporary folder stays behind.
    run = start()
    run.freeze_when((out / STAGING).is_dir)
    run.send(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert not (out / "final").exists() and hidden(out) == [STAGING] and complete(STEPS)

    # 6. SIGTERM while the final model is written, after the stale folder of 5 was removed (and said so).
    run = start()
    run.freeze_when(lambda: f"removed {STAGING} in {out}" in run.stderr() and (out / STAGING).is_dir())
    run.send(signal.SIGTERM)
    assert run.wait() == 143
    assert run.stderr().strip().splitlines()[-1] == "error: terminated by SIGTERM"
    assert not (out / "final").exists() and hidden(out) == []

    # 7. The last resume finishes: nothing left over, and the same model as the uninterrupted run.
    run = start()
    assert run.wait() == 0, run.stderr()[-3000:]
    assert "interrupted run" not in run.stderr() and "incomplete" not in run.stderr() and hidden(out) == []
    assert on_disk() == list(range(1, STEPS + 1)) and all(complete(step) for step in on_disk())
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))  # every step once: none lost, none repeated
    expected = [(e["step"], e["loss"]) for e in reference.log_history if "loss" in e]
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    weights, reference_weights = (
        load_file(out / "final" / "model.safetensors"),
        load_file(tmp_path / "reference" / "final" / "model.safetensors"),
    )
    assert weights.keys() == reference_weights.keys() and any(k.endswith("default_outputs.ema") for k in weights)
    for key, value in reference_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)
