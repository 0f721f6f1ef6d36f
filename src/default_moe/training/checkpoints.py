"""Trainer checkpoints that survive a kill: which `checkpoint-N` folders are complete, the newest complete one to
resume from, and a checkpoint at the next step boundary on SIGTERM.

transformers' Trainer writes `checkpoint-N` in place, file after file (weights, `optimizer.pt`, `scheduler.pt`, the RNG
state, and `trainer_state.json` last), and `transformers.trainer_utils.get_last_checkpoint` returns the highest N
whether or not that folder is whole: a run killed while saving leaves a folder that `Trainer.train` cannot resume from.
`checkpoint_problems` names what such a folder lacks: a checkpoint is complete when every file a resume reads is there
and whole (`trainer_state.json` parses, each safetensors file holds the bytes its header announces, each torch pickle
ends with its zip directory). With your own Trainer, `last_complete_checkpoint` replaces `get_last_checkpoint`:

    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))

`PreemptionCallback` turns SIGTERM (what cluster schedulers send some time before SIGKILL) into a checkpoint at the next
optimizer step and a clean stop; `default-moe train` adds it whenever checkpoints are on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import torch
from transformers import TrainerCallback

from default_moe.conversion.io import INDEX_NAME, SINGLE_NAME, ConversionError, SafetensorsFile

from .callback import sum_over_ranks

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# Where Trainer keeps the weights and the optimizer state besides model.safetensors and optimizer.pt: adapters (PEFT),
# .bin weights, FSDP (full and sharded), DeepSpeed (global_stepN/), per-rank optimizer files.
WEIGHT_PATTERNS = (SINGLE_NAME, "adapter_model.*", "pytorch_model*.bin", "pytorch_model_fsdp*", "global_step*")
OPTIMIZER_PATTERNS = ("optimizer.pt", "optimizer.bin", "optimizer_*", "rank*-optimizer.pt")


def checkpoint_problems(folder: str | os.PathLike) -> str:
    """What keeps the Trainer checkpoint `folder` from being resumed, e.g. "missing trainer_state.json, scheduler.pt;
    truncated optimizer.pt"; "" when it is complete."""
    folder = Path(folder)
    try:
        names = {path.name for path in folder.iterdir()}
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    missing, truncated = [], []
    if TRAINER_STATE not in names:
        missing.append(TRAINER_STATE)
    if INDEX_NAME in names:
        try:
            shards = set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            truncated.append(INDEX_NAME)
        else:
            missing += sorted(shards - names)
    elif not any(fnmatch(name, pattern) for name in names for pattern in WEIGHT_PATTERNS):
        missing.append(SINGLE_NAME)
    if not any(fnmatch(name, "global_step*") for name in names):  # DeepSpeed keeps optimizer and scheduler there
        if not any(fnmatch(name, pattern) for name in names for pattern in OPTIMIZER_PATTERNS):
            missing.append("optimizer.pt")
        if "scheduler.pt" not in names:
            missing.append("scheduler.pt")
    # One RNG file per process (rng_state_K.pth) in multi-process runs, rng_state.pth otherwise.
    ranks = {int(match[1]) for name in names if (match := re.fullmatch(r"rng_state_(\d+)\.pth", name))}
    if "rng_state.pth" not in names:
        expected = [f"rng_state_{rank}.pth" for rank in range(max(ranks) + 1)] if ranks else ["rng_state.pth"]
        missing += [name for name in expected if name not in names]
    for name in sorted(names):
        if not _whole(folder / name):
            truncated.append(name)
    parts = [f"missing {', '.join(missing)}"] if missing else []
    parts += [f"truncated {', '.join(truncated)}"] if truncated else []
    return "; ".join(parts)


def _whole(path: Path) -> bool:
    """False for a file that a killed write cut short: JSON that does not parse, a safetensors file shorter than its
    header says, a torch pickle (zip) without its closing directory."""
    try:
        if path.name == TRAINER_STATE:
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            SafetensorsFile(path)
        elif path.suffix in (".pt", ".pth", ".bin") and path.is_file():
            return zipfile.is_zipfile(path)
    except (OSError, ValueError, ConversionError):
        return False
    return True


def scan_checkpoints(output_dir: str | os.PathLike) -> tuple[Path | None, dict[Path, str]]:
    """The newest complete `checkpoint-N` in `output_dir` (None if none is), and the newer, incomplete ones passed
    over, each with its `checkpoint_problems`."""
    output_dir = Path(output_dir)
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = CHECKPOINT_NAME.fullmatch(path.name)
            if match and path.is_dir():
                found.append((int(match[1]), path))
    incomplete = {}
    for _, path in sorted(found, reverse=True):
        problems = checkpoint_problems(path)
        if not problems:
            return path, incomplete
        incomplete[path] = problems
    return None, incomplete


def describe_incomplete(incomplete: dict[Path, str]) -> str:
    """One line for them all: `checkpoint-7 (missing trainer_state.json), checkpoint-6 (truncated optimizer.pt)`."""
    return ", ".join(f"{path.name} ({problems})" for path, problems in incomplete.items())


def last_complete_checkpoint(output_dir: str | os.PathLike, remove_incomplete: bool = False) -> str | None:
    """`get_last_checkpoint` for runs that may have been killed: the newest complete `checkpoint-N` in `output_dir`,
    or None. Logs one line naming the newer, incomplete checkpoints it passed over; `remove_incomplete` deletes them
    (a run resumed from the returned checkpoint writes those steps again)."""
    chosen, incomplete = scan_checkpoints(output_dir)
    if incomplete:
        if remove_incomplete and chosen is not None:
            for path in incomplete:
                shutil.rmtree(path, ignore_errors=True)
        verb = "removed" if remove_incomplete and chosen is not None else "skipped"
        target = f"resuming from {chosen}" if chosen is not None else f"no complete checkpoint in {output_dir}"
        logger.warning("%s; %s incomplete %s", target, verb, describe_incomplete(incomplete))
    return None if chosen is None else str(chosen)


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after saving a checkpoint; `default-moe` exits with status 143 (128 + SIGTERM)."""

    exit_code = 128 + signal.SIGTERM


class PreemptionCallback(TrainerCallback):
    """On SIGTERM, save a checkpoint at the next optimizer-step boundary and stop training.

    While `trainer.train()` runs, SIGTERM only sets a flag (the previous handler is back when training ends). At the
    next step end the Trainer saves `checkpoint-N` (skipping an evaluation due then, to save time) and stops; when
    the signal comes during a save, that checkpoint is the last one. The checkpoint holds the state after N steps, so
    a run resumed from it repeats no step. (transformers' own `enable_jit_checkpoint` saves inside a step, after the
    forward has moved the EMA defaults, so a run resumed from that checkpoint is not the same.) Afterwards
    `preempted()` says whether the signal came and `checkpoint` is the last checkpoint saved. In multi-process runs
    the ranks agree on the flag (one small all-reduce per step), so all stop at the same step even if only one got
    the signal.

        callback = PreemptionCallback()
        trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
        if callback.preempted():
            sys.exit(f"stopped by SIGTERM; resume from {callback.checkpoint}")
    """

    def __init__(self):
        self.checkpoint: Path | None = None
        self._received = False  # written by the signal handler only
        self._agreed = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.checkpoint, self._received, self._agreed = None, False, False
        if threading.current_thread() is threading.main_thread():  # the only thread that may set signal handlers
            self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame):
        self._received = True

    def preempted(self) -> bool:
        """Whether SIGTERM came during training, to any rank (all ranks must call this together)."""
        if not self._agreed:  # once true it stays so; the handler may set `_received` at any moment
            self._agreed = bool(sum_over_ranks(torch.tensor([float(self._received)])).item())
        return self._agreed

    def on_step_end(self, args, state, control, **kwargs):
        if self.preempted():
            control.should_save = True
            control.should_evaluate = False
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        self.checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.preempted():  # the signal came during this save (or the step before): this checkpoint is the one
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put the SIGTERM handler from before `train()` back (done at the end of training; call it when `train()`
        raised)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


__all__ = [
    "PreemptionCallback",
    "Preempted",
    "checkpoint_problems",
    "describe_incomplete",
    "last_complete_checkpoint",
    "scan_checkpoints",
]
