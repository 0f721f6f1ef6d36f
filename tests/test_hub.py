"""`default-moe push`, `push_model` and `model.push_to_hub` against a real HTTP loopback Hub, then download and load the
pushed repos with trust_remote_code in a process where `default_moe` is not importable."""

import json
import shutil
import subprocess
import sys
import textwrap
import time

import huggingface_hub
import pytest
import torch
import yaml

from default_moe import cli
from default_moe.hub import CODE_FILES, HubError, check_checkpoint_folder, push_folder
from hub_server import LoopbackHub
from tiny_checkpoint import INPUT_IDS, ema_state, hub_env, run_clean, tiny_model, tiny_tokenizer

TOKEN = "hf_loopback_test_token"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny checkpoint with tokenizer and warmed-up EMA, plus its reference logits and EMA."""
    folder = tmp_path_factory.mktemp("hub") / "ckpt"
    model = tiny_model(seed=1)
    model.save_pretrained(folder, max_shard_size="10KB")  # sharded, with model.safetensors.index.json
    tiny_tokenizer().save_pretrained(folder)
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    ema = ema_state(model)
    assert all(e.abs().sum() > 0 for e in ema.values()), "EMA should have moved off zero"
    torch.save({"logits": logits, "ema": ema}, folder.parent / "expected.pt")
    return folder


@pytest.fixture
def hub():
    with LoopbackHub() as server:
        yield server


def test_push_end_to_end(hub, checkpoint, tmp_path):
    """CLI push (private, branch), model.push_to_hub and push_model, all over HTTP; then a clean-process load."""
    # 1. One process with HF_ENDPOINT set: the CLI (`default-moe push` is `default_moe.cli:main`), then
    #    model.push_to_hub and push_model.
    push_script = textwrap.dedent(f"""
        import time
        t0 = time.time()
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import default_moe
        from default_moe import cli
        from default_moe.hub import push_model
        t1 = time.time()
        assert cli.main(["push", {str(checkpoint)!r}, "test-user/tiny", "--private", "--revision", "dev"]) == 0
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
        assert type(model).__module__ == "default_moe.modeling_default_moe", type(model).__module__
        model.push_to_hub("test-user/tiny-p2h")
        push_model(model, "test-user/tiny-pm", tokenizer=AutoTokenizer.from_pretrained({str(checkpoint)!r}),
                   base_model="test-user/tiny", base_model_relation="finetune", datasets=["stdlib"])
        print(f"import {{t1 - t0:.1f}}s, pushes {{time.time() - t1:.1f}}s")
    """)
    result = subprocess.run(
        [sys.executable, "-c", push_script],
        env=hub_env(hub.url, tmp_path / "home_push", token=TOKEN), cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pushed" in result.stdout and "test-user/tiny/commit/" in result.stdout
    print(result.stdout)

    # 2. What reached the server.
    tiny = hub.repos["test-user/tiny"]
    assert tiny.private
    create = [r for r in hub.requests if r.path == "/api/repos/create" and r.json["name"] == "tiny"]
    assert create[0].json.get("visibility") == "private"
    assert set(tiny.files("main")) == {".gitattributes"}, "a --revision push must not touch main"
    dev = tiny.files("dev")
    local = {p.name for p in checkpoint.iterdir() if p.is_file()}
    assert set(dev) == local | {".gitattributes", "README.md"}
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json", *CODE_FILES} <= set(dev)
    assert len([name for name in dev if name.endswith(".safetensors")]) > 1
    for name in local:
        assert dev[name] == (checkpoint / name).read_bytes(), name
    commits = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert {r.path for r in commits} == {
        "/api/models/test-user/tiny/commit/dev",
        "/api/models/test-user/tiny-p2h/commit/main",
        "/api/models/test-user/tiny-pm/commit/main",
    }
    assert all(r.authorization == f"Bearer {TOKEN}" for r in commits)
    readme = dev["README.md"].decode()
    metadata = yaml.safe_load(readme.split("---")[1])
    assert metadata["library_name"] == "transformers" and "default-moe" in metadata["tags"]
    assert 'from_pretrained("test-user/tiny", trust_remote_code=True)' in readme

    p2h = hub.repos["test-user/tiny-p2h"]
    assert not p2h.private
    p2h_files = p2h.files("main")
    assert {"config.json", "model.safetensors", "README.md", *CODE_FILES} <= set(p2h_files)
    for name in CODE_FILES:
        assert p2h_files[name] == (checkpoint / name).read_bytes()
    assert json.loads(p2h_files["config.json"])["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_default_moe.DefaultMoeForCausalLM"
    )
    pm_files = hub.repos["test-user/tiny-pm"].files("main")
    assert {"tokenizer.json", "model.safetensors", *CODE_FILES} <= set(pm_files)
    pm_meta = yaml.safe_load(pm_files["README.md"].decode().split("---")[1])
    assert pm_meta["base_model"] == "test-user/tiny" and pm_meta["base_model_relation"] == "finetune"

    # 3. Download and load in a process where default_moe cannot be imported.
    script = textwrap.dedent(f"""
        import torch
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ids = torch.tensor({INPUT_IDS.tolist()})
        out = {{}}
        def record(key, model):
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                logits = model(ids).logits
            ema = {{str(i): l.mlp.default_outputs.ema for i, l in enumerate(model.model.layers) if l.is_moe}}
            out[key] = {{"logits": logits, "ema": ema}}
        try:
            HfApi(token=False).model_info("test-user/tiny", revision="dev")
            raise SystemExit("private repo visible without a token")
        except RepositoryNotFoundError:
            pass
        local = snapshot_download("test-user/tiny", revision="dev")
        record("cli_snapshot", AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True).eval())
        record("cli_repo", AutoModelForCausalLM.from_pretrained(
            "test-user/tiny", revision="dev", trust_remote_code=True).eval())
        record("p2h", AutoModelForCausalLM.from_pretrained("test-user/tiny-p2h", trust_remote_code=True).eval())
        record("pm", AutoModelForCausalLM.from_pretrained("test-user/tiny-pm", trust_remote_code=True).eval())
        tok = AutoTokenizer.from_pretrained("test-user/tiny", revision="dev")
        out["tokens"] = tok("w1 w2 w3").input_ids
        torch.save(out, "loaded.pt")
    """)
    t0 = time.time()
    run_clean(script, tmp_path, hub_env(hub.url, tmp_path / "home_clean", token=TOKEN))
    print(f"clean load {time.time() - t0:.1f}s")
    loaded = torch.load(tmp_path / "loaded.pt")
    expected = torch.load(checkpoint.parent / "expected.pt")
    for key in ("cli_snapshot", "cli_repo", "p2h", "pm"):
        torch.testing.assert_close(loaded[key]["logits"], expected["logits"], rtol=0, atol=0, msg=key)
        assert loaded[key]["ema"].keys() == expected["ema"].keys()
        for layer, ema in expected["ema"].items():
            assert loaded[key]["ema"][layer].dtype == torch.float32
            assert torch.equal(loaded[key]["ema"][layer], ema), (key, layer)
    assert loaded["tokens"] == [4, 5, 6]


def test_push_without_token_fails_before_any_request(hub, checkpoint, tmp_path, monkeypatch, capsys):
    """No --token, no HF_TOKEN, no saved login: one clear line, and not a single request reached the Hub."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    assert huggingface_hub.get_token() is None
    message = "no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`"
    with pytest.raises(HubError, match="no Hugging Face token"):
        push_folder(checkpoint, "test-user/x", endpoint=hub.url)
    assert cli.main(["push", str(checkpoint), "test-user/x"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert hub.requests == [] and hub.repos == {}


def _break(folder, how):
    if how == "no_config":
        (folder / "config.json").unlink()
    elif how == "not_default_moe":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
    elif how == "no_auto_map":
        config = json.loads((folder / "config.json").read_text())
        del config["auto_map"]
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "no_modeling_file":
        (folder / "modeling_default_moe.py").unlink()
    elif how == "no_config_file":
        (folder / "configuration_default_moe.py").unlink()
    elif how == "no_weights":
        for path in folder.glob("model*.safetensors*"):
            path.unlink()
    elif how == "missing_shard":
        shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
        assert len(shards) > 1
        (folder / shards[-1]).unlink()


BROKEN = {
    "no_config": "config.json is missing",
    "not_default_moe": "is not a Default MoE config",
    "no_auto_map": "has no auto_map entry",
    "no_modeling_file": "is missing modeling_default_moe.py",
    "no_config_file": "is missing configuration_default_moe.py",
    "no_weights": "has no weights",
    "missing_shard": "is missing weight shard(s) model-0000",
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_push_rejects_incomplete_folders(checkpoint, tmp_path, how, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    _break(folder, how)
    with pytest.raises(HubError, match=BROKEN[how].replace("(", r"\(").replace(")", r"\)")):
        push_folder(folder, "test-user/x", token=TOKEN, endpoint="http://127.0.0.1:9")  # nothing listens on :9
    assert cli.main(["push", str(folder), "test-user/x", "--token", TOKEN]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and BROKEN[how] in err[0]


def test_upload_list_skips_trainer_state_and_hidden_files(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_bytes(b"x")
    (folder / "training_summary.json").write_text("{}")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept")
    files = check_checkpoint_folder(folder)
    assert "training_summary.json" in files and "extra/notes.txt" in files
    assert not any(f.startswith(("checkpoint-", ".cache")) for f in files)


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "/x", "x/"])
def test_push_rejects_bad_repo_ids(checkpoint, repo_id):
    with pytest.raises(HubError, match="invalid repo id"):
        push_folder(checkpoint, repo_id, token=TOKEN, endpoint="http://127.0.0.1:9")
