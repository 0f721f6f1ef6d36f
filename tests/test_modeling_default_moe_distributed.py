"""Data parallel and gradient accumulation: real 2-process gloo runs (torchrun) and real Trainer runs.

- EMA defaults: identical on every rank and equal to one process on the whole batch, because the per-expert
  statistics are all-reduced (DDP's buffer broadcast is not what keeps them in sync).
- Trainer (routing="topk"): the gradient handed to the optimizer is the same whether the batch runs at once, split
  into accumulation steps, or split over two processes (num_items_in_batch and the world-size factor).

Each group launches torchrun once with all its jobs (process start-up dominates on 2 cores).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deprecations import deprecations_in
from tiny_models import random_ids, tiny_model
from workers.ddp_ema import global_batch, run
from workers.trainer_grads import train_one_step

WORKERS = Path(__file__).parent / "workers"


def torchrun(script, *args):
    pythonpath = os.pathsep.join(filter(None, [str(WORKERS.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(WORKERS / script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not deprecations_in(result.stderr), deprecations_in(result.stderr)  # the workers' rule, as in-process


DDP_JOBS = {
    "mean-no-broadcast": dict(overrides=dict(), broadcast_buffers=False),
    "router_prob-aux-broadcast": dict(
        overrides=dict(default_ema_weighting="router_prob", router_aux_loss_coef=0.5), broadcast_buffers=True
    ),
    "local-stats": dict(overrides=dict(all_reduce_router_stats=False), broadcast_buffers=False),
}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("ddp_ema.py", str(out), json.dumps([dict(name=name, **job) for name, job in DDP_JOBS.items()]))
    return lambda name: [torch.load(out / f"{name}-rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", ["mean-no-broadcast", "router_prob-aux-broadcast"])
def test_ddp_ranks_share_the_single_process_ema_and_gradients(ddp_runs, name):
    ranks = ddp_runs(name)
    single = run(tiny_model(**DDP_JOBS[name]["overrides"]).train(), global_batch)
    for step, (emas, grads) in enumerate(single):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][step][0], ranks[1][step][0]))
        for rank in ranks:
            rank_emas, rank_grads = rank[step]
            for a, b in zip(rank_emas, emas):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
            for key in grads:
                torch.testing.assert_close(rank_grads[key], grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_without_all_reduce_the_ranks_drift_apart(ddp_runs):
    """The control for the test above: with the statistics kept local, each rank's EMA follows its own shard."""
    rank0, rank1 = ddp_runs("local-stats")
    assert not torch.allclose(rank0[-1][0][0], rank1[-1][0][0])


def rows_for(case):
    """Four [input_ids, labels] rows. 'lm': distinct rows with unevenly masked labels; 'z': distinct rows, all
    labels (the z-loss is a token mean, so it splits exactly); 'balance': identical input rows with unevenly masked
    labels (the load-balancing loss depends on the batch's routing statistics, which then do not change when the
    batch is split, while the label counts that weight each micro-batch do)."""
    ids = random_ids(batch=4, seq=10, seed=7)
    if case == "balance":
        ids = ids[:1].repeat(4, 1)
    labels = ids.clone()
    if case in ("lm", "balance"):
        for row, masked in enumerate([0, 3, 6, 1]):
            labels[row, :masked] = -100
    return [[row_ids.tolist(), row_labels.tolist()] for row_ids, row_labels in zip(ids, labels)]


CASES = {
    "lm": dict(routing="topk", router_aux_loss_coef=0.0),
    "z": dict(routing="topk", router_aux_loss_coef=0.0, router_z_loss_coef=0.1),
    "balance": dict(routing="topk", router_aux_loss_coef=0.5),
}
SPLITS = {"accumulate-2x2": (2, 2), "accumulate-1x4": (1, 4)}


@pytest.fixture(scope="module")
def two_process_trainer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    jobs = [[str(out / f"{case}.pt"), 1, 2, overrides, rows_for(case)] for case, overrides in CASES.items()]
    torchrun("trainer_grads.py", json.dumps(jobs))
    return out


@pytest.mark.parametrize("case", CASES)
def test_trainer_gradient_is_the_same_at_once_accumulated_or_on_two_processes(tmp_path, two_process_trainer_runs, case):
    overrides, rows = CASES[case], rows_for(case)
    train_one_step(tmp_path / "at_once.pt", 4, 1, overrides, rows)
    reference = torch.load(tmp_path / "at_once.pt")
    assert reference["model.layers.0.mlp.gate.weight"].norm() > 0
    for name, (batch, accumulation) in SPLITS.items():
        train_one_step(tmp_path / f"{name}.pt", batch, accumulation, overrides, rows)
    results = {name: torch.load(tmp_path / f"{name}.pt") for name in SPLITS}
    results["two processes x 2 accumulation steps"] = torch.load(two_process_trainer_runs / f"{case}.pt")
    for name, grads in results.items():
        for key in reference:
            torch.testing.assert_close(grads[key], reference[key], atol=1e-6, rtol=1e-4, msg=f"{name}: {key}")
