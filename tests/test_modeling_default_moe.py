"""DefaultMoeForCausalLM: training state under activation checkpointing and accumulation, losses, the Transformers
integration (save / remote-code load / dtype / generate / attention), and the gradient-fidelity property."""

import argparse
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from default_moe import DefaultMoeForCausalLM
from default_moe.modeling_default_moe import DefaultMoeSparseMoeBlock
from tiny_models import QWEN_STYLE, enable_activation_checkpointing, random_ids, tiny_model


def moe_blocks(model):
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, DefaultMoeSparseMoeBlock)]


def emas(model):
    return [block.default_outputs.ema.clone() for block in moe_blocks(model)]


def train_steps(model, steps=3, lr=0.1, seq=12):
    """Plain SGD steps; returns per step the loss, the EMA after the forward and every parameter gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    history = []
    for step in range(steps):
        ids = random_ids(batch=2, seq=seq, vocab=model.config.vocab_size, seed=step)
        torch.manual_seed(100 + step)  # jitter noise; checkpointing replays the same RNG state
        loss = model(ids, labels=ids).loss
        ema_after_forward = emas(model)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        history.append((loss.detach(), ema_after_forward, grads))
        optimizer.step()
        optimizer.zero_grad()
    return history


CHECKPOINT_CONFIGS = [
    dict(),
    dict(default_ema_update="after_use", default_ema_weighting="router_prob"),
    dict(
        router_jitter_noise=0.1,
        router_aux_loss_coef=1.0,
        router_z_loss_coef=0.1,
        num_dense_layers=1,
        num_hidden_layers=3,
        norm_placement="post",
        qk_norm=True,
    ),
    dict(routing="topk", router_aux_loss_coef=1.0),
    QWEN_STYLE,
]


@pytest.mark.parametrize(
    "overrides",
    CHECKPOINT_CONFIGS,
    ids=["paper", "causal-router_prob", "jitter-aux-z-dense-postnorm", "topk", "qwen-style"],
)
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_gives_identical_ema_and_gradients(overrides, use_reentrant):
    reference = train_steps(tiny_model(**overrides))
    model = tiny_model(**overrides)
    enable_activation_checkpointing(model, use_reentrant)
    checkpointed = train_steps(model)
    for (loss, ema, grads), (ref_loss, ref_ema, ref_grads) in zip(checkpointed, reference):
        torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
        for a, b in zip(ema, ref_ema):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-7, rtol=1e-6, msg=name)
    # The router (incl. the load-balancing / z-loss part) really got its gradient under checkpointing.
    assert all(checkpointed[0][2][f"model.layers.{i}.mlp.gate.weight"].norm() > 0 for i in model.config.moe_layers)


def test_gradient_accumulation_advances_the_ema_once_per_micro_batch():
    """Two micro-batches of one optimizer step update the EMA twice, exactly as two separate forwards would
    (documented in the README: beta applies per forward, not per optimizer step)."""
    ids = random_ids(batch=4, seq=10)
    model = tiny_model()
    for half in ids.chunk(2):
        model(half, labels=half).loss.backward()
    sequential = tiny_model().requires_grad_(False)  # frozen: each training forward commits its update at once
    for half in ids.chunk(2):
        sequential(half)
    for a, b in zip(emas(model), emas(sequential)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    single = tiny_model().requires_grad_(False)
    single(ids)
    assert not torch.allclose(emas(model)[0], emas(single)[0])


def switch_loss(router_logits, num_experts, top_k):
    probs = router_logits.float().softmax(-1)
    selected = torch.topk(probs, top_k).indices
    fraction = F.one_hot(selected, num_experts).float().sum((0, 1)) / selected.numel()
    return num_experts * (fraction * probs.mean(0)).sum()


@pytest.mark.parametrize("num_dense_layers", [0, 1])
def test_training_loss_includes_router_losses_without_output_router_logits(num_dense_layers):
    model = tiny_model(
        num_hidden_layers=3,
        num_dense_layers=num_dense_layers,
        router_aux_loss_coef=0.3,
        router_z_loss_coef=0.05,
        default_ema_update="after_use",
    )
    ids = random_ids()
    model.eval()
    eval_out = model(ids, labels=ids, output_router_logits=True)
    assert len(eval_out.router_logits) == 3 - num_dense_layers  # one (tokens, experts) tensor per MoE layer
    expected_aux = torch.stack([switch_loss(lg, 4, 2) for lg in eval_out.router_logits]).mean()
    expected_z = torch.stack([torch.logsumexp(lg.float(), -1).pow(2).mean() for lg in eval_out.router_logits]).mean()
    torch.testing.assert_close(eval_out.aux_loss, expected_aux)
    torch.testing.assert_close(eval_out.z_loss, expected_z)
    torch.testing.assert_close(eval_out.loss, eval_out.lm_loss)  # eval: the loss is the LM loss only

    model.train()  # after_use + zero defaults: the training forward computes the same function
    train_out = model(ids, labels=ids)
    assert train_out.router_logits is None
    torch.testing.assert_close(train_out.lm_loss, eval_out.lm_loss)
    torch.testing.assert_close(train_out.loss, eval_out.lm_loss + 0.3 * expected_aux + 0.05 * expected_z)


def test_no_grad_inference_skips_router_losses_unless_router_outputs_are_asked_for():
    """Generation and evaluation do not pay for the router losses; the logits do not change."""
    model = tiny_model().eval()
    ids = random_ids()
    with torch.no_grad():
        plain = model(ids, labels=ids)
        with_router = model(ids, labels=ids, output_router_logits=True)
    assert plain.aux_loss is None and plain.z_loss is None
    assert with_router.aux_loss is not None and len(with_router.router_logits) == 2
    torch.testing.assert_close(plain.logits, with_router.logits, atol=0, rtol=0)
    torch.testing.assert_close(plain.loss, model(ids, labels=ids).loss)  # with grad: same eval loss, aux returned


def test_router_losses_scale_with_num_items_in_batch():
    """Under Trainer's `num_items_in_batch`, this micro-batch's router losses get the weight
    (its label tokens) / num_items_in_batch, like the LM loss (transformers issue #48690)."""
    model = tiny_model(router_aux_loss_coef=0.5, default_ema_update="after_use").train()
    ids = random_ids()
    labels = ids.clone()
    labels[0, :5] = -100
    plain = model(ids, labels=labels)
    model.model.layers[0].mlp.default_outputs.ema.zero_()
    model.model.layers[1].mlp.default_outputs.ema.zero_()
    scaled = model(ids, labels=labels, num_items_in_batch=torch.tensor(3 * 17))
    share = (labels[:, 1:] != -100).sum() / (3 * 17)
    lm_sum = plain.lm_loss * (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(scaled.loss, lm_sum / (3 * 17) + 0.5 * plain.aux_loss * share)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(qk_norm=True, clip_qkv=0.5, attention_bias=True), dict(sliding_window=4), QWEN_STYLE],
    ids=["plain", "olmoe", "sliding", "qwen-style"],
)
def test_sdpa_is_the_default_and_matches_eager(overrides):
    sdpa = tiny_model(**overrides).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = tiny_model(**overrides).eval()
    eager.set_attn_implementation("eager")
    ids = random_ids(seq=16)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    real = mask.bool()  # padded positions attend to nothing; their outputs are undefined in both
    torch.testing.assert_close(
        sdpa(ids, attention_mask=mask).logits[real], eager(ids, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("layer_types", "expected"),
    [
        (["full_attention"] * 4, {"create_causal_mask": 1}),
        (["sliding_attention"] * 4, {"create_sliding_window_causal_mask": 1}),
        (
            ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],  # OLMo-3's pattern
            {"create_causal_mask": 1, "create_sliding_window_causal_mask": 1},
        ),
    ],
    ids=["full", "sliding", "mixed"],
)
def test_one_mask_per_attention_kind_per_forward(monkeypatch, layer_types, expected):
    """Every layer of a kind shares its mask: built once per forward, not once per layer."""
    import default_moe.modeling_default_moe as modeling

    calls = {}

    def counting(name, real):
        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return counted

    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        monkeypatch.setattr(modeling, name, counting(name, getattr(modeling, name)))
    model = tiny_model(num_hidden_layers=4, sliding_window=4, layer_types=layer_types).eval()
    with torch.no_grad():
        model(random_ids(seq=10))
    assert calls == expected


def trained_tiny_model(**overrides):
    model = tiny_model(**(dict(num_hidden_layers=3, num_dense_layers=1) | overrides))
    train_steps(model, steps=2)
    model.eval()
    return model


LOAD_SNIPPET = textwrap.dedent(
    """
    import json, sys
    sys.modules["default_moe"] = None  # make sure the package cannot be imported: only the copied code runs
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    for loaded in (model, backbone):
        assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
    with torch.no_grad():
        logits, hidden = model(ids).logits, backbone(ids).last_hidden_state
    emas = [layer.mlp.default_outputs.ema for layer in model.model.layers if hasattr(layer.mlp, "default_outputs")]
    torch.save({"logits": logits, "hidden": hidden, "emas": emas}, folder + "/reloaded.pt")
    """
)


@pytest.mark.parametrize(
    "overrides",
    [dict(norm_placement="pre"), dict(norm_placement="post"), QWEN_STYLE],
    ids=["pre", "post", "qwen-style"],
)
def test_saved_folder_loads_with_remote_code_in_a_fresh_process(tmp_path, overrides):
    model = trained_tiny_model(**overrides)
    assert all(ema.abs().sum() > 0 for ema in emas(model))
    model.save_pretrained(tmp_path)
    assert {"configuration_default_moe.py", "modeling_default_moe.py", "config.json"} <= set(os.listdir(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_default_moe.DefaultMoeConfig",
        "AutoModel": "modeling_default_moe.DefaultMoeModel",
        "AutoModelForCausalLM": "modeling_default_moe.DefaultMoeForCausalLM",
    }
    ids = random_ids(seq=9)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, "-c", LOAD_SNIPPET, str(tmp_path), json.dumps(ids.tolist())], check=True, env=env, cwd=tmp_path
    )
    reloaded = torch.load(tmp_path / "reloaded.pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded["logits"], model(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(reloaded["hidden"], model.model(ids).last_hidden_state, atol=0, rtol=0)
    for a, b in zip(reloaded["emas"], emas(model)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("module_name", "allowed"),
    [
        (
            "modeling_default_moe",
            {
                "collections",
                "copy",
                "dataclasses",
                "inspect",
                "warnings",
                "torch",
                "transformers",
                ".configuration_default_moe",
            },
        ),
        ("configuration_default_moe", {"transformers"}),
    ],
)
def test_hub_code_files_import_only_torch_transformers_and_each_other(module_name, allowed):
    """These two files are copied next to every checkpoint: they must not import our package."""
    module = __import__(f"default_moe.{module_name}", fromlist=["_"])
    source = open(module.__file__).read()
    imported = {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert {name if name.startswith(".") else name.split(".")[0] for name in imported} <= allowed


def test_missing_ema_buffers_load_as_zeros_with_a_warning(tmp_path, caplog):
    model = trained_tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "default_outputs" not in k},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            loaded = DefaultMoeForCausalLM.from_pretrained(tmp_path)
    finally:
        hf_logging.disable_propagation()
    assert all(torch.equal(ema, torch.zeros_like(ema)) for ema in emas(loaded))
    assert "default_outputs.ema" in caplog.text and "MISSING" in caplog.text
    torch.testing.assert_close(loaded.model.layers[1].mlp.gate.weight, model.model.layers[1].mlp.gate.weight)


def test_bfloat16_loading_keeps_the_ema_in_float32(tmp_path):
    model = trained_tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.layers[1].mlp.gate.weight.dtype == torch.bfloat16
    for a, b in zip(emas(loaded), emas(model)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    loaded.train()
    ids = random_ids()
    loaded(ids, labels=ids).loss.backward()  # a bf16 training step updates the float32 EMA
    assert all(ema.dtype == torch.float32 for ema in emas(loaded))
    assert not torch.equal(emas(loaded)[0], emas(model)[0])


def dense_straight_through_forward(block, hidden_states, token_mask=None, return_router_losses=False):
    """The 'true' dense gradient of DESIGN §2: every expert computed, unselected ones weighted by their p_i."""
    x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
    _, probs_TE, top_k_weights_TK, top_k_index_TK = block.gate(x_TH)
    all_experts_TE = torch.arange(block.num_experts).expand(x_TH.shape[0], -1)
    outputs_TEH = block._pair_outputs(x_TH, all_experts_TE)
    weights_TE = probs_TE.scatter(1, top_k_index_TK, top_k_weights_TK)
    y = torch.einsum("teh,te->th", outputs_TEH, weights_TE).view_as(hidden_states)
    return (y, torch.zeros(2)) if return_router_losses else y


def router_gradients(model, ids):
    """Router-weight gradients of the LM loss for one training-mode forward, leaving the EMA as it was."""
    saved = emas(model)
    model.zero_grad()
    model(ids, labels=ids).lm_loss.backward()
    for block, ema in zip(moe_blocks(model), saved):
        block.default_outputs.ema.copy_(ema)
    return [block.gate.weight.grad.flatten().clone() for block in moe_blocks(model)]


def text_batch(step, batch=8, seq=32):
    """Windows of real text (the standard library's argparse source, one token per byte mod the vocabulary)."""
    data = torch.tensor(list(open(argparse.__file__, "rb").read()[:60000])) % 97
    starts = torch.randint(0, len(data) - seq, (batch,), generator=torch.Generator().manual_seed(step))
    return torch.stack([data[start : start + seq] for start in starts])


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gradient_is_closer_to_dense_straight_through_than_top_k(top_k, monkeypatch):
    """The property that motivates the method (paper Fig. 4): after some training on real text (so experts have
    structure and the defaults are warm), Default MoE's router gradient has a higher cosine similarity with the
    dense straight-through gradient (all experts computed) than top-K's, at the same weights (mean over layers)."""
    model = tiny_model(num_experts=8, num_experts_per_tok=top_k, router_aux_loss_coef=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(40):
        ids = text_batch(step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ids = text_batch(999)
    torch.manual_seed(0)
    default_grads = router_gradients(model, ids)
    model.config.routing = "topk"
    topk_grads = router_gradients(model, ids)
    model.config.routing = "default"
    monkeypatch.setattr(DefaultMoeSparseMoeBlock, "forward", dense_straight_through_forward)
    dense_grads = router_gradients(model, ids)
    cos_default = torch.stack([F.cosine_similarity(g, d, dim=0) for g, d in zip(default_grads, dense_grads)])
    cos_topk = torch.stack([F.cosine_similarity(g, d, dim=0) for g, d in zip(topk_grads, dense_grads)])
    assert cos_default.mean() > cos_topk.mean() + 0.05, (cos_default, cos_topk)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_experts_implementation_is_chosen_as_for_transformers_models(tmp_path, implementation):
    """`from_pretrained(experts_implementation=...)` and `set_experts_implementation(...)` pick the experts kernel;
    every choice computes the same model, in training (EMA included) and in eval."""
    model = trained_tiny_model()
    model.save_pretrained(tmp_path)
    loaded = DefaultMoeForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation)
    assert loaded.config._experts_implementation == implementation
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    loaded.set_experts_implementation("grouped_mm" if implementation != "grouped_mm" else "batched_mm")
    assert loaded.config._experts_implementation != implementation
    reference = DefaultMoeForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation).train()
    for candidate in (loaded.train(), reference):
        candidate(ids, labels=ids).loss.backward()
    for a, b in zip(emas(loaded), emas(reference)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for (name, p), q in zip(loaded.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
