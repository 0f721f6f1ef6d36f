"""Small-scale pretraining on the built-in corpus: Default MoE vs top-K from identical initialisation and data.

Byte-level language modelling (vocabulary 256) on the Python standard library's own source files, train/validation
split by file (default_moe.training.data.builtin_corpus). Every run of a seed starts from the same weights (the
routing switch adds no parameters) and sees the same batches in the same order; validation loss is measured on a
fixed held-out set at fixed step counts.

Variants: topk, default with plain-mean EMA (paper Eq. 10), default with router-probability-weighted EMA.
A learning-rate sweep (one seed) records the final validation loss and the largest training-loss spike at each LR.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch

from .common import build_ours, byte_corpus, our_config, sample_batches

VARIANTS = {
    "topk": dict(routing="topk"),
    "default_mean": dict(routing="default", default_ema_weighting="mean"),
    "default_router_prob": dict(routing="default", default_ema_weighting="router_prob"),
}


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            hidden=32,
            inter=32,
            layers=2,
            dense_layers=1,
            experts=4,
            top_k=1,
            batch=2,
            seq=32,
            steps=4,
            eval_at=[2, 4],
            warmup=1,
            lr=1e-3,
            seeds=[0, 1],
            sweep_lrs=[3e-3],
            sweep_steps=3,
            eval_batches=1,
            beta=0.9,
        )
    return dict(
        hidden=128,
        inter=256,
        layers=4,
        dense_layers=1,
        experts=8,
        top_k=1,
        batch=8,
        seq=128,
        steps=300,
        eval_at=[100, 200, 300],
        warmup=30,
        lr=2e-3,
        seeds=[0, 1, 2],
        sweep_lrs=[6e-3, 2e-2, 6e-2],
        sweep_steps=150,
        eval_batches=8,
        beta=0.9,
    )


def _log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def validation_loss(model, batches: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=b, labels=b).lm_loss) for b in batches]
    model.train()
    return sum(losses) / len(losses)


def train(model, optimizer, schedule, batches, on_step=None) -> list[float]:
    """The benchmarks' training loop: backward, clip the gradient norm at 1, step, schedule. Returns the per-step
    LM losses; `on_step(step, loss)` runs after each step (evaluation points)."""
    model.train()
    train_losses = []
    for step, batch in enumerate(batches, 1):
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(float(out.lm_loss.detach()))
        if on_step is not None:
            on_step(step, train_losses[-1])
    return train_losses


def max_spike(train_losses: list[float], warmup: int) -> float:
    """Largest rise of the training loss above its running minimum after warm-up: a loss-spike measure."""
    spike, best = 0.0, math.inf
    for loss in train_losses[warmup:]:
        best = min(best, loss)
        spike = max(spike, loss - best) if math.isfinite(loss) else math.inf
    return spike


def train_run(s: dict, variant: str, seed: int, lr: float, steps: int, train_data, valid_batches) -> dict:
    config = our_config(
        hidden=s["hidden"],
        inter=s["inter"],
        layers=s["layers"],
        experts=s["experts"],
        top_k=s["top_k"],
        vocab=256,
        heads=4,
        norm_topk_prob=False,
        max_pos=s["seq"],
        num_dense_layers=s["dense_layers"],
        default_ema_beta=s["beta"],
        **VARIANTS[variant],
    )
    model = build_ours(config, seed=seed)  # identical initial weights for every variant of a seed
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / s["warmup"]))
    val = {}

    def evaluate(step, loss):
        if step in s["eval_at"] or step == steps:
            val[str(step)] = validation_loss(model, valid_batches)

    batches = sample_batches(train_data, s["batch"], s["seq"], steps, seed=1000 + seed)
    train_losses = train(model, optimizer, schedule, batches, evaluate)
    spike = max_spike(train_losses, s["warmup"])
    return {"val_loss": val, "final_train_loss": statistics.fmean(train_losses[-10:]), "max_spike": spike}


def run(quick: bool = False, log=_log) -> dict:
    s = settings(quick)
    train_data = byte_corpus(30_000 if quick else 4_000_000, "train")
    valid = byte_corpus(20_000 if quick else 1_000_000, "validation")
    valid_batches = sample_batches(valid, s["batch"], s["seq"], s["eval_batches"], seed=4242)
    out = {"settings": s, "runs": {}, "summary": {}, "lr_sweep": {}}
    for seed in s["seeds"]:
        for variant in VARIANTS:
            res = train_run(s, variant, seed, s["lr"], s["steps"], train_data, valid_batches)
            out["runs"][f"{variant}/seed{seed}"] = res
            log(f"{variant} seed {seed}: val {res['val_loss']}")
    for variant in VARIANTS:
        out["summary"][variant] = {}
        for step in map(str, s["eval_at"]):
            vals = [out["runs"][f"{variant}/seed{seed}"]["val_loss"][step] for seed in s["seeds"]]
            out["summary"][variant][step] = {
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        # Paired difference to topk (same seed = same init and data): the spread that matters for the comparison.
        if variant != "topk":
            last = str(s["eval_at"][-1])
            runs = out["runs"]
            diffs = [
                runs[f"{variant}/seed{seed}"]["val_loss"][last] - runs[f"topk/seed{seed}"]["val_loss"][last]
                for seed in s["seeds"]
            ]
            out["summary"][variant]["paired_diff_vs_topk_final"] = {
                "mean": statistics.fmean(diffs),
                "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                "per_seed": diffs,
            }
    sweep_steps = s["sweep_steps"]
    for lr in s["sweep_lrs"]:
        for variant in VARIANTS:
            res = train_run({**s, "eval_at": [sweep_steps]}, variant, 0, lr, sweep_steps, train_data, valid_batches)
            out["lr_sweep"][f"{variant}/lr{lr:g}"] = {"lr": lr, "variant": variant, **res}
            log(f"sweep {variant} lr {lr:g}: val {res['val_loss']}, spike {res['max_spike']:.3f}")
    return out
