"""MoE checkpoints (Mixtral, OLMoE, FlexOlmo, Qwen3-MoE, Qwen2-MoE) -> Default MoE -> back, against transformers'
own models."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conversion.sources import MOE_SOURCES, folder_digest, random_inputs
from default_moe import DefaultMoeConfig, DefaultMoeForCausalLM
from default_moe.conversion import convert, export
from default_moe.conversion.api import MOE_MODELS
from default_moe.conversion.io import CheckpointReader, ConversionError, patch_tensor


def load_all(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder via the safetensors library (independent of our reader)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """name -> (source, converted folder, SRC digest before conversion)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name in MOE_SOURCES:
        source = sources[name]
        before = folder_digest(source.folder)
        dst = convert(source.folder, root / name, max_shard_size="16KB", progress=False)
        out[name] = (source, dst, before)
    return out


@pytest.mark.parametrize("name", list(MOE_SOURCES))
def test_logits_and_generation_match_transformers(converted, name):
    source, dst, _ = converted[name]
    reference = source.load_reference()
    ours = DefaultMoeForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert ours.config.routing == "default"  # defaults are zero, so the Default MoE output is the source's
    for seed in range(2):
        input_ids = random_inputs(seed)
        with torch.no_grad():
            expected, actual = reference(input_ids).logits, ours(input_ids).logits
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    prompt = random_inputs(5, batch=1, length=5)
    expected = reference.generate(prompt, max_new_tokens=10, do_sample=False)
    actual = ours.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", list(MOE_SOURCES))
def test_output_folder(converted, name):
    source, dst, before = converted[name]
    assert folder_digest(source.folder) == before, "SRC was modified"
    files = {p.name for p in dst.iterdir()}
    assert {"config.json", "configuration_default_moe.py", "modeling_default_moe.py", "README.md"} <= files
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    # The code files are the installed package's, and config.json carries what save_pretrained would write.
    import default_moe

    package = default_moe.__file__.rsplit("/", 1)[0]
    for code in ("configuration_default_moe.py", "modeling_default_moe.py"):
        assert (dst / code).read_text() == open(f"{package}/{code}").read()
    config = json.loads((dst / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_default_moe.DefaultMoeConfig",
        "AutoModel": "modeling_default_moe.DefaultMoeModel",
        "AutoModelForCausalLM": "modeling_default_moe.DefaultMoeForCausalLM",
    }
    assert config["architectures"] == ["DefaultMoeForCausalLM"]
    assert config["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[source.dtype]
    # Sharded with an index (16KB shards), in the canonical layout.
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = load_all(dst)
    assert set(index["weight_map"]) == set(tensors)
    cfg = DefaultMoeConfig.from_pretrained(dst)
    assert ("lm_head.weight" in tensors) == (not cfg.tie_word_embeddings)
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        experts, hidden, width = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        if layer in cfg.dense_layers:
            assert tensors[f"{prefix}.up_proj.weight"].shape == (cfg.dense_intermediate_size, hidden)
            assert not [k for k in tensors if k.startswith(f"{prefix}.experts") or k.startswith(f"{prefix}.gate.")]
            continue
        if cfg.shared_expert_intermediate_size is not None:
            assert tensors[f"{prefix}.shared_expert.up_proj.weight"].shape == (
                cfg.shared_expert_intermediate_size,
                hidden,
            )
            assert tensors[f"{prefix}.shared_expert_gate.weight"].shape == (1, hidden)
        assert tensors[f"{prefix}.experts.gate_up_proj"].shape == (experts, 2 * width, hidden)
        assert tensors[f"{prefix}.experts.down_proj"].shape == (experts, hidden, width)
        ema = tensors[f"{prefix}.default_outputs.ema"]
        assert ema.dtype == torch.float32 and ema.shape == (experts, hidden) and not ema.any()
    # Tokenizer and generation config carried over; the card names the source.
    assert (
        AutoTokenizer.from_pretrained(dst)("hi!")["input_ids"]
        == AutoTokenizer.from_pretrained(source.folder)("hi!")["input_ids"]
    )
    assert GenerationConfig.from_pretrained(dst).to_dict() == GenerationConfig.from_pretrained(source.folder).to_dict()
    assert source.name in (dst / "README.md").read_text()
    # Loadable through the Auto classes from the folder alone (remote code path).
    model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)
    assert type(model).__name__ == "DefaultMoeForCausalLM"


@pytest.mark.parametrize("name", list(MOE_SOURCES))
def test_config_mapping(converted, name):
    source, dst, _ = converted[name]
    src = AutoConfig.from_pretrained(source.folder)
    cfg = DefaultMoeConfig.from_pretrained(dst)
    reference = source.load_reference()
    top_k = src.num_experts_per_tok
    assert cfg.router_aux_loss_coef == pytest.approx(src.router_aux_loss_coef * top_k)
    assert cfg.num_experts == (src.num_local_experts if source.model_type == "mixtral" else src.num_experts)
    assert cfg.tie_word_embeddings == src.tie_word_embeddings
    assert cfg.head_dim == reference.model.layers[0].self_attn.head_dim
    assert cfg.norm_placement == ("post" if source.model_type == "flex_olmo" else "pre")
    # Dense layers where transformers' model has a dense MLP, of its width; the experts' width.
    assert cfg.dense_layers == [i for i, layer in enumerate(reference.model.layers) if not hasattr(layer.mlp, "gate")]
    moe = next(layer.mlp for layer in reference.model.layers if hasattr(layer.mlp, "gate"))
    assert cfg.intermediate_size == moe.experts.down_proj.shape[-1]
    if cfg.dense_layers:
        assert cfg.dense_intermediate_size == reference.model.layers[cfg.dense_layers[0]].mlp.up_proj.out_features
    # Attention kind per layer: transformers' own list where the config has one, else one window for all layers.
    window = getattr(src, "sliding_window", None) or None
    kinds = getattr(src, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * len(
        reference.model.layers
    )
    assert cfg.layer_types == kinds and (cfg.sliding_window == window or "sliding_attention" not in kinds)
    field = src.to_dict().get  # the source's value, None where its config has no such field
    expected = {
        "mixtral": dict(norm_topk_prob=True, qk_norm=False, router_jitter_noise=field("router_jitter_noise")),
        "olmoe": dict(qk_norm="projection", clip_qkv=field("clip_qkv"), attention_bias=field("attention_bias")),
        "flex_olmo": dict(qk_norm="projection", clip_qkv=None, attention_bias=field("attention_bias")),
        "qwen3_moe": dict(qk_norm="head", attention_bias=field("attention_bias"), shared_expert_intermediate_size=None),
        "qwen2_moe": dict(
            qk_norm=False,
            attention_bias=field("qkv_bias"),  # o_proj's bias is written as zeros
            shared_expert_intermediate_size=field("shared_expert_intermediate_size"),
        ),
    }[source.model_type]
    expected.setdefault("norm_topk_prob", field("norm_topk_prob"))
    assert {key: getattr(cfg, key) for key in expected} == expected


@pytest.mark.parametrize("name", list(MOE_SOURCES))
def test_a_training_step_matches_transformers(converted, name, tmp_path):
    """The router loss coefficient is mapped so that training starts as the source would: the same loss (LM +
    coefficient x load balancing) and the same gradient for every parameter, the router's included.

    On the models cut after their first MoE layer: with several MoE layers, transformers' loss pools the routing
    statistics of all layers before multiplying them, while ours is the mean of the per-layer losses (computed layer
    by layer, never concatenating the logits), so the two differ by more than the coefficient. ("after_use": the first
    training forward uses the zero defaults, i.e. is the top-K layer; router jitter off in both.)"""
    source, dst, _ = converted[name]
    cfg = DefaultMoeConfig.from_pretrained(dst)
    cut = dict(num_hidden_layers=cfg.moe_layers[0] + 1, dtype=torch.float32)
    reference = source.model_class.from_pretrained(source.folder, output_router_logits=True, **cut)
    ours = DefaultMoeForCausalLM.from_pretrained(dst, default_ema_update="after_use", router_jitter_noise=0.0, **cut)
    for module in reference.modules():
        if hasattr(module, "jitter_noise"):
            module.jitter_noise = 0.0
    input_ids = random_inputs(4)
    expected = reference.train()(input_ids, labels=input_ids).loss
    actual = ours.train()(input_ids, labels=input_ids)
    assert actual.aux_loss > 1.0  # a real load-balancing term (1.0 would be perfectly balanced)
    torch.testing.assert_close(actual.loss, expected, atol=1e-6, rtol=1e-6)
    expected.backward()
    actual.loss.backward()
    ours_grads = {name: p.grad for name, p in ours.named_parameters()}
    for param_name, param in reference.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name
        torch.testing.assert_close(ours_grads[param_name], param.grad, atol=1e-6, rtol=1e-5, msg=param_name)


@pytest.mark.parametrize("name", list(MOE_SOURCES))
def test_export_reproduces_source_bit_for_bit(converted, name, tmp_path):
    source, dst, _ = converted[name]
    before = folder_digest(dst)
    back = export(dst, tmp_path / "back", to=source.model_type, max_shard_size="8KB", progress=False)
    assert folder_digest(dst) == before
    expected, actual = load_all(source.expected_export), load_all(back)
    assert set(actual) == set(expected)
    for key in expected:
        assert bitwise_equal(actual[key], expected[key]), key
    # Stock transformers loads it and computes what the source computes.
    reference = source.load_reference()
    reloaded = source.model_class.from_pretrained(back, dtype=torch.float32).eval()
    input_ids = random_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, reference(input_ids).logits, atol=0, rtol=0)
    src_config = json.loads((source.folder / "config.json").read_text())
    back_config = json.loads((back / "config.json").read_text())
    assert back_config["model_type"] == source.model_type
    assert back_config["router_aux_loss_coef"] == pytest.approx(src_config["router_aux_loss_coef"])
    assert (back / "tokenizer.json").is_file() and (back / "generation_config.json").is_file()


def test_dtype_option_and_single_file(converted, tmp_path):
    source, _, _ = converted["mixtral-original-sharded-fp32"]
    dst = convert(
        source.folder, tmp_path / "bf16", dtype="bfloat16", base_model="mistralai/Mixtral-8x7B-v0.1", progress=False
    )
    assert "base_model: mistralai/Mixtral-8x7B-v0.1" in (dst / "README.md").read_text()
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert files == ["model.safetensors"] and not (dst / "model.safetensors.index.json").exists()
    reader = CheckpointReader(dst)
    for name in reader.names():
        expected = torch.float32 if name.endswith("default_outputs.ema") else torch.bfloat16
        assert reader[name].dtype == expected, name
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"


def test_routing_options_are_written(converted, tmp_path):
    source, _, _ = converted["olmoe-original-sharded-fp32-clip"]
    dst = convert(
        source.folder,
        tmp_path / "out",
        routing="topk",
        ema_beta=0.5,
        ema_weighting="router_prob",
        ema_update="after_use",
        router_aux_loss_coef=0.03,
        progress=False,
    )
    cfg = DefaultMoeConfig.from_pretrained(dst)
    assert (cfg.routing, cfg.default_ema_beta, cfg.default_ema_weighting, cfg.default_ema_update) == (
        "topk",
        0.5,
        "router_prob",
        "after_use",
    )
    assert cfg.router_aux_loss_coef == 0.03


@pytest.mark.parametrize(
    ("name", "to", "message"),
    [
        ("olmoe-original-sharded-fp32-clip", "mixtral", "cannot export to Mixtral: .*norm_topk_prob=False"),
        ("mixtral-original-sharded-fp32", "olmoe", "cannot export to OLMoE: OLMoE always has q/k norms"),
        ("flex_olmo-original-sharded-fp32", "olmoe", "cannot export to OLMoE: .*inputs .*norm_placement='post'"),
        ("flex_olmo-original-sharded-fp32", "mixtral", "cannot export to Mixtral: .*norm_placement='post'"),
        (
            "olmoe-original-sharded-fp32-clip",
            "flex_olmo",
            "cannot export to FlexOlmo: .*outputs .*norm_placement='pre'",
        ),
    ],
)
def test_export_refuses_what_the_target_cannot_express(converted, tmp_path, name, to, message):
    with pytest.raises(ValueError, match=message):
        export(converted[name][1], tmp_path / "out", to=to)
    assert not (tmp_path / "out").exists()


QWEN = dict(qk_norm="head", num_hidden_layers=2, hidden_size=32, num_attention_heads=4)


@pytest.mark.parametrize(
    ("to", "fields", "message"),
    [
        ("mixtral", dict(norm_topk_prob=True, shared_expert_intermediate_size=8), "Mixtral has no shared expert"),
        ("olmoe", dict(qk_norm="projection", shared_expert_intermediate_size=8), "OLMoE has no shared expert"),
        ("qwen3_moe", QWEN | dict(shared_expert_intermediate_size=8), "Qwen3-MoE has no shared expert"),
        ("qwen2_moe", dict(), "Qwen2-MoE always has a shared expert"),
        ("qwen2_moe", dict(qk_norm="head", shared_expert_intermediate_size=8), "Qwen2-MoE has no q/k norm"),
        ("olmoe", dict(qk_norm="head"), r"whole projections \(qk_norm='head' here\)"),
        ("qwen3_moe", QWEN | dict(qk_norm="projection"), r"per head \(qk_norm='projection' here\)"),
        ("qwen3_moe", QWEN | dict(clip_qkv=1.0), "Qwen3-MoE has no clip_qkv"),
        ("qwen3_moe", QWEN | dict(norm_placement="post"), "normalises attention and MLP inputs"),
        (
            "qwen3_moe",
            QWEN | dict(sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
            r"attends alike on every layer \(layer_types mixes \['full_attention', 'sliding_attention'\]",
        ),
        (
            "mixtral",
            dict(norm_topk_prob=True, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
            "Mixtral attends alike on every layer",
        ),
        ("olmoe", dict(qk_norm="projection", sliding_window=4), "OLMoE has no sliding window"),
        (
            "qwen3_moe",
            QWEN
            | dict(
                sliding_window=4,
                layer_types=["full_attention", "full_attention"],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}},
            ),
            "Qwen3-MoE has one RoPE for all layers",
        ),
    ],
)
def test_export_checks_every_field_the_target_lacks(to, fields, message):
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_experts=4)
    with pytest.raises(ConversionError, match=f"cannot export to .*{message}"):
        MOE_MODELS[to].export_config(DefaultMoeConfig(**(base | fields)))


def test_qwen2_moe_export_refuses_a_trained_o_proj_bias(converted, tmp_path):
    """Qwen2-MoE's o_proj has no bias: the zeros conversion wrote are dropped, a bias that training moved is not."""
    folder = tmp_path / "moe"
    shutil.copytree(converted["qwen2_moe-original-sharded-fp32-sliding-layer0"][1], folder)
    name = "model.layers.1.self_attn.o_proj.bias"
    patch_tensor(folder, name, torch.full((32,), 0.5))
    with pytest.raises(ConversionError, match=f"cannot export to Qwen2-MoE: {name} is non-zero"):
        export(folder, tmp_path / "out", to="qwen2_moe")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("default_term", ["gradient", "forward"])
def test_trained_gradient_only_model_exports_to_mixtral_exactly(tmp_path, caplog, default_term):
    """default_term="gradient" trains non-zero defaults yet computes the top-K output: stock Mixtral on the exported
    weights gives its logits exactly, and the export warns about dropped defaults only for the paper's form."""
    from tiny_models import random_ids, tiny_model

    model = tiny_model(num_dense_layers=0, norm_topk_prob=True, default_term=default_term)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        ids = random_ids(seed=step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(layer.mlp.default_outputs.ema.abs().sum() > 0 for layer in model.model.layers)
    model.save_pretrained(tmp_path / "trained")
    with caplog.at_level("WARNING", logger="default_moe.conversion.api"):
        export(tmp_path / "trained", tmp_path / "mixtral", to="mixtral", progress=False)
    assert ("EMA defaults are non-zero" in caplog.text) == (default_term == "forward")
    mixtral = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", dtype=torch.float32).eval()
    ids = random_ids(seed=9)
    with torch.no_grad():
        ours, theirs = model.eval()(ids).logits, mixtral(ids).logits
    if default_term == "gradient":
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    else:
        assert (theirs - ours).abs().max() > 1e-3
