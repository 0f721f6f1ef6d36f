"""LoRA through `default_moe.peft.lora_config`: Trainer fine-tuning reaches router, experts and attention, the EMA
defaults travel with the adapter, reload in a fresh process is exact, and `merge_and_unload()` keeps the logits."""

import json
import textwrap
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import ParamWrapper
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from default_moe import DefaultMoeForCausalLM
from default_moe.peft import lora_config
from tiny_checkpoint import INPUT_IDS, ema_state, hub_env, run_clean, tiny_model
from tiny_models import enable_activation_checkpointing


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "base"
    tiny_model(seed=2, warm_ema=True, num_hidden_layers=3).save_pretrained(folder)
    return folder


def _random_tokens(n=16, seq_len=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32, (n, seq_len), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def _lora_b_norm(module, adapter="default"):
    return module.lora_B[adapter].weight.detach().norm().item()


def test_lora_trainer_reload_and_merge(base_folder, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    base_ema = ema_state(base)
    assert all(e.abs().sum() > 0 for e in base_ema.values())
    with torch.no_grad():
        base_logits = base.eval()(INPUT_IDS).logits
    model = get_peft_model(base, lora_config(r=4, alpha=8, model=base))

    layers = model.get_base_model().model.layers
    moe = layers[1].mlp
    assert isinstance(moe.gate, ParamWrapper) and moe.gate.parameter_name == "weight"
    assert isinstance(moe.experts, ParamWrapper) and isinstance(moe.experts.base_layer, ParamWrapper)
    assert {moe.experts.parameter_name, moe.experts.base_layer.parameter_name} == {"gate_up_proj", "down_proj"}
    assert isinstance(moe.default_outputs, ModulesToSaveWrapper)
    assert isinstance(layers[0].mlp.gate_proj, LoraLinear)  # dense first layer
    assert all(isinstance(getattr(layers[i].self_attn, m), LoraLinear) for i in range(3) for m in ("q_proj", "o_proj"))

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_random_tokens())
    trainer.train()
    assert len([log for log in trainer.state.log_history if "loss" in log]) == 4

    # Gradients reached the LoRA factors of router, experts (both parameters) and attention.
    for module in (moe.gate, moe.experts, moe.experts.base_layer, layers[1].self_attn.q_proj, layers[0].mlp.up_proj):
        assert _lora_b_norm(module) > 0, module
    # The forward updated the *active* copy of the EMA defaults; the frozen original is untouched.
    trained_ema = ema_state(model)
    for layer, ema in trained_ema.items():
        wrapper = layers[int(layer)].mlp.default_outputs
        assert torch.equal(ema, wrapper.modules_to_save["default"].ema)
        assert not torch.equal(ema, base_ema[layer]), f"EMA of layer {layer} did not change during LoRA training"
        assert torch.equal(wrapper.original_module.ema, base_ema[layer])

    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    saved = load_file(adapter / "adapter_model.safetensors")
    for layer, ema in trained_ema.items():
        assert torch.equal(saved[f"base_model.model.model.layers.{layer}.mlp.default_outputs.ema"], ema)
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["default_outputs"]

    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=INPUT_IDS).logits
    assert not torch.allclose(trained_logits, base_logits)
    with model.disable_adapter(), torch.no_grad():  # the frozen originals give the base model back exactly
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, base_logits, rtol=0, atol=0)

    # Fresh process where default_moe is not importable (the model code comes from the checkpoint, as for a Hub
    # user): base + adapter, then merge_and_unload, then save and reload the merged model.
    script = textwrap.dedent(f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({INPUT_IDS.tolist()})
        def ema(model):
            return {{str(i): l.mlp.default_outputs.ema.clone() for i, l in enumerate(model.model.layers) if l.is_moe}}
        out = {{}}
        base = AutoModelForCausalLM.from_pretrained({str(base_folder)!r}, trust_remote_code=True)
        assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
        model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
        with torch.no_grad():
            out["reloaded"] = {{"logits": model(input_ids=ids).logits, "ema": ema(model.get_base_model())}}
        merged = model.merge_and_unload().eval()
        assert type(merged).__name__ == "DefaultMoeForCausalLM"
        assert not any("lora" in name or "modules_to_save" in name for name, _ in merged.named_modules())
        with torch.no_grad():
            out["merged"] = {{"logits": merged(ids).logits, "ema": ema(merged)}}
        merged.save_pretrained("merged")
        again = AutoModelForCausalLM.from_pretrained("merged", trust_remote_code=True).eval()
        with torch.no_grad():
            out["merged_reloaded"] = {{"logits": again(ids).logits, "ema": ema(again)}}
        torch.save(out, "reloaded.pt")
    """)
    run_clean(script, tmp_path, {**hub_env(None, tmp_path / "home"), "HF_HUB_OFFLINE": "1"})
    out = torch.load(tmp_path / "reloaded.pt")
    torch.testing.assert_close(out["reloaded"]["logits"], trained_logits, rtol=0, atol=0)
    for key in ("merged", "merged_reloaded"):
        torch.testing.assert_close(out[key]["logits"], trained_logits, rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(out["merged_reloaded"]["logits"], out["merged"]["logits"], rtol=0, atol=0)
    for key in ("reloaded", "merged", "merged_reloaded"):
        assert out[key]["ema"].keys() == trained_ema.keys()
        for layer, ema in trained_ema.items():
            assert torch.equal(out[key]["ema"][layer], ema), (key, layer)


def _defaults_warnings(record) -> list:
    return [w for w in record if "default_moe.peft.lora_config" in str(w.message)]


def test_without_keep_defaults_the_ema_updates_are_lost(base_folder, tmp_path):
    """Why `modules_to_save=["default_outputs"]` is there: without it the adapter does not carry the EMA (and both
    building the adapter and reloading it say so)."""
    with pytest.warns(UserWarning, match="keeps no copy of the Default MoE EMA defaults"):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder), lora_config(r=2, keep_defaults=False))
    model.train()
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    trained_ema = ema_state(model)
    model.save_pretrained(tmp_path / "adapter")
    assert not any("default_outputs" in key for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match="a reloaded adapter runs with other defaults"):
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), tmp_path / "adapter")
    base_ema = ema_state(AutoModelForCausalLM.from_pretrained(base_folder))
    for layer, ema in ema_state(reloaded).items():
        assert torch.equal(ema, base_ema[layer]) and not torch.equal(ema, trained_ema[layer])


ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
DENSE = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
SHARED = {
    "mlp.shared_expert.gate_proj",
    "mlp.shared_expert.up_proj",
    "mlp.shared_expert.down_proj",
    "mlp.shared_expert_gate",
}
ROUTER, EXPERTS = {"mlp.gate.weight"}, {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


@pytest.mark.parametrize(
    "make_config, routing, warnings_expected",
    [
        (lambda: LoraConfig(target_modules="all-linear"), "default", 1),  # the common config: neither EMA nor router
        (lambda: lora_config(r=2), "default", 0),
        (lambda: LoraConfig(target_modules="all-linear"), "topk", 0),  # no defaults to keep
    ],
    ids=["all-linear", "lora_config", "topk"],
)
def test_peft_without_the_defaults_warns_once(make_config, routing, warnings_expected):
    model = DefaultMoeForCausalLM(tiny_model(warm_ema=False, num_hidden_layers=3, routing=routing).config)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        get_peft_model(model, make_config())
    found = _defaults_warnings(record)
    assert len(found) == warnings_expected, [str(w.message) for w in record]
    if found:
        assert "'all-linear' cannot reach" in str(found[0].message)


@pytest.mark.parametrize(
    "flags, modules, parameters",
    [
        ({}, ATTENTION | DENSE | SHARED, ROUTER | EXPERTS),
        ({"router": False}, None, EXPERTS),
        ({"experts": False, "dense_mlp": False, "shared_expert": False}, ATTENTION, ROUTER),
        ({"attention": False, "dense_mlp": False}, SHARED, ROUTER | EXPERTS),
        ({"router": False, "experts": False, "dropout": 0.1}, ATTENTION | DENSE | SHARED, None),
    ],
)  # fmt: skip
def test_lora_config_targets(flags, modules, parameters):
    config = lora_config(**flags)
    if modules is not None:
        assert set(config.target_modules) == modules
    if parameters is None:
        assert not config.target_parameters
    else:
        assert set(config.target_parameters) == parameters
    assert config.modules_to_save == ["default_outputs"] and config.task_type == "CAUSAL_LM"


def test_lora_config_layers_and_model():
    model = DefaultMoeForCausalLM(tiny_model(warm_ema=False, num_hidden_layers=3).config)
    peft_model = get_peft_model(model, lora_config(layers=[0, 2], model=model))
    adapted = {name for name, module in peft_model.named_modules() if isinstance(module, (LoraLinear, ParamWrapper))}
    assert {n.split("model.layers.")[1].split(".")[0] for n in adapted} == {"0", "2"}
    assert any(n.endswith("layers.2.mlp.gate") for n in adapted) and any(
        n.endswith("layers.0.mlp.up_proj") for n in adapted
    )
    layers = peft_model.get_base_model().model.layers
    assert all(isinstance(layers[i].mlp.default_outputs, ModulesToSaveWrapper) for i in (1, 2))  # all MoE layers

    dense = DefaultMoeForCausalLM(tiny_model(warm_ema=False, num_dense_layers=2).config)
    config = lora_config(model=dense)
    assert not config.target_parameters and "mlp.gate_proj" in config.target_modules
    assert not set(config.target_modules) & SHARED  # the model has no shared expert


@pytest.mark.parametrize("layers", [None, [1, 2]], ids=["all-layers", "layers-1-2"])
def test_lora_on_a_shared_expert_and_dense_layers_anywhere(layers):
    """Qwen2-MoE-shaped: MoE, dense, MoE layers with a shared expert. The shared expert and its gate get their own
    LoRA (off with shared_expert=False), the dense layer's MLP its own, and both train."""
    base = tiny_model(warm_ema=False, num_hidden_layers=3, dense_layers=[1], shared_expert_intermediate_size=16)
    model = get_peft_model(base, lora_config(r=2, layers=layers, model=base))
    adapted = {
        name.removeprefix("base_model.model.model.")
        for name, module in model.named_modules()
        if isinstance(module, (LoraLinear, ParamWrapper)) and "mlp" in name
    }
    moe = [0, 2] if layers is None else [2]
    shared = {f"layers.{i}.mlp.shared_expert.{m}" for i in moe for m in ("gate_proj", "up_proj", "down_proj")}
    expected = shared | {f"layers.{i}.mlp.shared_expert_gate" for i in moe} | {f"layers.{i}.mlp.gate" for i in moe}
    expected |= {f"layers.{i}.mlp.experts" for i in moe} | {f"layers.{i}.mlp.experts.base_layer" for i in moe}
    expected |= {f"layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
    assert adapted == expected
    model.train()
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    for name, parameter in model.named_parameters():
        if "lora_B" in name and ("shared_expert" in name or "layers.1.mlp" in name):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    without = lora_config(shared_expert=False, model=model.get_base_model())
    assert not set(without.target_modules) & SHARED


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dropout": 0.1}, "dropout=0.1 is not supported on the router/experts"),
        (
            {"attention": False, "router": False, "experts": False, "dense_mlp": False, "shared_expert": False},
            "nothing to adapt",
        ),
        ({"r": 0}, "r=0 must be a positive integer"),
        ({"layers": [5], "model": "tiny"}, "layers=[5] out of range"),
        ({"model": torch.nn.Linear(2, 2)}, "expects a Default MoE model"),
    ],
)
def test_lora_config_errors(kwargs, message):
    if kwargs.get("model") == "tiny":
        kwargs["model"] = DefaultMoeForCausalLM(tiny_model(warm_ema=False).config)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lora_config(**kwargs)


def _one_step(checkpointing: str | None):
    model = tiny_model(seed=3, num_hidden_layers=3)
    peft_model = get_peft_model(model, lora_config(r=2, model=model, init_lora_weights="gaussian"))
    if checkpointing:
        enable_activation_checkpointing(peft_model, use_reentrant=checkpointing == "reentrant")
        peft_model.enable_input_require_grads()
    peft_model.train()
    peft_model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    return grads, ema_state(peft_model)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_lora_with_activation_checkpointing_matches(checkpointing):
    """LoRA + activation checkpointing: same LoRA gradients (router and experts included) and the same EMA update."""
    grads, ema = _one_step(None)
    grads_ckpt, ema_ckpt = _one_step(checkpointing)
    assert grads.keys() == grads_ckpt.keys() and any(".mlp.gate.lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert grad is not None and grads_ckpt[name] is not None, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    for layer in ema:
        assert torch.equal(ema_ckpt[layer], ema[layer])


def test_lora_training_moves_only_the_adapter_copy_of_the_ema(base_folder):
    """Training moves the active adapter's copy of the defaults; PEFT's frozen original never changes, so
    `disable_adapter()` gives the base model back exactly, also after training-mode forwards without gradients
    (DPO's reference pass, KL references) with the adapter enabled or disabled."""
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    base_ema = ema_state(base)
    with torch.no_grad():
        base_logits = base.eval()(INPUT_IDS).logits
    model = get_peft_model(base, lora_config(r=2, model=base)).train()
    for _ in range(2):
        model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    trained_ema = ema_state(model)
    with torch.no_grad():
        model(input_ids=INPUT_IDS)
        with model.disable_adapter():
            model(input_ids=INPUT_IDS)
    assert all(not torch.equal(trained_ema[layer], base_ema[layer]) for layer in base_ema)
    for layer, ema in ema_state(model).items():
        assert torch.equal(ema, trained_ema[layer])
    blocks = [layer.mlp for layer in model.get_base_model().model.layers if layer.is_moe]
    for block, ema in zip(blocks, base_ema.values()):
        assert isinstance(block.default_outputs, ModulesToSaveWrapper)
        assert torch.equal(block.default_outputs.original_module.ema, ema)
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, base_logits, rtol=0, atol=0)
