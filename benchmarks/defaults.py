"""The learning rate that `default-moe demo` and `compare` use by default, measured (issue 19, item 6).

    python -m benchmarks --only defaults [--jobs 2]    # resumable, into benchmarks/results/defaults_runs.jsonl
    python -m benchmarks.defaults                      # the table

The demo's exact run (its settings in default_moe.training.demo: tiny preset, 8 experts top-2, 4096-token BPE on the
built-in corpus, 250 steps of 8x128 tokens, cosine schedule, the CLI's Trainer path) at each rate of a grid, both
routings per seed from the same initial weights on the same batches (`compare.run_pair`, what the demo calls). Each
arm's best rate is the one with the lowest mean validation loss over the seeds; the table also gives the paired
difference (Default minus top-K) at every rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "defaults_runs.jsonl"


def settings(quick: bool) -> dict:
    if quick:
        return dict(lrs=[1e-3, 4e-3], seeds=[0])
    # one seed (compute): at the demo's scale the grid moved the loss by 0.06-0.14 between neighbouring rates
    return dict(lrs=[1e-3, 2e-3, 4e-3], seeds=[0])


def jobs(quick: bool = False) -> list[dict]:
    """Seed by seed (whole grids first), rate by rate; one job trains both routings."""
    s = settings(quick)
    return [dict(lr=lr, seed=seed, quick=quick) for seed in s["seeds"] for lr in s["lrs"]]


def train_pair(job: dict) -> dict:
    """The demo's run at `job["lr"]`: validation loss, curve and throughput per routing."""
    from default_moe.training import demo
    from default_moe.training.compare import run_pair
    from default_moe.training.trainer import load_model, prepare_data

    s = dict(demo.QUICK if job["quick"] else demo.FULL, lr=job["lr"])
    run_data = prepare_data(
        s["seq_len"],
        vocab_size=s["vocab_size"],
        max_train_tokens=s["steps"] * s["batch_size"] * s["seq_len"],
        max_eval_tokens=s["eval_tokens"],
    )
    base = load_model(s["preset"], vocab_size=len(run_data.tokenizer), seed=job["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        args = demo.demo_training_args(
            Path(tmp), s["steps"], s, argparse.Namespace(seeds=[job["seed"]], no_progress=True)
        )
        records = run_pair(base, run_data, args, job["seed"])
    return {
        r.routing: dict(eval_loss=r.eval_loss, eval_curve=r.eval_curve, tokens_per_second=r.tokens_per_second)
        for r in records
    }


def best_lrs(runs: list[dict], quick: bool = False) -> dict[str, float]:
    """Each routing's rate with the lowest mean validation loss, once every job of the grid has finished."""
    s = settings(quick)
    loss = {(r["key"]["lr"], r["key"]["seed"]): r["result"] for r in runs}
    if any((lr, seed) not in loss for lr in s["lrs"] for seed in s["seeds"]):
        return {}
    return {
        routing: min(
            s["lrs"], key=lambda lr: statistics.fmean(loss[lr, seed][routing]["eval_loss"] for seed in s["seeds"])
        )
        for routing in ("default", "topk")
    }


def render(runs: list[dict], quick: bool = False) -> str:
    from default_moe.training import demo

    from .balance import _paired_cell, _table

    s = settings(quick)
    out = ["### The demo's learning rate (issue 19, item 6)\n"]
    if not runs:
        return out[0] + "\nNo runs yet.\n"
    by = {(r["key"]["lr"], r["key"]["seed"]): r["result"] for r in runs}
    rows = []
    for lr in s["lrs"]:
        seeds = [seed for seed in s["seeds"] if (lr, seed) in by]
        if not seeds:
            continue
        cell = {routing: [by[lr, seed][routing]["eval_loss"] for seed in seeds] for routing in ("default", "topk")}
        rows.append(
            [f"{lr:g}", len(seeds), f"{statistics.fmean(cell['topk']):.4f}", f"{statistics.fmean(cell['default']):.4f}",
             _paired_cell([d - t for d, t in zip(cell["default"], cell["topk"], strict=True)])]
        )  # fmt: skip
    demo_settings = demo.QUICK if quick else demo.FULL
    out += [
        f"\n`default-moe demo`'s own run (preset {demo_settings['preset']}, {demo_settings['steps']} steps of "
        f"{demo_settings['batch_size'] * demo_settings['seq_len']:,} BPE tokens of the built-in corpus) per learning "
        "rate; validation loss (nats/token), mean over seeds; paired difference Default minus top-K, mean [95% t "
        "interval]:\n\n",
        _table(["LR", "seeds", "top-K", "Default (paper's form)", "Default - top-K"], rows),
    ]
    best = best_lrs(runs, quick)
    if best:
        out.append(f"\nBest rate: top-K {best['topk']:g}, Default {best['default']:g}.\n")
    return "".join(out)


def _log(msg: str) -> None:
    print(f"[defaults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def describe(job: dict, result: dict) -> str:
    return (
        f"lr {job['lr']:g} seed {job['seed']}: default {result['default']['eval_loss']:.4f}, "
        f"topk {result['topk']['eval_loss']:.4f}"
    )


def run(
    quick: bool = False, workers: int = 1, results_path: Path | None = None, deadline_s: float | None = None, log=_log
) -> dict:
    from .runs import run_jobs

    path = results_path or RESULTS
    runs = run_jobs(jobs(quick), train_pair, path, workers, log=log, describe=describe, deadline_s=deadline_s)
    return {
        "results_file": str(path),
        "runs": len(runs),
        "best_lrs": best_lrs(runs, quick),
        "tables": render(runs, quick),
    }


if __name__ == "__main__":
    from .runs import load_results

    print(render(load_results(RESULTS)))
