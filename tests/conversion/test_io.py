"""The streaming safetensors reader/writer against the safetensors library itself, and the CLI's happy path."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from default_moe.cli import main
from default_moe.conversion.io import (
    CheckpointReader,
    ConversionError,
    SafetensorsFile,
    TensorPlan,
    parse_size,
    plan_shards,
    write_checkpoint,
)

TENSORS = {
    "a.weight": torch.randn(7, 5),
    "b.bf16": torch.randn(3, 4).to(torch.bfloat16),
    "c.half": torch.randn(9).half(),
    "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "e.bool": torch.tensor([True, False, True]),
    "f.scalar": torch.tensor(3.5),
    "g.empty": torch.zeros(0, 4),
    "h.big": torch.randn(64, 64),
}


def plans_for(tensors):
    return [TensorPlan(n, t.dtype, tuple(t.shape), lambda t=t: t.clone()) for n, t in tensors.items()]


@pytest.mark.parametrize("shard_bytes", [1, 300, 10**9])
def test_writer_output_is_read_by_safetensors(tmp_path, shard_bytes):
    files = write_checkpoint(tmp_path, plans_for(TENSORS), shard_bytes)
    seen = {}
    for name in files:
        with safe_open(tmp_path / name, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for key in handle.keys():
                seen[key] = handle.get_tensor(key)
        header_len = int.from_bytes((tmp_path / name).read_bytes()[:8], "little")
        assert header_len % 8 == 0
    assert set(seen) == set(TENSORS)
    for key, tensor in TENSORS.items():
        assert seen[key].dtype == tensor.dtype and torch.equal(seen[key], tensor), key
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(TENSORS)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
        assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    else:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()


def test_reader_reads_safetensors_files(tmp_path):
    save_file(dict(list(TENSORS.items())[:4]), tmp_path / "model-00001-of-00002.safetensors")
    save_file(dict(list(TENSORS.items())[4:]), tmp_path / "model-00002-of-00002.safetensors")
    reader = CheckpointReader(tmp_path)  # no index: the complete series is read
    assert set(reader.names()) == set(TENSORS)
    for key, tensor in TENSORS.items():
        assert reader[key].shape == tuple(tensor.shape) and torch.equal(reader.read(key), tensor), key
    with pytest.raises(ConversionError, match="lacks tensor nope"):
        reader.read("nope")


def test_reader_rejects_duplicates_and_checks_offsets(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(ConversionError, match="tensor x appears in both a.safetensors and b.safetensors"):
        CheckpointReader(tmp_path)
    bad = tmp_path / "bad.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ConversionError, match="do not fit dtype and shape"):
        SafetensorsFile(bad)
    header = json.dumps({"x": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ConversionError, match="malformed"):
        SafetensorsFile(bad)
    bad.write_bytes(b"\x01")
    with pytest.raises(ConversionError, match="shorter than a safetensors header"):
        SafetensorsFile(bad)


def test_plan_shards_and_sizes():
    plans = plans_for({"a": torch.zeros(10), "b": torch.zeros(100), "c": torch.zeros(10), "d": torch.zeros(10)})
    assert [[p.name for p in shard] for shard in plan_shards(plans, 100)] == [["a"], ["b"], ["c", "d"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size("20KB") == 20000
    assert parse_size(123) == 123 and parse_size("1.5MB") == 1_500_000
    for bad in ("lots", "0", "-3MB"):
        with pytest.raises(ConversionError):
            parse_size(bad)


def test_cli_convert_and_export_with_options(sources, tmp_path, capfd):
    src = sources["llama-sharded-fp32"].folder
    dst = tmp_path / "moe"
    argv = [
        "convert",
        str(src),
        str(dst),
        "--from",
        "llama",
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--granularity",
        "2",
        "--num-dense-layers",
        "1",
        "--norm-topk-prob",
        "true",
        "--seed",
        "3",
        "--routing",
        "default",
        "--ema-beta",
        "0.8",
        "--ema-weighting",
        "router_prob",
        "--ema-update",
        "after_use",
        "--router-aux-loss-coef",
        "0.05",
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "10KB",
    ]
    assert main(argv) == 0
    out = capfd.readouterr()
    assert out.out.strip() == f"wrote {dst}"
    config = json.loads((dst / "config.json").read_text())
    assert {
        k: config[k]
        for k in (
            "num_experts",
            "num_experts_per_tok",
            "intermediate_size",
            "num_dense_layers",
            "default_ema_beta",
            "default_ema_weighting",
            "default_ema_update",
            "router_aux_loss_coef",
            "dtype",
        )
    } == {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 16,
        "num_dense_layers": 1,
        "default_ema_beta": 0.8,
        "default_ema_weighting": "router_prob",
        "default_ema_update": "after_use",
        "router_aux_loss_coef": 0.05,
        "dtype": "bfloat16",
    }
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    # Mixtral has no dense layers: export refuses with one line.
    assert main(["export", str(dst), str(tmp_path / "mixtral"), "--to", "mixtral"]) == 1
    assert "Mixtral has no dense layers" in capfd.readouterr().err


def test_progress_bar_counts_tensors(sources, tmp_path, capfd):
    from default_moe.conversion import convert

    convert(sources["mixtral-original-sharded-fp32"].folder, tmp_path / "out", progress=True)
    err = capfd.readouterr().err
    # 2 layers x (2 norms + 4 attention + router + gate_up + down + ema) + embed + norm + lm_head = 23 tensors
    assert "converting: 100%" in err and "23/23" in err


def test_a_run_removes_stale_temporaries_of_its_own_dst_only_and_not_a_live_one(sources, tmp_path, caplog):
    """What killed runs into DST left (`.DST.tmp-*` writes, `.DST.old-*` replaced folders) goes, and is named; other
    names and a temporary folder that a live process holds locked stay. The lock dies with its process."""
    dst = tmp_path / "out"
    stale = [tmp_path / ".out.tmp-dead", tmp_path / ".out.old-dead"]
    others = [tmp_path / name for name in (".outer.tmp-1", ".other.tmp-2", ".out.tmpx", "out.tmp-3")]
    for folder in stale + others:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".out.tmp-file").write_bytes(b"partial")  # a temporary file, as atomic_output_file makes
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_AND_WAIT, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with caplog.at_level(logging.WARNING):
            assert main(["convert", str(sources["llama-sharded-fp32"].folder), str(dst), "--no-progress"]) == 0
        removed = ".out.tmp-dead, .out.tmp-file, .out.old-dead"
        assert caplog.messages == [f"removed {removed} in {tmp_path}, left by an earlier interrupted run"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dst.name, live.name, *(o.name for o in others)])
        assert CheckpointReader(dst).names()
    finally:
        holder.communicate("", timeout=30)  # the holder exits, its lock with it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert (
            main(["convert", str(sources["llama-sharded-fp32"].folder), str(dst), "--overwrite", "--no-progress"]) == 0
        )
    assert caplog.messages == [f"removed .out.tmp-live in {tmp_path}, left by an earlier interrupted run"]


# Holds an exclusive lock on a folder, as a run writing into it does, until its stdin closes.
LOCK_AND_WAIT = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""
