"""DefaultMoeCallback in a user's own transformers.Trainer: logged values, plots, collapse warning."""

import logging
import math

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator
from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

from default_moe import DefaultMoeForCausalLM
from default_moe.peft import lora_config
from default_moe.training import DefaultMoeCallback
from default_moe.training.data import PackedDataset
from default_moe.training.trainer import preset_config
from tiny_models import checkpointing_argument

VOCAB, SEQ, BATCH = 128, 16, 4


def make_trainer(
    tmp_path, callback, steps=6, routing="default", checkpointing=False, collapse=False, lora=False, **config
):
    torch.manual_seed(0)
    model = DefaultMoeForCausalLM(preset_config("micro", vocab_size=VOCAB, routing=routing, **config))
    if lora:
        model = get_peft_model(model, lora_config(r=2, model=model))
    if collapse:
        # Expert 0's logit is 0 while experts 1 and 2 have logits +s and -s: with top-1, one of them always beats
        # expert 0, so it never gets a token; the large s keeps it so through a few small optimizer steps.
        with torch.no_grad():
            for layer in model.model.layers:
                weight = layer.mlp.gate.weight
                direction = torch.randn(weight.shape[1])
                weight[0] = 0.0
                weight[1] = 100 * direction
                weight[2] = -100 * direction
    blocks = torch.randint(0, VOCAB, (steps * BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **checkpointing_argument(checkpointing),
        dataloader_pin_memory=False,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=PackedDataset(blocks),
        data_collator=default_data_collator,
        callbacks=[callback],
    )


def step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_logs_losses_and_router_statistics_and_writes_plots(tmp_path, checkpointing):
    callback = DefaultMoeCallback()
    trainer = make_trainer(tmp_path, callback, checkpointing=checkpointing, router_z_loss_coef=0.01)
    trainer.train()
    config = trainer.model.config
    assert len(step_logs(trainer)) == 6 and len(callback.history) == 6
    for entry in step_logs(trainer):
        # The separate parts add up to the loss the Trainer optimised (one micro-batch per step here).
        total = entry["moe/lm_loss"] + config.router_aux_loss_coef * entry["moe/aux_loss"]
        total += config.router_z_loss_coef * entry["moe/z_loss"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)
        assert entry["moe/aux_loss"] >= 0.99  # Switch loss is >= 1 up to the discrete/soft mismatch
        for layer in (0, 1):
            shares = [entry[f"moe/layer{layer}/expert{e}"] for e in range(4)]
            assert sum(shares) == pytest.approx(1.0)
            assert entry[f"moe/layer{layer}/load_max"] == pytest.approx(4 * max(shares))
            assert 0 < entry[f"moe/layer{layer}/router_entropy"] <= math.log(4) + 1e-6
            assert entry[f"moe/layer{layer}/ema_norm"] > 0
    # Counted once per training forward: activation checkpointing's recomputed forwards are not counted again.
    assert callback._run_counts.sum(-1).tolist() == [6 * BATCH * SEQ * config.num_experts_per_tok] * 2
    assert [p.name for p in callback.plot_files] == ["moe_loss_curves.png", "moe_expert_load.png"]
    for path in callback.plot_files:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    load = callback.expert_load()
    assert load.shape == (2, 4) and torch.allclose(load.sum(-1), torch.full((2,), 4.0, dtype=load.dtype))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dense_layers_anywhere_and_a_shared_expert(tmp_path, lora):
    """Entries are named by the layer's index in the model, so the dense layer in the middle has none; each shared
    expert's gate is logged (its mean sigmoid over the training tokens), LoRA-adapted or not."""
    callback = DefaultMoeCallback(plots=False)
    config = dict(num_hidden_layers=3, dense_layers=[1], shared_expert_intermediate_size=16)
    trainer = make_trainer(tmp_path, callback, steps=2, lora=lora, **config)
    trainer.train()
    assert callback._layers == [0, 2]
    for entry in step_logs(trainer):
        assert not any(key.startswith("moe/layer1/") for key in entry)
        for layer in (0, 2):
            assert sum(entry[f"moe/layer{layer}/expert{e}"] for e in range(4)) == pytest.approx(1.0)
            assert 0 < entry[f"moe/layer{layer}/shared_gate"] < 1
    top_k = trainer.model.config.num_experts_per_tok
    assert callback._run_counts.sum(-1).tolist() == [2 * BATCH * SEQ * top_k] * 2


def test_eval_forwards_are_not_counted_and_topk_has_no_defaults(tmp_path):
    callback = DefaultMoeCallback(plots=False)
    trainer = make_trainer(tmp_path, callback, steps=2, routing="topk")
    trainer.train()
    counted = callback._run_counts.sum().item()
    trainer.evaluate(PackedDataset(torch.randint(0, VOCAB, (8, SEQ))))
    trainer.log({"after_eval": 1.0})
    assert callback._run_counts.sum().item() == counted and len(callback.history) == 2
    assert all(entry[f"moe/layer{layer}/ema_norm"] == 0 for entry in trainer.state.log_history[:2] for layer in (0, 1))
    assert callback.plot_files == [] and not (tmp_path / "moe_loss_curves.png").exists()


@pytest.mark.parametrize("collapse", [True, False], ids=["collapsed", "healthy"])
def test_collapse_warning(tmp_path, caplog, collapse):
    callback = DefaultMoeCallback(plots=False, collapse_threshold=0.1, collapse_patience=3)
    trainer = make_trainer(tmp_path, callback, steps=5, collapse=collapse)
    with caplog.at_level(logging.WARNING, logger="default_moe.training.callback"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "Router collapse" in r.getMessage()]
    if collapse:
        # Expert 0 of both layers starved from the first window on: warned once each, at the 3rd window.
        assert (3, 0, 0) in callback.collapse_warnings and (3, 1, 0) in callback.collapse_warnings
        assert all(step == 3 for step, _, _ in callback.collapse_warnings)
        assert len(warnings) == len(callback.collapse_warnings)
        assert any("layer 0 expert 0 got 0.00%" in w for w in warnings)
        assert all(entry["moe/layer0/expert0"] == 0 for entry in step_logs(trainer))
    else:
        assert callback.collapse_warnings == [] and warnings == []
        assert min(entry["moe/layer0/load_min"] for entry in step_logs(trainer)) > 0.1


@pytest.mark.parametrize("broken", [True, False], ids=["inf-expert", "healthy"])
def test_non_finite_expert_outputs_warn_once(tmp_path, caplog, broken):
    callback = DefaultMoeCallback(plots=False)
    trainer = make_trainer(tmp_path, callback, steps=3)
    if broken:  # one expert of layer 1 overflows from the start; a gradient step keeps it so
        with torch.no_grad():
            trainer.model.model.layers[1].mlp.experts.down_proj[0].fill_(float("inf"))
    with caplog.at_level(logging.WARNING, logger="default_moe.training.callback"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "Non-finite expert outputs" in r.getMessage()]
    assert len(warnings) == int(broken) and callback.warned_non_finite == broken
    if broken:
        assert "per MoE layer [0, 1]: [0, " in warnings[0] and "by step 1" in warnings[0]


def test_install_runs_before_reporters_and_append_after_printer(tmp_path):
    callback = DefaultMoeCallback(plots=False)
    trainer = make_trainer(tmp_path, DefaultMoeCallback(plots=False))  # appended by callbacks=[...]
    callback.install(trainer)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert kinds.index(DefaultFlowCallback) + 1 == trainer.callback_handler.callbacks.index(callback)
    printer = next(i for i, kind in enumerate(kinds) if kind in (PrinterCallback, ProgressCallback))
    assert trainer.callback_handler.callbacks.index(callback) < printer


def test_rejects_models_without_moe_layers_and_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="collapse_threshold"):
        DefaultMoeCallback(collapse_threshold=1.5)
    with pytest.raises(ValueError, match="collapse_patience"):
        DefaultMoeCallback(collapse_patience=0)
    callback = DefaultMoeCallback()
    with pytest.raises(ValueError, match="no Default MoE layers"):
        callback.on_train_begin(None, None, None, model=torch.nn.Linear(2, 2))
