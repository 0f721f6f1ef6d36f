"""TRL's SFTTrainer and DPOTrainer on a Default MoE model loaded with `trust_remote_code` (docs/trl.md).

`default_moe.training.trl`'s trainers give the gradient of Default MoE's own objective: one SFT step (two
micro-batches with different token counts) has the gradient of the same step with `transformers.Trainer` on our
model, and one DPO step the gradient of the DPO loss on our model's own forward plus its router losses, both to
float32 rounding (rtol 1e-5, atol 1e-7; measured max abs differences 1.1e-8 to 2.2e-8). Plain TRL differs by 3e-3 to
1e-2 (its router term is transformers' Mixtral loss). The DPO+LoRA reference pass moves no EMA.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from default_moe.peft import lora_config
from tiny_checkpoint import INPUT_IDS, ema_state, tiny_model, tiny_tokenizer

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402 (a dependency of trl)

from default_moe.training.trl import DPOTrainer, SFTTrainer  # noqa: E402

ROUTER_COEFS = dict(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)  # large enough to matter in the gradient


def _words(start: int, count: int) -> str:
    return " ".join(f"w{(start + 3 * j) % 29}" for j in range(count))


# Prompt-completion pairs: the two micro-batches of an SFT step hold 8 and 16 completion tokens.
SFT_DATA = [{"prompt": _words(7 * i, 3 + i % 3), "completion": " " + _words(5 * i, 2 + 2 * i)} for i in range(4)]
DPO_DATA = [
    {"prompt": _words(i, 2 + i % 3), "chosen": " " + _words(i + 5, 2 + i), "rejected": " " + _words(i + 11, 4 - i % 2)}
    for i in range(4)
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Default MoE (a dense layer, then two MoE layers) with its tokenizer, as a remote-code checkpoint."""
    path = tmp_path_factory.mktemp("trl") / "tiny"
    tiny_model(seed=2, num_hidden_layers=3, **ROUTER_COEFS).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


class Gradients(TrainerCallback):
    """The gradients of the step, as the optimizer is about to see them."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _args(output_dir, **overrides) -> dict:
    """One step in float32 (TRL's configs default to bf16), unclipped, on the examples in order."""
    args = dict(
        output_dir=str(output_dir), max_steps=1, learning_rate=1e-2, max_grad_norm=0.0, bf16=False,
        train_sampling_strategy="sequential", save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    return {**args, **overrides}


def _load(folder):
    """The model as `from_pretrained(folder, trust_remote_code=True)` loads it where default_moe is not imported: from
    the folder's copy of the model code (where it is imported, as here, the Auto classes take the registered ones)."""
    model_class = get_class_from_dynamic_module("modeling_default_moe.DefaultMoeForCausalLM", folder)
    assert model_class.__module__.startswith("transformers_modules"), model_class.__module__
    return model_class.from_pretrained(folder)


def _max_abs_difference(grads, expected) -> float:
    assert grads.keys() == expected.keys()
    return max((grads[name] - expected[name]).abs().max().item() for name in expected)


def _assert_same_gradients(grads, expected):
    assert any(".mlp.gate." in name for name in expected)  # the router is trained
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _train(trainer_class, model, args, dataset, folder, lora, **kwargs):
    """One step: (trainer, the step's gradients, the trainable model's state before it)."""
    gradients = Gradients()
    trainer = trainer_class(
        model=model, args=args, train_dataset=Dataset.from_list(dataset), callbacks=[gradients],
        processing_class=AutoTokenizer.from_pretrained(folder), peft_config=lora_config(r=2) if lora else None,
        **kwargs,
    )  # fmt: skip
    state = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.train()
    return trainer, gradients.grads, state


def _model_like(folder, state, lora):
    """A fresh remote-code model (with the same LoRA adapter) in the given state."""
    model = _load(folder)
    if lora:
        model = get_peft_model(model, lora_config(r=2))
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_step_has_the_gradient_of_our_trainer_path(folder, tmp_path, lora):
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    # Full fine-tuning from the folder (TRL loads the model), LoRA on a model instance.
    model = _load(folder) if lora else str(folder)
    trainer, grads, state = _train(SFTTrainer, model, trl.SFTConfig(**args), SFT_DATA, folder, lora)
    config = trainer.model.config
    assert (config.output_router_logits, config.router_aux_loss_coef) == (False, ROUTER_COEFS["router_aux_loss_coef"])
    logged = trainer.state.log_history[0]
    assert logged["aux_loss"] > 0 and logged["z_loss"] > 0

    # The package's path: transformers.Trainer on our model (whose loss adds the router losses weighted by each
    # micro-batch's share of num_items_in_batch), on TRL's prepared examples and collator.
    reference = Gradients()
    ours = _model_like(folder, state, lora)
    Trainer(
        model=ours, args=TrainingArguments(**args), train_dataset=trainer.train_dataset,
        data_collator=trainer.data_collator, callbacks=[reference],
    ).train()  # fmt: skip
    _assert_same_gradients(grads, reference.grads)
    trained, expected_ema = ema_state(trainer.model), ema_state(ours)
    assert all(torch.equal(trained[layer], expected_ema[layer]) for layer in expected_ema)

    # Plain TRL adds transformers' Mixtral loss of the router logits instead, and writes output_router_logits.
    plain, plain_grads, _ = _train(trl.SFTTrainer, _load(folder), trl.SFTConfig(**args), SFT_DATA, folder, lora)
    assert _max_abs_difference(plain_grads, reference.grads) > 1e-3
    assert plain.model.config.output_router_logits is True
    if not lora:  # what save_pretrained writes
        trainer.save_model(tmp_path / "saved")
        saved = json.loads((tmp_path / "saved" / "config.json").read_text())
        assert saved["output_router_logits"] is False
        assert saved["router_aux_loss_coef"] == ROUTER_COEFS["router_aux_loss_coef"]


def _dpo_reference_gradients(folder, state, batch, lora, beta):
    """The gradient of sigmoid DPO on our model's own forward plus its router losses (weight 1, like the DPO loss),
    with the reference as TRL runs it: the reference model in eval mode, or (LoRA) the adapter disabled in training
    mode, without gradients. Returns (gradients, model after the step's forward and backward)."""
    model = _model_like(folder, state, lora).train()
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]

    def sequence_logps(logits):
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logps * completion[:, 1:]).sum(1)

    outputs = model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        if lora:
            with model.disable_adapter():
                reference = sequence_logps(model(input_ids=ids, attention_mask=mask).logits)
        else:
            reference = sequence_logps(_load(folder).eval()(input_ids=ids, attention_mask=mask).logits)
    chosen, rejected = (sequence_logps(outputs.logits) - reference).chunk(2)  # the batch is [chosen; rejected]
    config = model.config
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    loss = loss + config.router_aux_loss_coef * outputs.aux_loss + config.router_z_loss_coef * outputs.z_loss
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_step_has_the_gradient_of_our_objective(folder, tmp_path, lora):
    # Full fine-tuning from the folder: TRL loads the policy and the reference model itself.
    args = trl.DPOConfig(**_args(tmp_path, per_device_train_batch_size=4), trust_remote_code=True)
    trainer, grads, state = _train(DPOTrainer, _load(folder) if lora else str(folder), args, DPO_DATA, folder, lora)
    assert (trainer.ref_model is None) == lora  # LoRA: the reference is the model with its adapter disabled
    batch = next(iter(trainer.get_train_dataloader()))  # the step's batch (sequential sampling)
    expected, reference = _dpo_reference_gradients(folder, state, batch, lora, args.beta)
    _assert_same_gradients(grads, expected)
    # The trained defaults are the policy forward's update: DPO's reference pass adds none.
    trained, once = ema_state(trainer.model), ema_state(reference)
    assert all(torch.equal(trained[layer], once[layer]) for layer in once)

    _, plain_grads, _ = _train(trl.DPOTrainer, _load(folder) if lora else str(folder), args, DPO_DATA, folder, lora)
    assert _max_abs_difference(plain_grads, expected) > 1e-3


def test_dpo_lora_reference_pass_leaves_the_base_model_as_it_was(folder, tmp_path):
    """Plain TRL too: DPO's reference pass runs the model in training mode with the adapter disabled and no
    gradients; the frozen base defaults never move, so disabling the adapter gives the base model back exactly."""
    base = _load(folder).eval()
    with torch.no_grad():
        base_logits = base(INPUT_IDS).logits
    args = trl.DPOConfig(**_args(tmp_path, max_steps=3, per_device_train_batch_size=2))
    trainer, _, _ = _train(trl.DPOTrainer, _load(folder), args, DPO_DATA, folder, lora=True)
    model = trainer.model.eval()
    layers = model.get_base_model().model.layers
    for layer, ema in ema_state(base).items():
        defaults = layers[int(layer)].mlp.default_outputs
        assert torch.equal(defaults.original_module.ema, ema)
        assert not torch.equal(defaults.modules_to_save["default"].ema, ema)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, base_logits, rtol=0, atol=0)


def test_other_models_are_refused(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match="SFTTrainer expects a Default MoE model, got LlamaForCausalLM"):
        SFTTrainer(model=model, args=trl.SFTConfig(**_args(tmp_path)), train_dataset=Dataset.from_list(SFT_DATA))
