"""`default-moe train`: a real end-to-end run, and every bad input failing early with one line and no output."""

import json
import sys

import pytest
import torch

from default_moe.cli import main
from training.helpers import TINY_RUN


def test_train_writes_a_complete_reloadable_final_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["train", *TINY_RUN, "--preset", "micro", "--output-dir", str(out), "--max-steps", "4", "--save-steps", "2"]
    )
    assert code == 0, capsys.readouterr().err
    assert "model saved to" in capsys.readouterr().out
    final = out / "final"
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_default_moe.py", "modeling_default_moe.py"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "training_summary.json", "README.md"} <= names
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    assert {"checkpoint-2", "checkpoint-4", "moe_loss_curves.png", "moe_expert_load.png"} <= {
        p.name for p in out.iterdir()
    }

    summary = json.loads((final / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 2 * 32 and summary["sequence_length"] == 32
    assert set(summary["final_losses"]) == {"lm_loss", "aux_loss", "z_loss", "eval_loss"}
    assert "standard library" in summary["data"] and "dataset" not in summary
    assert json.loads((final / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    assert "4" in (final / "README.md").read_text()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.vocab_size == len(tokenizer)
    # The EMA defaults were trained (non-zero) and saved with the weights.
    assert all(layer.mlp.default_outputs.ema.abs().sum() > 0 for layer in model.model.layers)


def test_train_from_checkpoint_with_jsonl_data_and_overrides(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", *TINY_RUN, "--preset", "micro", "--output-dir", str(base), "--max-steps", "1"]) == 0
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(60)))
    out = tmp_path / "ft"
    argv = ["train", "--model", str(base / "final"), "--data", str(data), "--seq-len", "16", "--batch-size", "2"]
    argv += ["--output-dir", str(out), "--max-steps", "2", "--no-progress", "--set", "router_z_loss_coef=0.001"]
    argv += ["--training-arg", "lr_scheduler_type=constant", "--no-monitor", "--base-model", "someone/base"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "final" / "training_summary.json").read_text())
    assert summary["initialized_from"] == str(base / "final")
    assert summary["base_model"] == "someone/base" and summary["base_model_relation"] == "finetune"
    card = (out / "final" / "README.md").read_text()
    assert "base_model: someone/base" in card and "base_model_relation: finetune" in card
    assert summary["data"] == "d.jsonl" and "eval_loss" not in summary["final_losses"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["router_z_loss_coef"] == 0.001
    assert not (out / "moe_loss_curves.png").exists()  # --no-monitor
    # Fine-tuning reused the checkpoint's tokenizer.
    assert (out / "final" / "tokenizer.json").read_text() == (base / "final" / "tokenizer.json").read_text()


def _bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("x = 1\n")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "done" / "final").mkdir(parents=True)
    (tmp_path / "cfg.json").write_text('{"hidden_size": 32, "num_attention_heads": 3}')
    micro = ["--preset", "micro"]
    return {
        "missing data": ([*micro, "--data", str(tmp_path / "nope.txt")], "data file not found"),
        "empty data": ([*micro, "--data", str(tmp_path / "empty.txt")], "data file is empty"),
        "no full sequence": ([*micro, "--data", str(tmp_path / "short.txt"), "--seq-len", "64"], "no full sequence"),
        "seq len": ([*micro, "--seq-len", "100000"], "above the model's max_position_embeddings=256"),
        "unknown preset": (["--preset", "huge"], "unknown preset 'huge'"),
        "unwritable output": ([*micro, "--output-dir", str(tmp_path / "a_file" / "sub")], "cannot be created"),
        "finished run": ([*micro, "--output-dir", str(tmp_path / "done")], "already holds a trained model"),
        "bad config": (["--config", str(tmp_path / "cfg.json")], "num_attention_heads"),
        "missing config": (["--config", str(tmp_path / "nope.json")], "config file not found"),
        "bad override": ([*micro, "--set", "routing=sideways"], "routing='sideways' is invalid"),
        "bad training arg": ([*micro, "--training-arg", "learning_rat=1"], "unknown TrainingArguments field"),
        "resume nothing": ([*micro, "--resume"], "no checkpoint-N folder"),
        "not a checkpoint": (["--model", str(tmp_path)], "no config.json"),
        "zero steps": ([*micro, "--max-steps", "0"], "nothing to train"),
    }


BAD_INPUTS = [
    "missing data", "empty data", "no full sequence", "seq len", "unknown preset", "unwritable output",
    "finished run", "bad config", "missing config", "bad override", "bad training arg", "resume nothing",
    "not a checkpoint", "zero steps",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_early_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    extra, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    # Later flags win in argparse, so the case's own --output-dir/--seq-len replace these.
    assert main(["train", *TINY_RUN, "--output-dir", str(out), "--max-steps", "1", *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "flags",
    [["--bf16"], ["--gradient-checkpointing"], ["--grad-accum", "2"], ["--routing", "topk"]],
    ids=["bf16", "activation-checkpointing", "grad-accum", "topk"],
)
def test_train_options(tmp_path, capsys, flags):
    out = tmp_path / "run"
    argv = ["train", *TINY_RUN, "--preset", "micro", "--output-dir", str(out), "--max-steps", "2", *flags]
    assert main(argv) == 0, capsys.readouterr().err
    from safetensors.torch import load_file

    weights = load_file(str(out / "final" / "model.safetensors"))
    ema = [v for k, v in weights.items() if k.endswith("default_outputs.ema")]
    assert ema and all(v.dtype == torch.float32 for v in ema)
    config = json.loads((out / "final" / "config.json").read_text())
    if "--routing" in flags:
        assert config["routing"] == "topk" and all(v.abs().sum() == 0 for v in ema)  # top-K keeps no defaults
    else:
        assert all(v.abs().sum() > 0 for v in ema)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_hub_dataset_without_the_datasets_package(tmp_path, capsys, monkeypatch):
    # lm-eval (a dev extra) installs `datasets`; a None entry in sys.modules makes `import datasets` fail as if it
    # were not installed (Python's own rule), so this runs everywhere.
    monkeypatch.setitem(sys.modules, "datasets", None)
    out = tmp_path / "out"
    argv = ["train", *TINY_RUN, "--preset", "micro", "--dataset", "wikitext", "--output-dir", str(out)]
    assert main(argv) == 1
    assert "needs the optional 'datasets' package" in capsys.readouterr().err and not out.exists()
