"""Model cards: metadata parses back, parameter counts match real models, provenance, usage snippet, CLI and errors."""

import json
import logging
import re

import pytest
import yaml
from huggingface_hub import ModelCard

from default_moe import DefaultMoeForCausalLM, cli
from default_moe.cards import count_parameters, write_model_card
from tiny_checkpoint import tiny_config, tiny_model, tiny_tokenizer

CONFIGS = {
    "base": {},
    "tied": {"tie_word_embeddings": True},
    "all_moe": {"num_dense_layers": 0},
    "all_dense": {"num_dense_layers": 2},
    "qk_norm_bias": {"qk_norm": True, "attention_bias": True},
    "post_norm_qk_norm": {"norm_placement": "post", "qk_norm": True},
    "gqa_head_dim": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6},
    "wide_dense": {"dense_intermediate_size": 24, "num_hidden_layers": 3},
    "top1_of_8": {"num_experts": 8, "num_experts_per_tok": 1},
    "qk_norm_head": {"qk_norm": "head", "head_dim": 16},
    "shared_expert_dense_middle": {"num_hidden_layers": 3, "dense_layers": [1], "shared_expert_intermediate_size": 20},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_match_real_model(name):
    config = tiny_config(**CONFIGS[name])
    model = DefaultMoeForCausalLM(config)
    counts = count_parameters(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # Active: every parameter, except that each MoE layer uses K of its E experts.
    active = 0
    for param_name, param in model.named_parameters():
        if ".mlp.experts." in param_name:
            active += param.numel() * config.num_experts_per_tok // config.num_experts
        else:
            active += param.numel()
    assert counts["active"] == active
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    router_numel = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".mlp.gate.weight"))
    assert (counts["experts"], counts["router"]) == (expert_numel, router_numel)


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "ckpt"
    tiny_model(warm_ema=False).save_pretrained(path)
    return path


def _metadata(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.DOTALL)
    assert match, "README.md must start with a YAML block"
    return yaml.safe_load(match.group(1))


def test_card_metadata_and_body(folder):
    summary = {"steps": 120, "tokens": 245760, "final_losses": {"lm_loss": 2.25, "eval_loss": 2.5}, "seed": 7}
    (folder / "training_summary.json").write_text(json.dumps(summary))
    path = write_model_card(
        folder,
        base_model="mistralai/Mixtral-8x7B-v0.1",
        base_model_relation="finetune",
        datasets=["python-stdlib"],
        extra={"source_format": "mixtral", "converted_layers": 2},
    )
    readme = path.read_text()
    metadata = _metadata(readme)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"default-moe", "moe", "custom_code"} <= set(metadata["tags"])
    assert metadata["base_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert metadata["base_model_relation"] == "finetune"
    assert metadata["datasets"] == ["python-stdlib"]
    assert metadata["license"] == "apache-2.0"
    assert ModelCard.load(path).data.library_name == "transformers"  # huggingface_hub parses it too

    counts = count_parameters(tiny_config())
    assert f"| Total parameters | {counts['total']:,}" in readme
    assert f"| Active parameters per token | {counts['active']:,}" in readme
    assert "| Experts per MoE layer | 4 |" in readme and "| Experts per token (top-k) | 2 |" in readme
    assert "| EMA decay beta | 0.9 |" in readme and "`before_use`" in readme and "`mean`" in readme
    assert "| Training steps | 120 |" in readme and "| Training tokens | 245,760 |" in readme
    assert "| Final lm loss | 2.25 |" in readme and "| Final eval loss | 2.5 |" in readme and "| seed | 7 |" in readme
    assert "| source_format | mixtral |" in readme and "| converted_layers | 2 |" in readme
    assert "Fine-tuned from [mistralai/Mixtral-8x7B-v0.1]" in readme
    assert "trust_remote_code=True" in readme
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"routing": "topk"}, "`topk`: standard sparse top-K MoE"),
        ({"default_ema_weighting": "router_prob", "default_ema_update": "after_use"}, "`after_use`"),
        ({"default_ema_beta": 0.65, "norm_topk_prob": True}, "| EMA decay beta | 0.65 |"),
        ({"norm_placement": "post"}, "| RMSNorm placement | post: on attention and MLP outputs (OLMo-2 style) |"),
        ({"qk_norm": "head"}, "| q/k RMSNorm | per head (Qwen3 style) |"),
        ({"qk_norm": True}, "| q/k RMSNorm | over the whole projections (OLMoE style) |"),
        (
            {"shared_expert_intermediate_size": 20},
            "| Shared expert (every MoE layer) | width 20, sigmoid-gated, always selected (no default vector) |",
        ),
        ({"num_hidden_layers": 3, "dense_layers": [1]}, "| Layers | 3 (1 dense, 2 MoE); dense: 1 |"),
        ({"num_hidden_layers": 3, "num_dense_layers": 1}, "| Layers | 3 (1 dense, 2 MoE) |"),
        (
            {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
            "| Sliding window | 8 on 1 of 2 layers |",
        ),
        (
            {
                "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                },
            },
            "| RoPE (sliding attention) | rope_theta: 10000, rope_type: default |",
        ),
        ({"default_term": "gradient"}, "| Default term | `gradient`: router gradient only; the forward is exactly"),
        ({"default_ema_source": "unrouted", "default_probe_stride": 32}, "not routed to it (1 in 32 tokens) |"),
    ],
)
def test_card_reflects_routing_settings(tmp_path, overrides, expected):
    DefaultMoeForCausalLM(tiny_config(**overrides)).save_pretrained(tmp_path)
    readme = write_model_card(tmp_path).read_text()
    assert expected in readme
    if overrides.get("routing") == "topk":
        assert "EMA decay beta" not in readme and "routing-topk" in _metadata(readme)["tags"]


def test_card_without_provenance_omits_base_model(folder):
    readme = write_model_card(folder).read_text()
    metadata = _metadata(readme)
    assert "base_model" not in metadata and "base_model_relation" not in metadata and "datasets" not in metadata
    assert "No training or conversion record" in readme


def test_usage_snippet_runs(folder):
    """The card's snippet, pointed at the folder, loads the model with trust_remote_code and generates."""
    tiny_tokenizer().save_pretrained(folder)
    readme = write_model_card(folder, repo_id="someone/tiny").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert 'from_pretrained("someone/tiny", trust_remote_code=True)' in snippet and "generate(" in snippet
    snippet = snippet.replace('"def fibonacci(n):"', '"w1 w2 w3"').replace("someone/tiny", str(folder))
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    output = namespace["output"]
    assert output.shape[0] == 1 and 3 < output.shape[1] <= 3 + 40


def test_card_replaces_existing_readme_and_keeps_it_on_error(folder):
    (folder / "README.md").write_text("old")
    write_model_card(folder)
    assert (folder / "README.md").read_text().startswith("---\n")
    (folder / "README.md").write_text("old")
    (folder / "training_summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*training_summary.json"):
        write_model_card(folder)
    assert (folder / "README.md").read_text() == "old"


def test_card_removes_the_temporary_file_of_a_killed_run(folder, capsys, caplog):
    (folder / ".README.md.tmp-k1ll3d").write_text("half a card")  # what SIGKILL during `default-moe card` leaves
    (folder / ".config.json.tmp-other").write_text("not ours")
    with caplog.at_level(logging.WARNING):
        assert cli.main(["card", str(folder)]) == 0
    assert caplog.messages == [f"removed .README.md.tmp-k1ll3d in {folder}, left by an earlier interrupted run"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".config.json.tmp-other"]
    assert (folder / "README.md").read_text().startswith("---\n")


@pytest.mark.parametrize(
    "setup, kwargs, message",
    [
        ("no_config", {}, "config.json is missing"),
        ("mixtral_config", {}, "is not a Default MoE config (model_type='mixtral'"),
        (None, {"base_model_relation": "copy", "base_model": "a/b"}, "base_model_relation='copy' is invalid"),
        (None, {"base_model_relation": "finetune"}, "base_model_relation needs a base_model"),
        ("summary_list", {}, "must hold a JSON object"),
    ],
)
def test_card_errors(folder, setup, kwargs, message):
    if setup == "no_config":
        (folder / "config.json").unlink()
    elif setup == "mixtral_config":
        (folder / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    elif setup == "summary_list":
        (folder / "training_summary.json").write_text("[]")
    with pytest.raises(ValueError, match=re.escape(message)):
        write_model_card(folder, **kwargs)
    assert not (folder / "README.md").exists()


def test_card_cli(folder, capsys):
    args = ["card", str(folder), "--base-model", "org/base", "--base-model-relation", "finetune", "--dataset", "d1"]
    assert cli.main(args) == 0
    assert "README.md" in capsys.readouterr().out
    metadata = _metadata((folder / "README.md").read_text())
    assert (metadata["base_model"], metadata["base_model_relation"], metadata["datasets"]) == (
        "org/base",
        "finetune",
        ["d1"],
    )

    assert cli.main(["card", str(folder / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "is not a folder" in err[0]
    (folder / "config.json").unlink()
    assert cli.main(["card", str(folder)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {folder} is not a checkpoint folder: config.json is missing"


def test_ema_buffers_are_not_counted_as_parameters():
    model = tiny_model()
    buffers = dict(model.named_buffers())
    assert any(name.endswith("default_outputs.ema") for name in buffers)
    assert count_parameters(model.config)["total"] == sum(p.numel() for p in model.parameters())


def test_card_from_training_summary_alone(folder):
    """The summary the training code writes supplies base model, relation and data; None values are left out."""
    summary = {
        "steps": 3,
        "tokens": 96,
        "final_losses": {"lm_loss": 3.5, "eval_loss": None},
        "tokens_per_second": None,
        "data": "built-in corpus (Python standard library)",
        "base_model": "org/base",
        "base_model_relation": "finetune",
        "dataset": "org/data",
    }
    (folder / "training_summary.json").write_text(json.dumps(summary))
    readme = write_model_card(folder, title="my-run").read_text()
    metadata = _metadata(readme)
    assert metadata["base_model"] == "org/base" and metadata["base_model_relation"] == "finetune"
    assert metadata["datasets"] == ["org/data"]
    assert "# my-run" in readme and "| Data | built-in corpus (Python standard library) |" in readme
    assert "| Final lm loss | 3.5 |" in readme and "None" not in readme and "eval loss" not in readme
    assert "| base_model_relation |" not in readme
