"""Which Trainer checkpoints are complete, and what `--resume` does with the incomplete ones a killed run leaves."""

import json
import logging
import shutil

import pytest

from default_moe.cli import main
from default_moe.training import checkpoint_problems, last_complete_checkpoint
from training.helpers import TINY_RUN

RUN = ["train", *TINY_RUN, "--preset", "micro", "--max-steps", "3", "--save-steps", "1", "--no-monitor"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main([*RUN, "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the run whose checkpoint-3 a kill interrupted before trainer_state.json; no final model yet."""
    out = shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(out / "final")
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    return out


def _damage(folder, how):
    if how == "truncate":
        for name in ("optimizer.pt", "model.safetensors", "trainer_state.json"):
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: len(data) // 2])
    elif how == "remove":
        for name in ("trainer_state.json", "scheduler.pt", "rng_state.pth"):
            (folder / name).unlink()
    elif how == "ranks":  # a 3-process run whose rank 1 had not written its RNG state yet
        (folder / "rng_state.pth").rename(folder / "rng_state_0.pth")
        shutil.copy(folder / "rng_state_0.pth", folder / "rng_state_2.pth")
    elif how == "shard":  # a sharded save, one shard not written yet
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif how == "deepspeed":  # optimizer and scheduler in DeepSpeed's global_stepN/ instead: complete
        (folder / "optimizer.pt").unlink()
        (folder / "scheduler.pt").unlink()
        (folder / "global_step3").mkdir()
    elif how == "empty":
        shutil.rmtree(folder)
        folder.mkdir()


@pytest.mark.parametrize(
    "how, problems",
    [
        (None, ""),
        ("remove", "missing trainer_state.json, scheduler.pt, rng_state.pth"),
        ("truncate", "truncated model.safetensors, optimizer.pt, trainer_state.json"),
        ("ranks", "missing rng_state_1.pth"),
        ("shard", "missing model-00002-of-00002.safetensors"),
        ("deepspeed", ""),
        ("empty", "missing trainer_state.json, model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth"),
    ],
)
def test_checkpoint_problems_name_the_missing_and_truncated_files(trained, tmp_path, how, problems):
    folder = shutil.copytree(trained / "checkpoint-2", tmp_path / "checkpoint-2")
    _damage(folder, how)
    assert checkpoint_problems(folder) == problems


def test_resume_continues_from_the_newest_complete_checkpoint_and_removes_newer_incomplete_ones(run, caplog):
    (run / "checkpoint-9").mkdir()  # a kill right after the folder was created
    (run / "checkpoint-1" / "rng_state.pth").unlink()  # older and incomplete: not in the way, left alone
    with caplog.at_level(logging.WARNING):
        assert main([*RUN, "--output-dir", str(run), "--resume"]) == 0
    assert caplog.messages == [
        f"resuming from {run / 'checkpoint-2'}; removed incomplete checkpoint-9 (missing trainer_state.json, "
        "model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth), checkpoint-3 (missing trainer_state.json)"
    ]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert checkpoint_problems(run / "checkpoint-3") == "" and (run / "final" / "model.safetensors").is_file()
    assert checkpoint_problems(run / "checkpoint-1") == "missing rng_state.pth"
    history = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]  # step 3 trained again, once


def test_resume_refuses_an_incomplete_checkpoint_in_one_line_and_changes_nothing(run, capsys):
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main([*RUN, "--output-dir", str(run), "--resume", str(run / "checkpoint-3")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --resume: {run / 'checkpoint-3'} is not a complete Trainer checkpoint (missing trainer_state.json)"
    ]
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.rmtree(run / name)
    assert main([*RUN, "--output-dir", str(run), "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --resume: no complete checkpoint-N folder in {run} (incomplete: checkpoint-3 (missing "
        "trainer_state.json))"
    ]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == [
        p for p in before if p.parts[0] not in ("checkpoint-1", "checkpoint-2")
    ]


def test_last_complete_checkpoint_for_your_own_trainer_skips_without_removing(run, caplog):
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(run) == str(run / "checkpoint-2")
    assert caplog.messages == [
        f"resuming from {run / 'checkpoint-2'}; skipped incomplete checkpoint-3 (missing trainer_state.json)"
    ]
    assert (run / "checkpoint-3").is_dir()
    assert last_complete_checkpoint(run / "nothing-here") is None
