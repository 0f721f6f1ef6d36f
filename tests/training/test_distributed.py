"""Multi-process training on CPU (gloo): `accelerate launch` DDP through our CLI, and the model under FSDP.

DDP: two ranks with 2 sequences each must train exactly like one process with 4 sequences (the same global
batches, since accelerate hands each rank consecutive slices of the same shuffled order), and both ranks must end
with identical EMA defaults (the model all-reduces its EMA statistics; we turn DDP's buffer broadcast off so that
nothing else could be hiding a difference).

FSDP: accelerate 1.15 selects FSDP only on GPU-type devices (on CPU it makes a MULTI_CPU run, i.e. plain DDP), so
`accelerate launch --use_fsdp` on a CPU-only machine is refused with a clear error. The model itself is tested
under PyTorch's FSDP2 (`fully_shard`, parameters sharded as DTensors) on CPU/gloo.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from default_moe.cli import main
from deprecations import deprecations_in
from training.helpers import TINY_RUN


def launch() -> list[str]:
    with socket.socket() as probe:  # a free port for this launch's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # `accelerate launch` from this interpreter's environment, whatever is on PATH.
    argv = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "2"]
    argv += ["--num_machines", "1"]
    return argv + ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


RUN = [a for a in TINY_RUN if a != "--logging-steps" and a != "1"] + ["--logging-steps", "2", "--max-steps", "6"]


def _env():
    # PATH without this environment's bin, as in CI: the launcher and its workers come from sys.executable.
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PATH=os.defpath)
    env.pop("DEFAULT_MOE_DEBUG", None)
    return env


def _log_history(folder):
    return json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]


def test_accelerate_ddp_on_cpu_matches_one_process_and_keeps_ema_in_sync(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    argv = [*launch(), "--multi_gpu", "-m", "default_moe.cli", "train", "--preset", "micro", *RUN, "--batch-size", "2"]
    argv += ["--output-dir", str(ddp), "--dump-ema", str(ddp / "ema"), "--save-steps", "6"]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not deprecations_in(done.stderr), deprecations_in(done.stderr)
    assert "model saved to" in done.stdout and done.stdout.count("model saved to") == 1  # only rank 0 saves/prints

    # The same run in one process with the global batch (2 ranks x 2 sequences).
    argv = ["train", "--preset", "micro", *RUN, "--batch-size", "4", "--save-steps", "6"]
    assert main([*argv, "--output-dir", str(single), "--dump-ema", str(single / "ema")]) == 0

    rank0 = load_file(str(ddp / "ema" / "ema_rank0.safetensors"))
    rank1 = load_file(str(ddp / "ema" / "ema_rank1.safetensors"))
    alone = load_file(str(single / "ema" / "ema_rank0.safetensors"))
    assert sorted(rank0) == sorted(alone) == ["layer0", "layer1"]
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"EMA of {key} differs between ranks"
        assert rank0[key].abs().max() > 0
        # Same statistics, all-reduced across ranks instead of summed in one batch: equal up to summation order.
        torch.testing.assert_close(rank0[key], alone[key], rtol=1e-5, atol=1e-8)
    saved = load_file(str(ddp / "final" / "model.safetensors"))
    torch.testing.assert_close(saved["model.layers.0.mlp.default_outputs.ema"], rank0["layer0"])

    ddp_logs = [e for e in _log_history(ddp) if "loss" in e]
    single_logs = [e for e in _log_history(single) if "loss" in e]
    assert [e["step"] for e in ddp_logs] == [e["step"] for e in single_logs] == [2, 4, 6]
    for a, b in zip(ddp_logs, single_logs, strict=True):
        # Trainer's loss (LM + router losses under num_items_in_batch scaling) and the callback's separate parts.
        for key in ("loss", "moe/lm_loss", "moe/aux_loss", "moe/z_loss", "moe/layer0/expert0"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    summary = json.loads((ddp / "final" / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == 6 * 4 * 32


def test_accelerate_fsdp_on_cpu_is_refused_with_a_clear_error(tmp_path):
    argv = [*launch(), "--use_fsdp", "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"]
    argv += ["-m", "default_moe.cli", "train", "--preset", "micro", *RUN, "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: FSDP through accelerate needs GPUs" in done.stderr
    assert not (tmp_path / "out").exists()


FSDP_WORKER = r"""
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from default_moe import DefaultMoeForCausalLM
from default_moe.training.trainer import preset_config


def train(rank, world):
    torch.manual_seed(0)
    model = DefaultMoeForCausalLM(preset_config("micro", vocab_size=128, default_ema_beta=0.5))
    if world > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, DTensor)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.randint(0, 128, (3, 4, 16), generator=torch.Generator().manual_seed(1))  # 3 steps, global batch 4
    losses = []
    for step in range(3):
        batch = data[step].chunk(world)[rank]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    losses = torch.stack(losses)
    if world > 1:
        dist.all_reduce(losses)
    ema = {f"layer{i}": layer.mlp.default_outputs.ema.clone() for i, layer in enumerate(model.model.layers)}
    return {"ema": ema, "losses": losses / world}


if __name__ == "__main__":
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.save(train(rank, world), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
"""


def test_model_under_fsdp2_on_cpu_gloo_keeps_ema_in_sync_and_matches_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", init, str(tmp_path)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    # Meanwhile, the reference: the same steps in this process, unsharded, on the whole global batch.
    namespace = {"__name__": "fsdp_worker"}
    exec(compile(FSDP_WORKER, str(script), "exec"), namespace)
    alone = namespace["train"](0, 1)
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    sharded = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key, value in sharded[0]["ema"].items():
        assert torch.equal(value, sharded[1]["ema"][key]), f"FSDP ranks disagree on the EMA of {key}"
        assert value.abs().max() > 0
        torch.testing.assert_close(value, alone["ema"][key], rtol=1e-4, atol=1e-7)
    # Mean of the per-rank losses = the one-process loss on the global batch (equal token counts per rank).
    torch.testing.assert_close(sharded[0]["losses"], alone["losses"], rtol=1e-4, atol=1e-5)
