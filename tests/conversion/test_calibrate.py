"""Calibration warms the EMA defaults to the per-expert mean outputs (checked against transformers' Mixtral)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conversion.sources import copy_source, folder_digest, random_inputs
from default_moe import DefaultMoeConfig, DefaultMoeForCausalLM
from default_moe.conversion import convert
from default_moe.conversion.io import CheckpointReader

SOURCE = "mixtral-original-sharded-fp32"
TEXT = os.path.join(os.path.dirname(os.__file__), "json", "decoder.py")  # any text on every machine


def reference_defaults(source, folder, ids: list[int]) -> dict[int, torch.Tensor]:
    """Per-layer (E, H) mean of each expert's output over the tokens routed to it, from the transformers model."""
    reference = source.load_reference()
    weights = load_file(source.expected_export / "model.safetensors")
    inputs = {}
    hooks = [
        layer.mlp.register_forward_hook(lambda module, args, out, i=i: inputs.__setitem__(i, args[0][0].detach()))
        for i, layer in enumerate(reference.model.layers)
    ]
    with torch.no_grad():
        reference(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    config = reference.config
    defaults = {}
    for layer, x in inputs.items():
        prefix = f"model.layers.{layer}.block_sparse_moe"
        probs = F.softmax(x @ weights[f"{prefix}.gate.weight"].T, dim=-1)
        chosen = probs.topk(config.num_experts_per_tok, dim=-1).indices
        table = torch.zeros(config.num_local_experts, config.hidden_size)
        for e in range(config.num_local_experts):
            tokens = (chosen == e).any(-1)
            if tokens.any():
                w1, w2, w3 = (weights[f"{prefix}.experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3"))
                xe = x[tokens]
                table[e] = (F.silu(xe @ w1.T) * (xe @ w3.T) @ w2.T).mean(0)
        defaults[layer] = table
    return defaults


def test_calibration_sets_defaults_to_expert_means(sources, tmp_path):
    source = sources[SOURCE]
    src = copy_source(source, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"router_jitter_noise": 0.5}))  # must be off in calibration
    before = folder_digest(src)
    # beta=0 and after_use: one sequence, D = this batch's means, and the pass itself runs with zero defaults,
    # so the layer inputs are exactly what transformers' Mixtral computes.
    dst = convert(
        src,
        tmp_path / "dst",
        calibration_data=TEXT,
        calibration_tokens=40,
        calibration_seq_len=40,
        ema_beta=0.0,
        ema_update="after_use",
        max_shard_size="16KB",
        progress=False,
    )
    assert folder_digest(src) == before
    ids = AutoTokenizer.from_pretrained(src)(open(TEXT).read(), add_special_tokens=False)["input_ids"][:40]
    expected = reference_defaults(source, src, ids)
    reader = CheckpointReader(dst)  # patched in place: still a valid checkpoint
    for layer, table in expected.items():
        actual = reader.read(f"model.layers.{layer}.mlp.default_outputs.ema")
        assert actual.abs().sum() > 0
        torch.testing.assert_close(actual, table, atol=1e-5, rtol=1e-5)
    assert "warmed on 40 tokens of decoder.py" in (dst / "README.md").read_text()
    # Non-zero defaults are used in inference: the model now differs from the source (documented).
    ours = DefaultMoeForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (ours(random_inputs()).logits - source.load_reference()(random_inputs()).logits).abs().max()
    assert difference > 1e-4
    assert DefaultMoeConfig.from_pretrained(dst).router_jitter_noise == 0.5  # the config keeps the source's value


def test_calibration_over_several_sequences_uses_the_ema(sources, tmp_path):
    """With beta > 0 and several sequences the defaults are a running average: nonzero, finite, and not equal to a
    single-sequence calibration."""
    source = sources[SOURCE]
    one = convert(
        source.folder,
        tmp_path / "one",
        calibration_data=TEXT,
        calibration_tokens=32,
        calibration_seq_len=32,
        progress=False,
    )
    many = convert(
        source.folder,
        tmp_path / "many",
        calibration_data=TEXT,
        calibration_tokens=128,
        calibration_seq_len=32,
        progress=False,
    )
    name = "model.layers.1.mlp.default_outputs.ema"
    a, b = CheckpointReader(one).read(name), CheckpointReader(many).read(name)
    assert torch.isfinite(b).all() and b.abs().sum() > 0 and not torch.equal(a, b)


def test_calibration_needs_a_tokenizer_and_default_routing(sources, tmp_path):
    src = copy_source(sources[SOURCE], tmp_path / "src")
    with pytest.raises(ValueError, match="routing='topk' does not use"):
        convert(src, tmp_path / "a", routing="topk", calibration_data=TEXT)
    for path in src.glob("tokenizer*"):
        path.unlink()
    with pytest.raises(ValueError, match="needs a tokenizer in SRC"):
        convert(src, tmp_path / "b", calibration_data=TEXT, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="holds no tokens"):
        convert(sources[SOURCE].folder, tmp_path / "c", calibration_data=empty, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "src"]
