"""Bad input through the real command line: one `error:` line on stderr, exit 1, no partial DST, SRC untouched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conversion.sources import copy_source, folder_digest
from default_moe.cli import main
from default_moe.conversion import convert

SOURCE = "mixtral-original-sharded-fp32"
QWEN3_MOE = "qwen3_moe-original-sharded-fp32-dense-middle"
QWEN2_MOE = "qwen2_moe-original-sharded-fp32-sliding-layer0"


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def truncate(folder: Path) -> None:
    path = shards(folder)[-1]
    path.write_bytes(path.read_bytes()[:-10])


def corrupt_header(folder: Path) -> None:
    path = shards(folder)[0]
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"
    path.write_bytes(bytes(data))


def huge_header(folder: Path) -> None:
    path = shards(folder)[0]
    path.write_bytes((10**12).to_bytes(8, "little") + path.read_bytes()[8:])


def index_names_missing_file(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def index_names_wrong_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def extra_tensor(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file(
        {"model.layers.0.block_sparse_moe.experts.0.w1.weight_scale": torch.ones(1)}, folder / "extra.safetensors"
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.block_sparse_moe.experts.0.w1.weight_scale"] = "extra.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def only_bin_weights(folder: Path) -> None:
    for path in folder.glob("*.safetensors*"):
        path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really")


# case -> (damage to a copy of SRC, extra CLI args, expected message fragment)
CASES = {
    "unknown-model-type": (lambda f: set_config(f, model_type="gpt2"), [], "unsupported model_type 'gpt2'"),
    "made-up-model-type": (lambda f: set_config(f, model_type="nonsense"), [], "unsupported model_type 'nonsense'"),
    "no-config": (lambda f: (f / "config.json").unlink(), [], "has no config.json"),
    "config-not-json": (lambda f: (f / "config.json").write_text("{"), [], "config.json is not valid JSON"),
    "missing-shard": (lambda f: shards(f)[1].unlink(), [], "names shard model-00002-of-"),
    "missing-shard-no-index": (
        lambda f: [(f / "model.safetensors.index.json").unlink(), shards(f)[1].unlink()],
        [],
        "shard model-00002-of-000",
    ),
    "index-names-missing-file": (
        index_names_missing_file,
        [],
        "names shard model-00009-of-00009.safetensors, which is missing",
    ),
    "index-names-wrong-shard": (index_names_wrong_shard, [], "but that shard lacks it"),
    "index-not-json": (
        lambda f: (f / "model.safetensors.index.json").write_text("nope"),
        [],
        "not a valid safetensors index",
    ),
    "truncated-shard": (truncate, [], "is truncated"),
    "corrupt-header": (corrupt_header, [], "not a valid safetensors file"),
    "huge-header": (huge_header, [], "header length"),
    "shape-mismatch": (lambda f: set_config(f, intermediate_size=24), [], "config.json implies"),
    "config-invalid-for-default-moe": (
        lambda f: set_config(f, num_experts_per_tok=9),
        [],
        "num_experts_per_tok=9 is invalid",
    ),
    "unexpected-tensor": (
        extra_tensor,
        [],
        "unexpected tensor model.layers.0.block_sparse_moe.experts.0.w1.weight_scale",
    ),
    "pytorch-bin-only": (only_bin_weights, [], "no safetensors weights"),
    "upcycling-option-on-moe": (lambda f: None, ["--num-experts", "4"], "--num-experts only applies to upcycling"),
    "wrong-from": (
        lambda f: None,
        ["--from", "olmoe"],
        "--from olmoe given, but SRC config.json has model_type 'mixtral'",
    ),
    "bad-shard-size": (lambda f: None, ["--max-shard-size", "lots"], "cannot parse size 'lots'"),
    "calibration-file-missing": (lambda f: None, ["--calibration-data", "/nonexistent.txt"], "is not a file"),
}
# Qwen-MoE specifics: case -> (source, damage, extra CLI args, expected message fragment)
QWEN_CASES = {
    "sparse-step-zero": (QWEN3_MOE, lambda f: set_config(f, decoder_sparse_step=0), [], "decoder_sparse_step=0"),
    "head-dim-not-hidden-over-heads": (
        QWEN3_MOE,
        lambda f: set_config(f, head_dim=8),
        [],
        "q_proj.weight has shape (64, 32) but config.json implies (32, 32)",
    ),
    "dense-layer-missing": (
        QWEN3_MOE,
        lambda f: set_config(f, mlp_only_layers=[]),
        [],
        "lacks tensor model.layers.1.mlp.gate.weight",
    ),
    "shared-expert-width": (
        QWEN2_MOE,
        lambda f: set_config(f, shared_expert_intermediate_size=8),
        [],
        "shared_expert.gate_proj.weight has shape (20, 32) but config.json implies (8, 32)",
    ),
    "layer-types-unknown": (
        QWEN2_MOE,
        lambda f: set_config(f, layer_types=["chunked_attention", "full_attention"]),
        [],
        "layer_types=",
    ),
}


def run_cli(capfd, argv: list[str]) -> tuple[int, list[str]]:
    code = main(argv)
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_clean_failure(code, lines, fragment, dst: Path):
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert not dst.exists() and not dst.parent.exists(), "DST (or a parent folder it created) left behind"


@pytest.mark.parametrize("case", [*CASES, *QWEN_CASES])
def test_bad_source(sources, tmp_path, capfd, case):
    source, damage, args, fragment = (SOURCE, *CASES[case]) if case in CASES else QWEN_CASES[case]
    src = copy_source(sources[source], tmp_path / "src")
    damage(src)
    before = folder_digest(src)
    dst = tmp_path / "out" / "dst"
    capfd.readouterr()
    code, lines = run_cli(capfd, ["convert", str(src), str(dst), *args])
    assert_clean_failure(code, lines, fragment, dst)
    assert folder_digest(src) == before


def test_missing_source_and_offline_hub(tmp_path, capfd, monkeypatch):
    dst = tmp_path / "out" / "dst"
    code, lines = run_cli(capfd, ["convert", str(tmp_path / "no" / "such" / "folder"), str(dst)])
    assert_clean_failure(code, lines, "does not exist", dst)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, lines = run_cli(capfd, ["convert", "no-such-org/no-such-model", str(dst)])
    assert_clean_failure(code, lines, "not a local folder and fetching it from the Hub failed", dst)


def test_destination_not_empty_needs_overwrite(sources, tmp_path, capfd):
    src = sources[SOURCE].folder
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, lines = run_cli(capfd, ["convert", str(src), str(dst)])
    assert code == 1 and len(lines) == 1 and "exists and is not empty (pass --overwrite" in lines[0]
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # An empty DST is fine; --overwrite replaces a non-empty one entirely.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(src), str(empty), "--no-progress"]) == 0 and (empty / "config.json").is_file()
    assert main(["convert", str(src), str(dst), "--overwrite", "--no-progress"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "empty"]


@pytest.mark.parametrize("where", ["under-a-file", "proc", "is-a-file", "inside-src", "is-src"])
def test_unwritable_destination(sources, tmp_path, capfd, where):
    src = copy_source(sources[SOURCE], tmp_path / "src")
    before = folder_digest(src)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    dst, fragment = {
        "under-a-file": (blocker / "dst", "cannot write DST"),
        "proc": (Path("/proc/default-moe-test/dst"), "cannot write DST"),
        "is-a-file": (blocker, "exists and is not a folder"),
        "inside-src": (src / "converted", "must not be SRC, inside SRC"),
        "is-src": (src, "must not be SRC"),
    }[where]
    code, lines = run_cli(capfd, ["convert", str(src), str(dst), "--overwrite"])
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert folder_digest(src) == before
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "src"]


def test_failure_while_writing_leaves_no_partial_destination(sources, tmp_path, monkeypatch):
    """An error after some shards are written removes the temporary folder and keeps an existing DST as it was."""
    import default_moe.conversion.api as convert_module

    real_write = convert_module.write_checkpoint
    written = []

    def failing_write(folder, plans, max_shard_bytes, progress=None):
        def boom():
            written.extend(p.name for p in folder.glob("*.safetensors"))
            raise OSError(28, "No space left on device")

        plans[-1].make = boom
        return real_write(folder, plans, max_shard_bytes, progress)

    monkeypatch.setattr(convert_module, "write_checkpoint", failing_write)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(OSError, match="No space left"):
        convert(sources[SOURCE].folder, dst, overwrite=True, max_shard_size="8KB", progress=False)
    assert len(written) > 1  # it failed part-way, with shards already on disk
    assert [p.name for p in dst.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_export_bad_inputs(sources, tmp_path, capfd):
    src = sources[SOURCE].folder
    code, lines = run_cli(capfd, ["export", str(src), str(tmp_path / "x" / "dst"), "--to", "mixtral"])
    assert_clean_failure(code, lines, "export needs a default_moe checkpoint", tmp_path / "x" / "dst")
    converted = convert(src, tmp_path / "moe", progress=False)
    (converted / "model.safetensors").write_bytes((converted / "model.safetensors").read_bytes()[:100])
    code, lines = run_cli(capfd, ["export", str(converted), str(tmp_path / "y" / "dst"), "--to", "mixtral"])
    assert_clean_failure(code, lines, "model.safetensors is not a valid safetensors file", tmp_path / "y" / "dst")


def test_real_subprocess(sources, tmp_path):
    src = copy_source(sources[SOURCE], tmp_path / "src")
    set_config(src, model_type="gpt2")
    dst = tmp_path / "dst"
    env = {k: v for k, v in os.environ.items() if k != "DEFAULT_MOE_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-m", "default_moe.cli", "convert", str(src), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: unsupported model_type 'gpt2' in {src / 'config.json'}: expected one of mixtral, olmoe, flex_olmo, "
        "qwen3_moe, qwen2_moe, llama, mistral, qwen2, qwen3, olmo2, olmo3"
    ]
    assert not dst.exists()
