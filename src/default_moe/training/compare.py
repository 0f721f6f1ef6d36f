"""`default-moe compare`: Default MoE (`routing="default"`) against the standard top-K router (`routing="topk"`).

For every seed, both models start from the *same* initial weights (the top-K model is the Default MoE model with
its routing switched; with zero defaults the two are the same function at step 0), see the same batches in the same
order with the same optimizer settings, and are evaluated on the same validation blocks. The table reports the final
validation loss (mean and spread over seeds) and the training throughput (tokens per second of optimizer steps,
evaluation excluded). Writes OUTPUT_DIR/comparison.md, comparison.csv and comparison_loss.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from default_moe.conversion.io import atomic_output_file, atomic_write_text

from .callback import save_png

ROUTINGS = ("default", "topk")


class StepTimer(TrainerCallback):
    """Wall time spent in optimizer steps (forward, backward, update), excluding evaluation, logging and saving.

    The first `warmup` steps (allocator and kernel warm-up) are not timed; `steps` counts the timed ones.
    """

    def __init__(self, warmup: int = 0):
        self.warmup = warmup
        self.seconds = 0.0
        self.steps = 0
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.warmup:
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1
            self._start = None


@dataclass
class RunRecord:
    routing: str
    seed: int
    eval_loss: float
    train_lm_loss: float | None
    tokens_per_second: float
    train_seconds: float
    steps: int
    tokens: int
    final_dir: Path | None = None
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, LM loss)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)


def hold_out(run_data, fraction: float = 0.05):
    """Validation blocks cut from the end of the training blocks, when no validation data was given."""
    from .data import PackedDataset

    blocks = run_data.train.blocks
    count = max(1, int(len(blocks) * fraction))
    if len(blocks) - count < 1:
        raise ValueError(f"only {len(blocks)} training sequence(s): too few to hold out validation data")
    run_data.train, run_data.eval = PackedDataset(blocks[:-count]), PackedDataset(blocks[-count:])
    return run_data


def run_pair(
    base_model,
    run_data,
    training_args,
    seed: int,
    routings=ROUTINGS,
    save_routing: str | None = None,
    monitor: bool = True,
) -> list[RunRecord]:
    """Train one copy of `base_model` per routing, all from its current weights, with identical settings."""
    from .trainer import run_training

    initial_state = copy.deepcopy(base_model.state_dict())
    records = []
    for routing in routings:
        config = copy.deepcopy(base_model.config)
        config.routing = routing
        model = type(base_model)(config)
        model.load_state_dict(initial_state)
        args = copy.deepcopy(training_args)
        args.output_dir = str(Path(training_args.output_dir) / f"{routing}-seed{seed}")
        args.seed = seed
        timer = StepTimer(warmup=min(5, args.max_steps // 10) if args.max_steps > 0 else 0)
        result = run_training(
            model,
            run_data,
            args,
            callbacks=[timer],
            monitor=monitor,
            save=routing == save_routing,
            summary_extra={"routing": routing, "seed": seed},
        )
        if args.process_index == 0:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                Path(args.output_dir) / "log_history.json", json.dumps(result.log_history, indent=1) + "\n"
            )
        history = result.callback.history if result.callback else []
        eval_curve = [(e["step"], e["eval_loss"]) for e in result.log_history if "eval_loss" in e]
        train_curve = [(w["step"], w["lm_loss"]) for w in history if "lm_loss" in w]
        tokens = result.summary["tokens"]
        timed_tokens = tokens * timer.steps / max(result.summary["steps"], 1)
        records.append(
            RunRecord(
                routing=routing,
                seed=seed,
                eval_loss=eval_curve[-1][1],
                train_lm_loss=train_curve[-1][1] if train_curve else None,
                tokens_per_second=timed_tokens / timer.seconds if timer.seconds else float("nan"),
                train_seconds=timer.seconds,
                steps=result.summary["steps"],
                tokens=tokens,
                final_dir=result.final_dir,
                train_curve=train_curve,
                eval_curve=eval_curve,
            )
        )
    return records


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summary_rows(records: list[RunRecord]) -> list[dict]:
    """One row per routing: validation loss (mean ± std over seeds), throughput, and the difference to top-K."""
    rows = []
    by_routing = {r: [x for x in records if x.routing == r] for r in dict.fromkeys(x.routing for x in records)}
    topk = by_routing.get("topk")
    for routing, runs in by_routing.items():
        losses = [x.eval_loss for x in runs]
        row = {
            "routing": routing,
            "seeds": len(runs),
            "validation loss": _mean_spread(losses),
            "perplexity": f"{torch.tensor(statistics.mean(losses)).exp().item():.2f}",
            "tokens/s": f"{statistics.mean(x.tokens_per_second for x in runs):,.0f}",
        }
        if topk and routing != "topk":
            row["Δ loss vs topk"] = f"{statistics.mean(losses) - statistics.mean(x.eval_loss for x in topk):+.4f}"
            speed = statistics.mean(x.tokens_per_second for x in runs) / statistics.mean(
                x.tokens_per_second for x in topk
            )
            row["throughput vs topk"] = f"{100 * (speed - 1):+.1f}%"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = [max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def write_csv(records: list[RunRecord], path: Path) -> Path:
    fields = ["routing", "seed", "eval_loss", "train_lm_loss", "tokens_per_second", "train_seconds", "steps", "tokens"]
    with atomic_output_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in records:
            writer.writerow({name: getattr(r, name) for name in fields})
    return path


def plot_losses(records: list[RunRecord], path: Path, title: str = "Default MoE vs top-K") -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    colors = {"default": "tab:blue", "topk": "tab:orange"}
    fig, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for r in records:
        color = colors.get(r.routing)
        label = f"{r.routing} (seed {r.seed})"
        if r.train_curve:
            steps, losses = zip(*r.train_curve, strict=True)
            train_axis.plot(steps, _smooth(list(losses)), color=color, alpha=0.8, label=label)
        if r.eval_curve:
            steps, losses = zip(*r.eval_curve, strict=True)
            eval_axis.plot(steps, losses, color=color, marker="o", alpha=0.8, label=label)
    train_axis.set_title("training LM loss (smoothed)")
    eval_axis.set_title("validation loss")
    for axis in (train_axis, eval_axis):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    smoothed, last = [], None
    for value in values:
        last = value if last is None else weight * last + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def write_reports(records: list[RunRecord], output_dir: Path, title: str) -> dict[str, Path]:
    rows = summary_rows(records)
    md = output_dir / "comparison.md"
    text = f"# {title}\n\n{markdown_table(rows)}\n\nPer run: comparison.csv. Curves: comparison_loss.png.\n"
    return {
        "markdown": atomic_write_text(md, text),
        "csv": write_csv(records, output_dir / "comparison.csv"),
        "plot": plot_losses(records, output_dir / "comparison_loss.png", title),
    }


# ----------------------------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_data_arguments, add_model_arguments, add_trainer_arguments

    parser.description = __doc__.split("\n\n")[1].replace("\n", " ")
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_trainer_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="reuse an output folder that holds a comparison")
    parser.add_argument("--no-monitor", action="store_true", help="do not attach DefaultMoeCallback")
    parser.set_defaults(resume=None)


def run(args: argparse.Namespace) -> int:
    compare(args)
    return 0


def compare(args: argparse.Namespace) -> tuple[list[RunRecord], dict[str, Path]]:
    from .cli import model_overrides, prepare, training_arguments
    from .trainer import load_model

    if args.routing:
        raise ValueError("compare trains both routings; drop --routing")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has repeats: {args.seeds}")
    output = Path(args.output_dir)
    if (output / "comparison.md").exists() and not args.overwrite:
        raise FileExistsError(f"{output} already holds a comparison: pass --overwrite or another --output-dir")
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.eval_steps is None and args.max_steps > 0:
        args.eval_steps = max(1, args.max_steps // 5)  # a validation curve with ~5 points
    training_args = training_arguments(args, evaluate=True, save_strategy="no")
    args.overwrite = True  # nothing is saved in the per-run folders; the check above protects our reports
    output, run_data, _ = prepare(args)
    if run_data.eval is None:
        run_data = hold_out(run_data)
    records = []
    for seed in args.seeds:
        base = load_model(
            args.preset if not (args.config or args.model) else None,
            args.config,
            args.model,
            len(run_data.tokenizer),
            model_overrides(args),
            seed=seed,
        )
        records += run_pair(base, run_data, training_args, seed, monitor=not args.no_monitor)
    output.mkdir(parents=True, exist_ok=True)
    reports = write_reports(records, output, f"Default MoE vs top-K on {run_data.description}")
    print(text_table(summary_rows(records)))
    print(f"tables: {reports['markdown']}, {reports['csv']}; plot: {reports['plot']}")
    return records, reports


__all__ = ["RunRecord", "StepTimer", "compare", "run_pair", "summary_rows", "text_table", "write_reports"]
