"""Worker for tests/test_modeling_default_moe_distributed.py: a few DDP training steps of a tiny Default MoE on gloo.

Run under `torchrun --nproc_per_node 2` with OUT and a JSON list of jobs {"name", "overrides", "broadcast_buffers"};
for each job, rank r trains on its half of a fixed global batch and saves, per step, the EMA defaults after the
forward and the (DDP-averaged) gradients to OUT/{name}-rank{r}.pt.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tiny_models import random_ids, tiny_model


def global_batch(step: int) -> torch.Tensor:
    return random_ids(batch=4, seq=12, seed=step)


def run(model, batches, steps=3):
    """SGD steps; returns [(emas after the forward, grads)] per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    history = []
    for step in range(steps):
        ids = batches(step)
        model(ids, labels=ids).loss.backward()
        emas = [layer.mlp.default_outputs.ema.clone() for layer in inner.model.layers]
        grads = {name: p.grad.clone() for name, p in inner.named_parameters()}
        history.append((emas, grads))
        optimizer.step()
        optimizer.zero_grad()
    return history


def main():
    out_dir, jobs = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for job in jobs:
        model = tiny_model(**job["overrides"]).train()
        model = DistributedDataParallel(model, broadcast_buffers=job["broadcast_buffers"])
        history = run(model, lambda step: global_batch(step).chunk(world)[rank])
        torch.save(history, f"{out_dir}/{job['name']}-rank{rank}.pt")
    dist.barrier()
    # Skip interpreter teardown: freeing DDP's reducer after the process group can deadlock in gloo's destructor
    # (the worker thread waits for the GIL the main thread holds while joining it; seen with torch 2.13).
    os._exit(0)


if __name__ == "__main__":
    main()
