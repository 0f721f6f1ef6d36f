"""Fine-tuning a converted top-K MoE on a new domain (issue 19, item 4): Default forms against top-K.

Stand-in for a released MoE: a top-K model (routing="topk") pre-trained here on the byte-level Python corpus (the
method benchmark's recipe and data), once per size, cached under outputs/finetune/ (ignored by git; every run records
the weights' fingerprint and is keyed by it, so runs from another session's re-trained weights are never mixed or
paired with these). Conversion to
Default MoE is a change of `routing` on the same weights (what `default-moe convert` writes for our own layout) with
the defaults warmed by calibration (`default_moe.conversion.calibrate.warm_defaults`, the converter's
`--calibration-data` step) on a few batches of the fine-tuning text; the top-K arm keeps routing="topk". Each arm then
fine-tunes on English prose, the Python documentation's topic texts (`pydoc_data.topics`, in every CPython
installation: offline and deterministic for a Python version; the pre-training corpus excludes that folder), split by
topic. Recorded: prose validation loss before fine-tuning (what conversion and warmed defaults change) and at points
over it, and the Python validation loss at the end (what the model forgot).

Arms: top-K, the paper's form (defaults in the forward), gradient-only defaults; each over a learning-rate grid on one
seed, then more seeds at its best rate, paired by seed (same calibration and batches for every arm of a seed).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from default_moe.conversion.calibrate import warm_defaults

from . import method
from .common import build_ours, byte_corpus, our_config, sample_batches
from .quality import max_spike, train, validation_loss

ARMS = {
    "topk": dict(routing="topk"),
    "default": dict(routing="default"),  # the paper's form
    "gradient": dict(routing="default", default_term="gradient"),
}
SIZES = {  # hidden 64 is the method benchmark's model (0.7M parameters); hidden 128 is about 3.4x that
    "h64": dict(hidden=64, inter=128, layers=4, heads=4),
    "h128": dict(hidden=128, inter=256, layers=4, heads=4),
    "quick": dict(hidden=32, inter=32, layers=2, heads=2),
}
# Pre-trained models; DEFAULT_MOE_FINETUNE_CACHE moves them (the quick test keeps them out of the checkout).
CACHE = Path(os.environ.get("DEFAULT_MOE_FINETUNE_CACHE", Path(__file__).resolve().parents[1] / "outputs" / "finetune"))


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            sizes=["quick"], batch=2, seq=32, pretrain_steps=6, pretrain_lr=3e-3, steps=6, points=2,
            calibration_batches=2, lr_grid=[1e-3, 3e-3], grid_seeds=[0], seeds=[0, 1], eval_batches=1,
        )  # fmt: skip
    return dict(
        sizes=["h64", "h128"],
        batch=8,
        seq=128,
        pretrain_steps=1000,  # 1.02M bytes of Python (the method benchmark confirms at 1600: compute)
        pretrain_lr=2e-3,  # top-K's best rate in the method benchmark
        steps=200,  # 204,800 bytes of prose: about half an epoch of its training split (438 kB)
        points=4,
        calibration_batches=16,  # 16,384 tokens; beta 0.9 forgets the zero start after ~30 updates per expert
        lr_grid=[3e-4, 1e-3, 3e-3, 1e-2],  # 3e-3 was best for every arm on seed 0: the grid goes one rate higher
        grid_seeds=[0],  # the grid on one seed (compute), then 4 more seeds at each arm's best rate
        seeds=[0, 1, 2, 3, 4],
        eval_batches=4,
    )


def _log(msg: str) -> None:
    print(f"[finetune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prose_corpus(split: str, validation_fraction: float = 0.1) -> torch.Tensor:
    """English prose as bytes: pydoc's topic texts, a topic in validation iff the hash of its name says so."""
    from pydoc_data.topics import topics

    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'validation'")

    def in_validation(name: str) -> bool:
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64 < validation_fraction

    texts = [topics[name] for name in sorted(topics) if in_validation(name) == (split == "validation")]
    return torch.frombuffer(bytearray("\n\n".join(texts).encode("utf-8")), dtype=torch.uint8).long()


def _config(s: dict, size: str, **routing):
    m = SIZES[size]
    # The method benchmark's recipe: first layer dense, 8 experts top-1, no renormalisation, Switch loss 0.01.
    return our_config(
        hidden=m["hidden"], inter=m["inter"], layers=m["layers"], heads=m["heads"], vocab=256, experts=8, top_k=1,
        norm_topk_prob=False, max_pos=s["seq"], num_dense_layers=1, router_aux_loss_coef=0.01, default_ema_beta=0.9,
        **routing,
    )  # fmt: skip


def pretrained(s: dict, size: str, quick: bool) -> dict:
    """The top-K stand-in's state dict and its pre-training record, trained once per size and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"pretrain-{size}-{s['pretrain_steps']}-{s['pretrain_lr']:g}.pt"
    with open(path.with_suffix(".lock"), "w") as lock:  # parallel workers: one trains, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            _log(f"pre-training {size} (top-K, {s['pretrain_steps']} steps)")
            result = method.train_run(
                dict(
                    s={**method.settings(quick), "model": SIZES[size], "seq": s["seq"], "batch": s["batch"]},
                    shape="8e-top1",
                    variant="topk",
                    seed=0,
                    lr=s["pretrain_lr"],
                    steps=s["pretrain_steps"],
                    return_model=True,
                )
            )
            model = result.pop("model")
            torch.save({"state": model.state_dict(), "record": result}, path)
        base = torch.load(path)
    return {**base, "fingerprint": fingerprint(base["state"])}


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's names and values: runs fine-tuned from different pre-trained weights (another
    code version or machine trains another model; the cache is not committed) are never paired or resumed as one."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def prose_batches(s: dict, split: str, count: int, seed: int) -> torch.Tensor:
    return sample_batches(prose_corpus(split), s["batch"], s["seq"], count, seed=seed)


def train_run(job: dict) -> dict:
    """One fine-tuning run: job = dict(size, arm, seed, lr, quick, pretrained), `pretrained` the fingerprint of the
    pre-trained weights the job was planned from."""
    quick = job.get("quick", False)
    s = settings(quick)
    torch.set_num_threads(1)
    base = pretrained(s, job["size"], quick)
    if base["fingerprint"] != job["pretrained"]:
        raise RuntimeError(f"the cached pre-trained {job['size']} model changed under the study: rerun the command")
    model = build_ours(_config(s, job["size"], **ARMS[job["arm"]]), seed=0)
    model.load_state_dict(base["state"])
    valid = prose_batches(s, "validation", s["eval_batches"], seed=4242)
    python_valid = sample_batches(byte_corpus(50_000 if quick else 1_000_000, "validation"), s["batch"], s["seq"],
                                  s["eval_batches"], seed=4242)  # fmt: skip
    before_calibration = validation_loss(model, valid)
    if model.config.routing == "default":  # the converter's calibration: defaults warmed on the new domain's text
        warm_defaults(model, prose_batches(s, "train", s["calibration_batches"], seed=3000 + job["seed"]))
    steps = s["steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    eval_at = sorted({max(1, round(steps * (i + 1) / s["points"])) for i in range(s["points"])})
    val = {"0": validation_loss(model, valid)}  # string keys, as they read back from JSON

    def evaluate(step, loss):
        if step in eval_at:
            val[str(step)] = validation_loss(model, valid) if math.isfinite(loss) else math.inf

    start = time.perf_counter()
    batches = prose_batches(s, "train", steps, seed=2000 + job["seed"])
    train_losses = train(model, optimizer, schedule, batches, evaluate)
    final = val[str(eval_at[-1])]
    return {
        **{k: job[k] for k in ("size", "arm", "seed", "lr", "pretrained")},
        "steps": steps,
        "tokens_per_step": s["batch"] * s["seq"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_val_python": base["record"]["final_val"],
        "val_before_calibration": before_calibration,
        "val_curve": val,
        "final_val": final,
        "python_val_after": validation_loss(model, python_valid) if math.isfinite(final) else math.inf,
        "expert_load": method.expert_load(model, valid) if math.isfinite(final) else None,
        "max_spike": max_spike(train_losses, warmup),
        "diverged": not math.isfinite(final) or final > math.log(256),
        "train_seconds": time.perf_counter() - start,
    }


def grid_jobs(quick: bool, size: str, pretrained: str) -> list[dict]:
    """Every arm's learning-rate grid for one size, from the pre-trained weights whose fingerprint is `pretrained`,
    seed by seed, rate by rate (whole pairs first if cut short)."""
    s = settings(quick)
    return [
        dict(size=size, arm=arm, seed=seed, lr=lr, quick=quick, pretrained=pretrained)
        for seed in s["grid_seeds"]
        for lr in s["lr_grid"]
        for arm in ARMS
    ]


def seed_jobs(runs: list[dict], quick: bool, size: str, pretrained: str) -> list[dict]:
    """The remaining seeds of every arm of `size` whose grid is complete in `runs` (from `pretrained`), at its best
    rate."""
    s = settings(quick)
    runs = [r for r in runs if r["size"] == size and r.get("pretrained") == pretrained]
    return [
        dict(size=size, arm=arm, seed=seed, lr=lr, quick=quick, pretrained=pretrained)
        for seed in s["seeds"]
        if seed not in s["grid_seeds"]
        for (_, arm), lr in best_lrs(runs, s).items()
    ]


def current(runs: list[dict]) -> list[dict]:
    """Per size, the runs from the pre-trained weights of its most recent run (the file keeps the others)."""
    latest = {r["size"]: r.get("pretrained") for r in runs}
    return [r for r in runs if r.get("pretrained") is not None and r.get("pretrained") == latest[r["size"]]]


def best_lrs(runs: list[dict], s: dict) -> dict[tuple[str, str], float]:
    """Per (size, arm) whose grid is whole: its best rate, by the load-balance study's rule."""
    from .balance import best_lrs as best_per_group

    return best_per_group(runs, s, group=lambda r: (r["size"], r["arm"]))


# ----------------------------------------------------------------------------------------------------------------
# Tables


def render(runs: list[dict], quick: bool = False) -> str:
    """Per size: the grid, then each arm at its best rate against top-K at its own, paired by seed."""
    from .balance import _mean, _paired_cell, _table, grid_done, own_best

    s = settings(quick)
    out = ["### Fine-tuning a converted top-K model on a new domain (issue 19, item 4)\n"]
    stale, runs = len(runs), current(runs)
    stale -= len(runs)
    if not runs:
        return out[0] + "\nNo runs yet.\n"
    out.append(
        f"\nA top-K model pre-trained here on Python source bytes ({s['pretrain_steps']} steps of "
        f"{s['batch']}x{s['seq']}, LR {s['pretrain_lr']:g}), converted (routing switched, defaults warmed on "
        f"{s['calibration_batches']} batches of the new text), then fine-tuned {s['steps']} steps "
        f"({s['steps'] * s['batch'] * s['seq']:,} bytes) on English prose (pydoc topic texts). Validation loss in "
        "nats/byte on held-out prose topics. `converted` = prose loss of the converted model before fine-tuning "
        "(top-K: the pre-trained model itself), `Python after` = loss on held-out Python after fine-tuning "
        "(forgetting). Paired difference = arm minus top-K, same seeds, each at its own best rate; mean [95% t "
        "interval]; negative = better."
        + (f" ({stale} earlier runs from other pre-trained weights are left out.)" if stale else "")
        + "\n"
    )
    for size in dict.fromkeys(r["size"] for r in runs):
        mine = [r for r in runs if r["size"] == size]
        rows = []
        for arm in ARMS:
            cells = []
            for lr in s["lr_grid"]:
                cell = [r["final_val"] for r in mine if r["arm"] == arm and r["lr"] == lr]
                cells.append(f"{_mean(cell):.4f} ({len(cell)})" if cell else "-")
            rows.append([arm, *cells])
        params = mine[0]["parameters"]
        out += [
            f"\n{size} ({params:,} parameters, pre-trained Python validation loss "
            f"{mine[0]['pretrain_val_python']:.4f}): final prose loss per rate (mean, seeds):\n\n",
            _table(["arm", *(f"LR {lr:g}" for lr in s["lr_grid"])], rows),
        ]

        best = {arm: own_best([r for r in mine if r["arm"] == arm], s) for arm in ARMS}
        whole = {arm: grid_done([r for r in mine if r["arm"] == arm], s) for arm in ARMS}
        topk = {r["seed"]: r for r in mine if r["arm"] == "topk" and r["lr"] == best["topk"]}
        rows = []
        for arm in ARMS:
            at = {r["seed"]: r for r in mine if r["arm"] == arm and r["lr"] == best[arm]}
            if not at:
                continue
            common = sorted(set(at) & set(topk)) if whole[arm] and whole["topk"] else []  # best vs best: whole grids
            rows.append(
                [arm, f"{best[arm]:g}" if whole[arm] else f"({best[arm]:g}: grid partial)", len(at),
                 f"{_mean(r['val_before_calibration'] for r in at.values()):.4f}",
                 f"{_mean(r['val_curve']['0'] for r in at.values()):.4f}",
                 f"{_mean(r['final_val'] for r in at.values()):.4f}",
                 "-" if arm == "topk" else _paired_cell([at[i]["final_val"] - topk[i]["final_val"] for i in common]),
                 f"{_mean(r['python_val_after'] for r in at.values()):.4f}",
                 f"{_mean(_mean(r['expert_load']) for r in at.values() if r['expert_load']):.2f}"]
            )  # fmt: skip
        header = ["arm", "best LR", "seeds", "top-K model", "converted", "final", "vs top-K", "Python after", "load"]
        out += ["\nAt each arm's best rate:\n\n", _table(header, rows)]
    return "".join(out)


def describe(job: dict, result: dict) -> str:
    return f"{job['size']} {job['arm']} seed {job['seed']} lr {job['lr']:g}: val {result['final_val']:.4f}"


def run(
    quick: bool = False, workers: int = 1, results_path: Path | None = None, deadline_s: float | None = None, log=_log
) -> dict:
    """The study, resumable, size by size: every arm's grid, then the remaining seeds at its best rate (none
    started after `deadline_s`); returns the tables."""
    from .runs import load_results, run_jobs

    path = results_path or Path(__file__).resolve().parent / "results" / "finetune_runs.jsonl"
    start = time.monotonic()
    s = settings(quick)
    for size in s["sizes"]:  # size by size: the first size's comparison is whole before the next starts
        base = pretrained(s, size, quick)["fingerprint"]
        left = None if deadline_s is None else max(0.0, deadline_s - (time.monotonic() - start))
        run_jobs(grid_jobs(quick, size, base), train_run, path, workers, log=log, describe=describe, deadline_s=left)
        grid = [r["result"] for r in load_results(path)]
        left = None if deadline_s is None else max(0.0, deadline_s - (time.monotonic() - start))
        jobs = seed_jobs(grid, quick, size, base)
        run_jobs(jobs, train_run, path, workers, log=log, describe=describe, deadline_s=left)
    runs = [r["result"] for r in load_results(path)]
    return {"results_file": str(path), "runs": len(runs), "tables": render(runs, quick)}
