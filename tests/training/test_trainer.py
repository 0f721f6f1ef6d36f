"""Trainer runs: resuming after a crash or SIGTERM restores the EMA defaults exactly; presets, configs and the atomic
final save."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conversion.sources import build_model, save_source
from default_moe.conversion import convert
from default_moe.training import cli as train_cli
from default_moe.training import trainer as training
from default_moe.training.checkpoints import Preempted
from training.helpers import TINY_RUN, train_args


class Crash(RuntimeError):
    pass


class CrashAfterCheckpoint(TrainerCallback):
    """Simulates a killed job: dies right after the Trainer wrote checkpoint-`step`."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"killed after checkpoint-{self.step}")


def _ema(model_dir):
    weights = load_file(str(model_dir / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.endswith("default_outputs.ema")}, weights


def _losses(log_history):
    return {e["step"]: e["loss"] for e in log_history if "loss" in e}


@pytest.fixture(scope="module")
def converted_qwen3_moe(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint in the Hub layout (per-head q/k norms, head_dim != hidden/heads, a dense layer in
    the middle, renormalised top-2, sliding window), converted: what `default-moe convert` makes of Qwen3-30B-A3B."""
    root = tmp_path_factory.mktemp("qwen3_moe")
    source = build_model(
        "qwen3_moe",
        0,
        num_hidden_layers=3,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        use_sliding_window=True,
        sliding_window=8,
    )
    save_source(source, root / "qwen3_moe", "original", "fp32", "8KB")
    return convert(root / "qwen3_moe", root / "converted", progress=False)


class SigtermDuringStep(TrainerCallback):
    """Preemption as a scheduler does it: a real SIGTERM to this process, arriving while step `step` runs."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


# (how the run is interrupted, the checkpoint it leaves): checkpoints every 3 steps; SIGTERM during step 4 saves one
# at the end of step 4.
INTERRUPTIONS = {
    "crash": (Crash, CrashAfterCheckpoint(3), "checkpoint-3"),
    "sigterm": (Preempted, SigtermDuringStep(4), "checkpoint-4"),
}


@pytest.mark.parametrize("interruption", sorted(INTERRUPTIONS))
@pytest.mark.parametrize(
    ("model", "grad_accum"), [("micro", 1), ("micro", 2), ("qwen3_moe", 1)], ids=["micro", "micro-accum2", "qwen3_moe"]
)
def test_interrupted_run_plus_resume_equals_uninterrupted_run(tmp_path, request, model, grad_accum, interruption):
    """A fresh model (`--preset micro`), or fine-tuning a converted Qwen3-MoE checkpoint (`--model DIR`)."""
    source = ["--preset", "micro"] if model == "micro" else ["--model", request.getfixturevalue("converted_qwen3_moe")]
    run = [*TINY_RUN, *source, "--max-steps", "6", "--save-steps", "3", "--grad-accum", grad_accum]
    run += ["--lr", "3e-3", "--set", "default_ema_beta=0.5"]  # a fast-moving EMA makes a wrong restore visible
    straight = train_cli.train(train_args(*run, "--output-dir", tmp_path / "a"))

    error, callback, checkpoint = INTERRUPTIONS[interruption]
    with pytest.raises(error) as raised:
        train_cli.train(train_args(*run, "--output-dir", tmp_path / "b"), callbacks=[callback])
    assert (tmp_path / "b" / checkpoint).is_dir() and not (tmp_path / "b" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's SIGTERM handler is gone again
    if interruption == "sigterm":  # saved at the step boundary after the signal, said so, and stopped there
        saved = tmp_path / "b" / checkpoint
        assert (
            str(raised.value)
            == f"stopped by SIGTERM after step 4: checkpoint saved to {saved} (continue with --resume)"
        )
        assert raised.value.exit_code == 143
        assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    # The Trainer checkpoint holds the EMA defaults (persistent buffers are in the state dict), already trained.
    ema_at_stop, _ = _ema(tmp_path / "b" / checkpoint)
    assert len(ema_at_stop) == 2 and all(v.abs().sum() > 0 for v in ema_at_stop.values())

    resumed = train_cli.train(train_args(*run, "--output-dir", tmp_path / "b", "--resume"))
    assert resumed.summary["steps"] == straight.summary["steps"] == 6

    # Same per-step training losses after the restart, same final EMA, weights and validation loss. The runs do
    # the same fp32 CPU operations in the same order on the same data (the Trainer replays the sampler and skips
    # the batches already seen), so they agree to float32 rounding; the tolerance only absorbs that.
    # (The resumed Trainer's history starts with the steps restored from the checkpoint: each step once, none redone.)
    assert [e["step"] for e in resumed.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in straight.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert _losses(resumed.log_history) == pytest.approx(_losses(straight.log_history), rel=1e-5)
    ema_a, weights_a = _ema(tmp_path / "a" / "final")
    ema_b, weights_b = _ema(tmp_path / "b" / "final")
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in ema_a:
        torch.testing.assert_close(ema_b[key], ema_a[key], rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.allclose(ema_a[key], ema_at_stop[key])  # it kept moving after the interruption
    losses_a, losses_b = straight.summary["final_losses"], resumed.summary["final_losses"]
    assert losses_b["eval_loss"] == pytest.approx(losses_a["eval_loss"], rel=1e-5)


def test_resume_with_wrong_ema_would_be_caught(tmp_path):
    """The comparison above can fail: zeroing the EMA in the checkpoint before resuming changes the result."""
    run = [*TINY_RUN, "--preset", "micro", "--max-steps", "4", "--save-steps", "2", "--lr", "3e-3"]
    run += ["--set", "default_ema_beta=0.5"]
    straight = train_cli.train(train_args(*run, "--output-dir", tmp_path / "a"))
    with pytest.raises(Crash):
        train_cli.train(train_args(*run, "--output-dir", tmp_path / "b"), callbacks=[CrashAfterCheckpoint(2)])
    from safetensors.torch import save_file

    path = tmp_path / "b" / "checkpoint-2" / "model.safetensors"
    weights = load_file(str(path))
    save_file({k: (v.zero_() if k.endswith(".ema") else v) for k, v in weights.items()}, str(path), {"format": "pt"})
    resumed = train_cli.train(train_args(*run, "--output-dir", tmp_path / "b", "--resume"))
    ema_a, _ = _ema(tmp_path / "a" / "final")
    ema_b, _ = _ema(tmp_path / "b" / "final")
    assert any(not torch.allclose(ema_a[k], ema_b[k], rtol=1e-5, atol=1e-6) for k in ema_a)
    assert resumed.summary["steps"] == straight.summary["steps"]


@pytest.mark.parametrize("preset", sorted(training.PRESETS))
def test_presets_build_valid_configs(preset):
    config = training.preset_config(preset, vocab_size=1000)
    assert config.vocab_size == 1000 and config.num_experts_per_tok <= config.num_experts


def test_config_file_and_overrides(tmp_path):
    config = training.preset_config("micro", vocab_size=600)
    config.save_pretrained(tmp_path)
    built = training.build_config(config_file=str(tmp_path / "config.json"), overrides={"routing": "topk"})
    assert built.routing == "topk" and built.hidden_size == config.hidden_size and built.vocab_size == 600
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not 'default_moe'"):
        training.build_config(config_file=str(tmp_path / "other.json"))
    assert training.parse_overrides(["a=1", "b=x", "c=[1, 2]", "d=null"]) == {"a": 1, "b": "x", "c": [1, 2], "d": None}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        training.parse_overrides(["novalue"])


def test_save_final_is_atomic_and_replaces(tmp_path):
    from default_moe.training.data import builtin_tokenizer

    model = training.load_model("micro", vocab_size=512)
    tokenizer = builtin_tokenizer(512)

    def write(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    final = training.save_final(tmp_path, {"steps": 1}, write, write_card=False)
    assert json.loads((final / "training_summary.json").read_text()) == {"steps": 1}
    assert {"model.safetensors", "modeling_default_moe.py", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in final.iterdir()} == {0o666 & ~umask}  # readable like other files
    # A failing save leaves the previous final folder untouched and no temporary folder behind.
    with pytest.raises(TypeError):
        training.save_final(tmp_path, {"not json": object()}, write, write_card=False)
    assert json.loads((final / "training_summary.json").read_text()) == {"steps": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    training.save_final(tmp_path, {"steps": 2}, write, write_card=False)
    assert json.loads((final / "training_summary.json").read_text()) == {"steps": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    # Not the main process: writes nothing itself (the main process does), returns None.
    assert training.save_final(tmp_path / "other", {}, lambda folder: None, is_main=False) is None
    assert not (tmp_path / "other").exists()
