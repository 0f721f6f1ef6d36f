"""Sparse upcycling of dense Llama/Mistral/Qwen2/Qwen3/OLMo-2/OLMo-3 models: step 0 equals the dense model
(transformers' own)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, FlexOlmoForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM

from conversion.sources import build_model, folder_digest, random_inputs, save_source
from default_moe import DefaultMoeConfig, DefaultMoeForCausalLM
from default_moe.conversion import convert, export

# name -> (source, options)
CASES = {
    "llama-E4-K2-G1": ("llama-sharded-fp32", dict(num_experts=4, top_k=2, granularity=1)),
    "llama-E8-K4-G2-dense1": ("llama-sharded-fp32", dict(num_experts=8, top_k=4, granularity=2, num_dense_layers=1)),
    # G=3 scales down_proj by 3, exact in float32 but not in bfloat16: write float32 (see docs/conversion.md).
    "llama-bf16-E6-K3-G3-to-fp32": (
        "llama-tied-bias-bf16",
        dict(num_experts=6, top_k=3, granularity=3, dtype="float32"),
    ),
    "llama-bf16-E4-K2-G2": ("llama-tied-bias-bf16", dict(num_experts=4, top_k=2, granularity=2)),
    "mistral-E4-K1-G1": ("mistral-sliding-fp32", dict(num_experts=4, top_k=1)),
    "qwen2-E8-K4-G4": ("qwen2-tied-fp32", dict(num_experts=8, top_k=4, granularity=4, seed=7)),
    # Sliding attention on some layers only (layer_types from max_window_layers).
    "qwen2-sliding-upper-E4-K2": ("qwen2-sliding-upper-fp32", dict(num_experts=4, top_k=2)),
    # Qwen3: q/k norms per head (qk_norm="head"), head_dim 16 != hidden/heads.
    "qwen3-sliding-upper-E4-K2-G2": ("qwen3-sharded-fp32-sliding-upper", dict(num_experts=4, top_k=2, granularity=2)),
    "qwen3-bf16-E8-K2-dense1": ("qwen3-tied-bias-bf16", dict(num_experts=8, top_k=2, num_dense_layers=1)),
    # OLMo-2: norms on the sublayer outputs (norm_placement="post") and q/k norms over the whole projections.
    "olmo2-E4-K2-G1": ("olmo2-sharded-bias-fp32", dict(num_experts=4, top_k=2)),
    "olmo2-E8-K4-G2-dense1": (
        "olmo2-sharded-bias-fp32",
        dict(num_experts=8, top_k=4, granularity=2, num_dense_layers=1),
    ),
    "olmo2-bf16-E6-K2-G2": ("olmo2-tied-bf16", dict(num_experts=6, top_k=2, granularity=2)),
    # OLMo-3: OLMo-2's norms, sliding and full layers, RoPE per attention kind (YaRN on the full layer).
    "olmo3-yarn-E4-K2-G1": ("olmo3-sharded-bias-fp32-yarn", dict(num_experts=4, top_k=2)),
    "olmo3-bf16-E4-K2-G2-dense1": ("olmo3-tied-bf16", dict(num_experts=4, top_k=2, granularity=2, num_dense_layers=1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_upcycled_model_equals_dense_model_at_step_0(sources, tmp_path, case):
    source_name, options = CASES[case]
    source = sources[source_name]
    before = folder_digest(source.folder)
    dst = convert(source.folder, tmp_path / "moe", max_shard_size="16KB", progress=False, **options)
    assert folder_digest(source.folder) == before

    cfg = DefaultMoeConfig.from_pretrained(dst)
    granularity = options.get("granularity", 1)
    dense_width = json.loads((source.folder / "config.json").read_text())["intermediate_size"]
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (
        options["num_experts"],
        options["top_k"],
        True,
    )
    assert cfg.intermediate_size * granularity == dense_width == cfg.dense_intermediate_size
    assert cfg.dense_layers == list(range(options.get("num_dense_layers", 0)))
    expected = {"olmo2": ("post", "projection"), "olmo3": ("post", "projection"), "qwen3": ("pre", "head")}
    assert (cfg.norm_placement, cfg.qk_norm) == expected.get(source.model_type, ("pre", False))
    src = AutoConfig.from_pretrained(source.folder)
    window = getattr(src, "sliding_window", None)
    kinds = getattr(src, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * 2
    assert cfg.layer_types == kinds
    assert cfg.rope_parameters == src.rope_parameters

    reference = source.load_reference()
    ours = DefaultMoeForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    for seed in range(2):
        input_ids = random_inputs(seed)
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids).logits, reference(input_ids).logits, atol=1e-5, rtol=0)
    prompt = random_inputs(9, batch=1, length=4)
    assert torch.equal(
        ours.generate(prompt, max_new_tokens=8, do_sample=False),
        reference.generate(prompt, max_new_tokens=8, do_sample=False),
    )
    # A real, token-dependent router (not a constant that would trivially keep the dense output).
    with torch.no_grad():
        router_logits = ours(random_inputs(1), output_router_logits=True).router_logits
    assert len(router_logits) == len(cfg.moe_layers)
    assert all((logits - logits[0]).abs().max() > 1e-3 for logits in router_logits)


def test_expert_weights_follow_the_recipe(sources, tmp_path):
    """Expert e holds slice e mod G of the dense MLP (down scaled by G); router rows repeat in groups of G."""
    source = sources["llama-sharded-fp32"]
    dst = convert(source.folder, tmp_path / "moe", num_experts=8, top_k=4, granularity=2, progress=False)
    dense = {}
    for path in source.folder.glob("*.safetensors"):
        dense |= load_file(path)
    moe = load_file(dst / "model.safetensors")
    width = 16
    for layer in range(2):
        gate, up, down = (dense[f"model.layers.{layer}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        gate_up, down_moe = (
            moe[f"model.layers.{layer}.mlp.experts.gate_up_proj"],
            moe[f"model.layers.{layer}.mlp.experts.down_proj"],
        )
        for e in range(8):
            rows = slice((e % 2) * width, (e % 2 + 1) * width)
            assert torch.equal(gate_up[e, :width], gate[rows]) and torch.equal(gate_up[e, width:], up[rows])
            assert torch.equal(down_moe[e], down[:, rows] * 2)
        router = moe[f"model.layers.{layer}.mlp.gate.weight"]
        assert torch.equal(router[0::2], router[1::2]) and not torch.equal(router[0], router[2])
        assert router.std().item() == pytest.approx(0.02, rel=0.3)
    # The seed decides the router and nothing else.
    other = convert(source.folder, tmp_path / "seed1", num_experts=8, top_k=4, granularity=2, seed=1, progress=False)
    other_tensors = load_file(other / "model.safetensors")
    for key, value in moe.items():
        assert torch.equal(value, other_tensors[key]) == (not key.endswith("mlp.gate.weight")), key


def test_without_renormalisation_step_0_differs(sources, tmp_path):
    """Documented: norm_topk_prob=False scales each token's MLP output by the sum of its selected probabilities."""
    source = sources["llama-sharded-fp32"]
    dst = convert(source.folder, tmp_path / "moe", num_experts=4, top_k=2, norm_topk_prob=False, progress=False)
    reference = source.load_reference()
    ours = DefaultMoeForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (ours(random_inputs()).logits - reference(random_inputs()).logits).abs().max().item()
    assert difference > 1e-3


@pytest.mark.parametrize(
    ("source_name", "target", "target_class"),
    [
        ("llama-sharded-fp32", "mixtral", MixtralForCausalLM),
        ("olmo2-sharded-bias-fp32", "flex_olmo", FlexOlmoForCausalLM),
        ("qwen3-tied-bias-bf16", "qwen3_moe", Qwen3MoeForCausalLM),
    ],
)
def test_upcycled_model_exports_to_a_stock_moe_that_equals_the_dense_model(
    sources, tmp_path, source_name, target, target_class
):
    source = sources[source_name]
    moe = convert(source.folder, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    exported = export(moe, tmp_path / target, to=target, progress=False)
    reference = source.load_reference()
    stock = target_class.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(random_inputs()).logits, reference(random_inputs()).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("target", "name"), [("mixtral", "Mixtral"), ("olmoe", "OLMoE")])
def test_upcycled_olmo2_does_not_export_to_pre_norm_layouts(sources, tmp_path, target, name):
    moe = convert(sources["olmo2-sharded-bias-fp32"].folder, tmp_path / "moe", num_experts=4, progress=False)
    with pytest.raises(ValueError, match=f"cannot export to {name}: .*norm_placement='post'"):
        export(moe, tmp_path / "out", to=target)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_experts=4, top_k=3, granularity=2), "--granularity 2 must divide"),
        (dict(num_experts=2, top_k=3), "--top-k 3 exceeds --num-experts 2"),
        (dict(num_experts=0), "--num-experts must be a positive integer"),
        (dict(num_dense_layers=3), r"--num-dense-layers must be in \[0, 2\]"),
    ],
)
def test_bad_upcycling_options(sources, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        convert(sources["llama-sharded-fp32"].folder, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_unsupported_dense_variants(tmp_path):
    llama = build_model("llama", 0, mlp_bias=True)
    save_source(llama, tmp_path / "mlp_bias", "original", "fp32", None)
    with pytest.raises(ValueError, match="mlp_bias=True"):
        convert(tmp_path / "mlp_bias", tmp_path / "out")
    assert not (tmp_path / "out").exists()
