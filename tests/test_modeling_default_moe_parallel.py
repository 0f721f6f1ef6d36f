"""Tensor, expert and data parallelism through transformers itself (`from_pretrained(distributed_config=
DistributedConfig(...))`, driven by `base_model_tp_plan` / `base_model_ep_plan` on DefaultMoeConfig and `_tp_plan`
on DefaultMoeForCausalLM): 2 gloo CPU processes against one process on the same weights and global batch. Eval
logits, a training step's loss, every gradient (router and experts included) and the EMA defaults after it agree
within 1e-5 (the EMA within 1e-6), and `save_pretrained` from the parallel model reloads in one process with the
same logits and EMA. Models with and without dense layers, with a shared expert, with tied and untied embeddings.

Under tensor parallelism alone the experts are held as the running release's own MoEs hold them
(`EXPERTS_IN_TP_PLAN`): up to transformers 5.24 each rank holds a slice of every expert and the partial outputs are
all-reduced before the block adds the default term once; from 5.25 on every rank holds them whole. Under expert
parallelism tokens go to the rank that holds their expert and come back (in training with 5.24's
`ep_implementation="auto"`, i.e. all-to-all, or with "all_reduce"), so the per-pair outputs the EMA needs are
complete on every rank; with `fsdp_size` the ranks hold different halves of the batch and the all-reduced EMA
statistics make the defaults those of the whole batch. Loading, training and saving log no deprecation and no plan
rule that matches nothing.
"""

import json

import pytest
import torch
import transformers
from transformers.distributed import DistributedConfig

from default_moe import DefaultMoeForCausalLM
from default_moe.configuration_default_moe import EXPERTS_IN_TP_PLAN
from test_modeling_default_moe_distributed import torchrun
from tiny_models import tiny_config, tiny_model
from workers.transformers_parallel import global_batch, step

# `lm_head` is split on the vocabulary, as the embedding is; transformers 5.20 (as for its own Llama and Mixtral) then
# needs a vocabulary divisible by tp_size, so 98 rather than the tiny models' 97.
VOCAB = dict(vocab_size=98)
MODELS = {
    "llama-style": dict(
        VOCAB, num_hidden_layers=3, num_dense_layers=1, router_aux_loss_coef=0.5, router_z_loss_coef=0.1
    ),
    "olmoe-style": dict(VOCAB, qk_norm="projection", router_z_loss_coef=0.1),
    "qwen-style": dict(
        VOCAB, num_hidden_layers=3, dense_layers=[1], qk_norm="head", shared_expert_intermediate_size=16
    ),
}
# Tied embeddings, as upcycling the small Qwen3/Qwen2/Llama-3.2 checkpoints gives.
MODELS["qwen-tied"] = dict(MODELS["qwen-style"], tie_word_embeddings=True)
JOBS = {  # name: (model, DistributedConfig)
    "tp2": ("llama-style", dict(tp_size=2, tp_plan="auto")),
    "tp2-ep2": ("llama-style", dict(tp_size=2, tp_plan="auto", ep_size=2)),
    "fsdp2": ("llama-style", dict(fsdp_size=2)),
    "fsdp2-ep2": ("llama-style", dict(fsdp_size=2, ep_size=2)),
    "olmoe-tp2": ("olmoe-style", dict(tp_size=2, tp_plan="auto")),
    "qwen-tp2": ("qwen-style", dict(tp_size=2, tp_plan="auto")),
    "qwen-tp2-ep2": ("qwen-style", dict(tp_size=2, tp_plan="auto", ep_size=2)),
    "tied-tp2": ("qwen-tied", dict(tp_size=2, tp_plan="auto")),
    "tied-tp2-ep2": ("qwen-tied", dict(tp_size=2, tp_plan="auto", ep_size=2)),
}
if "ep_implementation" in DistributedConfig.__dataclass_fields__:  # 5.24 on; "auto" trains through all-to-all
    JOBS["tp2-ep2-all-reduce"] = (
        "llama-style",
        dict(tp_size=2, tp_plan="auto", ep_size=2, ep_implementation="all_reduce"),
    )


def warm_model(name="llama-style"):
    model = tiny_model(**MODELS[name])
    for layer in model.model.layers:
        if layer.is_moe:
            torch.nn.init.normal_(layer.mlp.default_outputs.ema, std=0.5)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    for name in MODELS:
        warm_model(name).save_pretrained(folder / name)
    jobs = [dict(name=job, checkpoint=model, distributed_config=config) for job, (model, config) in JOBS.items()]
    torchrun("transformers_parallel.py", str(folder), str(folder), json.dumps(jobs))
    references = {name: step(warm_model(name), global_batch()) for name in MODELS}
    return folder, references


@pytest.mark.parametrize("name", list(JOBS))
def test_parallel_model_equals_one_process(runs, name):
    folder, references = runs
    reference = references[JOBS[name][0]]
    ranks = [torch.load(folder / f"{name}-rank{rank}.pt") for rank in range(2)]
    if name == "fsdp2-ep2" and tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 23):
        # transformers 5.20-5.22's FSDP halves expert gradients under EP: the model refuses in one line.
        assert all("needs transformers >= 5.23" in result["refused"] for result in ranks)
        return
    whole_batch = "tp_size" in JOBS[name][1]  # one tensor-parallel group: both ranks hold the whole batch
    for rank, result in enumerate(ranks):
        logits = result["logits"] if whole_batch else torch.cat([r["logits"] for r in ranks])
        torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=1e-5)
        if whole_batch:
            torch.testing.assert_close(result["loss"], reference["loss"], atol=1e-5, rtol=1e-5)
        else:  # each rank's loss is over its half; equal token counts, so their mean is the whole batch's
            torch.testing.assert_close(sum(r["loss"] for r in ranks) / 2, reference["loss"], atol=1e-5, rtol=1e-5)
        assert result["grads"].keys() == reference["grads"].keys()
        for key, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][key], grad, atol=1e-5, rtol=1e-5, msg=f"rank {rank} {key}")
        assert any(".mlp.gate." in key and grad.norm() > 0 for key, grad in result["grads"].items())
        for key, ema in reference["emas"].items():
            torch.testing.assert_close(result["emas"][key], ema, atol=1e-6, rtol=0, msg=f"rank {rank} {key}")


@pytest.mark.parametrize("name", list(JOBS))
def test_experts_are_held_as_the_release_plans(runs, name):
    """Expert parallelism, and FSDP between steps: whole experts, 2 of 4 per rank. Tensor parallelism alone: half of
    each expert's width up to transformers 5.24, every expert whole from 5.25 on (no expert rule in its TP plans)."""
    folder, _ = runs
    model, config = JOBS[name]
    tiny = tiny_config(**MODELS[model])
    experts, width = tiny.num_experts, 2 * tiny.intermediate_size
    if config.get("ep_size", 1) > 1 or config.get("fsdp_size", 1) > 1:
        expected = (experts // 2, width, tiny.hidden_size)
    elif EXPERTS_IN_TP_PLAN:
        expected = (experts, width // 2, tiny.hidden_size)
    else:
        expected = (experts, width, tiny.hidden_size)
    for rank in range(2):
        result = torch.load(folder / f"{name}-rank{rank}.pt")
        assert "refused" in result or result["expert_shape"] == expected


@pytest.mark.parametrize("name", list(JOBS))
def test_parallel_loading_logs_no_deprecation_and_no_unused_rule(runs, name):
    """What rank 0 saw from transformers' loggers and Python's warnings while it loaded, trained and saved: no
    deprecation (5.25 deprecates the `moe_tp_experts` style our plans used up to 5.24), and no plan rule naming a
    module the model does not have (5.25: "match nothing"; 5.20: "were not applied")."""
    folder, _ = runs
    result = torch.load(folder / f"{name}-rank0.pt")
    if "refused" in result:
        return
    for message in result["warnings"]:
        assert "deprecat" not in message.lower(), message
        assert "match nothing" not in message and "were not applied" not in message, message


@pytest.mark.parametrize("name", ["tp2", "tp2-ep2", "qwen-tp2-ep2", "tied-tp2-ep2"])
def test_parallel_model_saves_a_checkpoint_one_process_loads(runs, name):
    folder, references = runs
    reference = references[JOBS[name][0]]
    reloaded = DefaultMoeForCausalLM.from_pretrained(folder / f"{name}-saved").eval()
    expected = warm_model(JOBS[name][0])
    for layer in expected.model.layers:
        if layer.is_moe:  # the EMA after the parallel training step, weights as they were (no optimizer step)
            layer.mlp.default_outputs.ema.copy_(
                reference["emas"][f"model.layers.{layer.self_attn.layer_idx}.mlp.default_outputs.ema"]
            )
    ids = global_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected.eval()(ids).logits, atol=1e-6, rtol=0)
    for key, ema in reference["emas"].items():
        torch.testing.assert_close(dict(reloaded.named_buffers())[key], ema, atol=1e-6, rtol=0)
