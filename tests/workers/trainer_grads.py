"""Worker for tests/test_modeling_default_moe_distributed.py: one optimizer step of `transformers.Trainer` on a tiny
top-K model; rank 0 saves the gradients Trainer hands to the optimizer to OUT.

Usage: python trainer_grads.py JOBS_JSON, a list of [out, per_device_batch, accumulation, overrides, rows] with rows
a list of [input_ids, labels] pairs (run it under `torchrun --nproc_per_node 2` for two processes).
"""

import json
import os
import sys

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from tiny_models import tiny_model


class SaveGradients(TrainerCallback):
    def __init__(self, path):
        self.path = path

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.process_index == 0:
            torch.save({name: p.grad.clone() for name, p in model.named_parameters()}, self.path)


def train_one_step(out, per_device_batch, accumulation, overrides, rows):
    dataset = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)} for ids, labels in rows]
    args = TrainingArguments(
        output_dir=f"{out}.run",
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    model = tiny_model(**overrides)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[SaveGradients(out)]).train()


if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        train_one_step(*job)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    os._exit(0)  # no interpreter teardown: see workers/ddp_ema.py
