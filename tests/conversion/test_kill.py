"""Killing `default-moe convert` and `export` (real SIGKILL and SIGTERM to a real subprocess) while they write a 200 MB
checkpoint: DST is absent or complete and loads, SIGTERM removes the temporary folder, the next run into the same DST
removes what a SIGKILL left (and says so), and the source is never touched."""

import os
import signal

import pytest
import torch

from conversion.sources import build_model, folder_digest, random_inputs, save_source
from default_moe import DefaultMoeForCausalLM
from default_moe.conversion.io import CheckpointReader
from kill_points import Command, hidden

SHARD = "50MB"  # several shards in DST, so that a kill can land between two of them


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A Mixtral checkpoint of ~200 MB (fp32, 5 shards), large enough for writes that take a while."""
    folder = tmp_path_factory.mktemp("big") / "mixtral"
    model = build_model(
        "mixtral", 7, vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    save_source(model, folder, "original", "fp32", SHARD)
    return folder


def _files(folder):
    """name -> (size, inode, mtime): any rewrite of a file changes it."""
    return {p.name: (s.st_size, s.st_ino, s.st_mtime_ns) for p in folder.iterdir() for s in [p.stat()]}


def test_killed_convert_and_export_leave_dst_absent_or_complete_and_nothing_behind(big_source, tmp_path):
    src_digest = folder_digest(big_source)
    dst, exported, logs = tmp_path / "dst", tmp_path / "exported", tmp_path / "logs"
    convert = ["convert", big_source, dst, "--max-shard-size", SHARD, "--no-progress"]
    runs = iter(range(100))

    def temporaries(target):
        return sorted(tmp_path.glob(f".{target.name}.tmp-*"))

    def writing(target, name):  # a file of the output present in its temporary folder
        return lambda: any((tmp / name).exists() for tmp in temporaries(target))

    def terminated(run):
        assert run.wait() == 128 + signal.SIGTERM
        assert run.stderr().strip().splitlines()[-1] == "error: terminated by SIGTERM"

    # 1. SIGKILL between two shards: no DST, its temporary folder stays behind.
    run = Command(convert, logs, next(runs))
    run.freeze_when(writing(dst, "model-00002-of-00005.safetensors"))
    run.send(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert not dst.exists() and len(stale := temporaries(dst)) == 1

    # 2. The next run into DST removes it, says so in one line, and writes a complete DST.
    run = Command(convert, logs, next(runs))
    assert run.wait() == 0, run.stderr()
    assert f"removed {stale[0].name} in {tmp_path}, left by an earlier interrupted run" in run.stderr()
    assert hidden(tmp_path) == [] and CheckpointReader(dst).names()
    written = _files(dst)

    # 3. SIGTERM while --overwrite writes shards: the temporary folder is removed, DST stays as it was.
    run = Command([*convert, "--overwrite"], logs, next(runs))
    run.freeze_when(writing(dst, "model-00002-of-00005.safetensors"))
    run.send(signal.SIGTERM)
    terminated(run)
    assert hidden(tmp_path) == [] and _files(dst) == written

    # 4. SIGKILL late, with all weights and config.json written: DST stays as it was.
    run = Command([*convert, "--overwrite"], logs, next(runs))
    run.freeze_when(writing(dst, "config.json"))
    run.send(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert _files(dst) == written and len(stale := temporaries(dst)) == 1

    # 5. SIGTERM while export writes shards: nothing of it remains, and the stale folder of another DST is left alone.
    run = Command(
        ["export", dst, exported, "--to", "mixtral", "--max-shard-size", SHARD, "--no-progress"], logs, next(runs)
    )
    run.freeze_when(writing(exported, "model-00002-of-00005.safetensors"))
    run.send(signal.SIGTERM)
    terminated(run)
    assert not exported.exists() and temporaries(exported) == [] and temporaries(dst) == stale

    # 6. The next convert into DST removes the stale folder of 4; DST is complete and computes what the source does.
    run = Command([*convert, "--overwrite"], logs, next(runs))
    assert run.wait() == 0, run.stderr()
    assert f"removed {stale[0].name}" in run.stderr() and hidden(tmp_path) == []
    assert folder_digest(big_source) == src_digest  # SRC untouched by every run
    from transformers import MixtralForCausalLM

    inputs = random_inputs()
    with torch.no_grad():
        expected = MixtralForCausalLM.from_pretrained(big_source).eval()(inputs).logits
        logits = DefaultMoeForCausalLM.from_pretrained(dst).eval()(inputs).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["dst", "logs"]
