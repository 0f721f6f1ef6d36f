"""benchmarks/defaults.py: the demo's run per learning rate, the best rate per routing, and the defaults it sets."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import load_results  # noqa: E402

from benchmarks import defaults  # noqa: E402
from default_moe.training import demo  # noqa: E402


def fake_runs(losses: dict[tuple[float, int], tuple[float, float]]) -> list[dict]:
    """Records as the runner stores them, from {(lr, seed): (default loss, topk loss)}."""
    return [
        {"key": dict(lr=lr, seed=seed, quick=False), "result": {"default": {"eval_loss": d}, "topk": {"eval_loss": t}}}
        for (lr, seed), (d, t) in losses.items()
    ]


@pytest.fixture
def two_seeds(monkeypatch):
    s = dict(lrs=[1e-3, 2e-3, 4e-3], seeds=[0, 1])
    monkeypatch.setattr(defaults, "settings", lambda quick: s)
    return s


def test_jobs_finish_a_seed_s_grid_before_the_next_seed(two_seeds):
    jobs = defaults.jobs()
    assert [(j["seed"], j["lr"]) for j in jobs] == [(0, 1e-3), (0, 2e-3), (0, 4e-3), (1, 1e-3), (1, 2e-3), (1, 4e-3)]


def test_best_rate_is_each_routing_s_lowest_mean_over_seeds(two_seeds):
    s = two_seeds
    losses = {
        (lr, seed): (5.0 + abs(lr - 4e-3), 5.0 + abs(lr - 2e-3) + 0.01 * seed) for lr in s["lrs"] for seed in s["seeds"]
    }
    assert defaults.best_lrs(fake_runs(losses)) == {"default": 4e-3, "topk": 2e-3}
    del losses[1e-3, 1]
    assert defaults.best_lrs(fake_runs(losses)) == {}  # a partial grid names no best rate
    text = defaults.render(fake_runs(losses))
    assert "| 0.001 | 1 |" in text  # the partial rate shows its one seed
    assert "| 0.004 | 2 | 5.0070 | 5.0000 | -0.007 [" in text and "(2/2 better) |" in text
    assert "Best rate" not in text


def test_quick_run_trains_both_routings_of_the_demo_and_resumes(tmp_path):
    threads = torch.get_num_threads()
    path = tmp_path / "runs.jsonl"
    first = defaults.run(quick=True, results_path=path, log=lambda msg: None)
    torch.set_num_threads(threads)
    runs = load_results(path)
    assert first["runs"] == len(runs) == len(defaults.jobs(quick=True))
    for record in runs:
        result = record["result"]
        assert set(result) == {"default", "topk"}
        # the same initial weights and batches: the routings differ, but only a little after a few steps
        assert result["default"]["eval_loss"] != result["topk"]["eval_loss"]
        assert result["default"]["eval_loss"] == pytest.approx(result["topk"]["eval_loss"], abs=0.05)
        assert result["default"]["eval_curve"][-1][0] == demo.QUICK["steps"]
    lrs = defaults.settings(True)["lrs"]
    losses = [runs[lrs.index(lr)]["result"]["default"]["eval_loss"] for lr in lrs]
    assert losses[1] < losses[0]  # the higher rate learns more in a few steps
    assert set(first["best_lrs"]) == {"default", "topk"}
    again = defaults.run(quick=True, results_path=path, log=lambda msg: None)  # nothing left to run
    assert path.read_text().count("\n") == len(runs) and again["tables"] == first["tables"]


def test_demo_and_compare_defaults_are_the_measured_best_rate(tmp_path):
    """Issue 19, item 6: the demo's rate is the best rate of both routings in the committed measurement of the
    demo's own run; `train` and `compare` use it for a fresh tiny-preset model (their default) when `--lr` is not
    given, and keep the unmeasured 6e-4 for anything else."""
    from default_moe.training import cli

    best = defaults.best_lrs(load_results(defaults.RESULTS))
    assert best, "benchmarks/results/defaults_runs.jsonl holds no complete grid"
    assert demo.FULL["lr"] == best["default"] == best["topk"]

    def learning_rate(*argv):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        args = parser.parse_args(["--output-dir", str(tmp_path), *argv])
        return cli.training_arguments(args, evaluate=False).learning_rate

    assert learning_rate() == learning_rate("--preset", "tiny") == best["default"]
    assert learning_rate("--preset", "small") == learning_rate("--model", str(tmp_path)) == 6e-4
    assert learning_rate("--preset", "tiny", "--lr", "1e-4") == 1e-4
