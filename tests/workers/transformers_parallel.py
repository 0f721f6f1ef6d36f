"""Worker for tests/test_modeling_default_moe_parallel.py: a Default MoE loaded with transformers' own tensor,
expert and data parallelism (`from_pretrained(distributed_config=...)`) on 2 gloo CPU processes.

Run under `torchrun --nproc_per_node 2` with FOLDER (saved checkpoints by name), OUT and a JSON list of jobs
{"name", "checkpoint", "distributed_config"}. For each job, every rank takes its data-parallel share of
`global_batch()` (the whole batch when the ranks form one tensor-parallel group), and saves to
OUT/{name}-rank{r}.pt its eval logits, one training step's loss, full (gathered) gradients and EMA defaults after
the backward, how the last layer's experts are held (`expert_shape`: the local shape of `gate_up_proj`) and, on
rank 0, every warning transformers logged and every Python warning raised while the job loaded, trained and saved
(`warnings`); rank-collective `save_pretrained` then writes the parallel model to OUT/{name}-saved. A job the model
refuses to load saves {"refused": message} instead.
"""

import json
import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig
from transformers.utils import logging as transformers_logging

from default_moe import DefaultMoeForCausalLM
from tiny_models import random_ids


def global_batch() -> torch.Tensor:
    return random_ids(batch=4, seq=10, seed=7)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def step(model, ids) -> dict:
    """Eval logits, then one training forward and backward: loss, gradients, EMA defaults."""
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return {
        "logits": logits,
        "loss": loss.detach(),
        "grads": {name: full(p.grad) for name, p in model.named_parameters()},
        "emas": {name: full(b) for name, b in model.named_buffers() if name.endswith("default_outputs.ema")},
    }


class Recorder(logging.Handler):
    """Collects the messages of transformers' loggers (warnings and above)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main():
    folder, out_dir, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    logged = Recorder()
    transformers_logging.get_logger().addHandler(logged)  # the "transformers" logger, parent of all of its loggers
    for job in jobs:
        logged.messages = []
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            config = DistributedConfig(**job["distributed_config"])
            try:
                model = DefaultMoeForCausalLM.from_pretrained(
                    f"{folder}/{job['checkpoint']}", distributed_config=config, dtype=torch.float32
                )
            except ValueError as error:  # a combination the running transformers cannot do right
                torch.save({"refused": str(error)}, f"{out_dir}/{job['name']}-rank{int(os.environ['RANK'])}.pt")
                continue
            rank, world = dist.get_rank(), dist.get_world_size()
            data_parallel = world // (config.tp_size or 1)
            ids = global_batch().chunk(data_parallel)[rank // (world // data_parallel)]
            result = step(model, ids)
            model.save_pretrained(f"{out_dir}/{job['name']}-saved")
        gate_up = model.model.layers[-1].mlp.experts.gate_up_proj
        result["expert_shape"] = tuple((gate_up.to_local() if isinstance(gate_up, DTensor) else gate_up).shape)
        result["warnings"] = logged.messages + [f"{w.category.__name__}: {w.message}" for w in raised]
        torch.save(result, f"{out_dir}/{job['name']}-rank{rank}.pt")
        dist.barrier()
    os._exit(0)  # no interpreter teardown: gloo's destructor can deadlock (see workers/ddp_ema.py)


if __name__ == "__main__":
    main()
