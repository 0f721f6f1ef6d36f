"""Where does Default MoE pay off? A resumable study (issue 19): a fair learning-rate protocol, the trend with scale,
tokens per step, and the paper's fine-grained shapes.

    python -m benchmarks --only study --jobs 1        # the CPU plan, appended to benchmarks/results/study.jsonl
    python -m benchmarks --only study --plan          # the plan: points, runs, estimated core-hours
    python -m benchmarks.study_report                 # every table and the plot, on partial results too
    python -m benchmarks --only study --device cuda   # the GPU plan (bf16), into study_gpu.jsonl

Every run is one job of benchmarks/runs.py (its fields are its key: part, size, shape, variant, tokens, tokens per
step, seed, learning rate), trained by benchmarks/method.py's `train_run` (the paper's recipe: first layer dense,
Switch load-balancing loss 0.01 over the whole batch, no z-loss, no jitter, AdamW (0.9, 0.95), weight decay 0.1,
clip 1.0, 5% warm-up then cosine decay; byte-level LM on the built-in corpus; same seed = same initial weights and
batches for every arm). A rerun skips finished runs. Runs start in the plan's priority order; a stage that chooses
learning rates reads them from the results of the stages before it, and a worker that finds no run of the current
stage left to start takes the first run of a later stage whose rates are known, so the first hours already answer
the most and no core waits for a stage's last run:

1. `fair`: top-K, the paper's form (`default`) and `gradient` (defaults in the router gradient only), each over its
   own grid of 6 rates (4x below to 8x above top-K's earlier best, 2e-3), 2 seeds, at the base size; then 3 more
   seeds at each arm's best rate and at its largest stable rate (5 paired seeds each).
2. `scale`: top-K and `default` at four sizes (0.2M to 11M parameters, 58x), two token budgets each (4x apart);
   at each size's first budget a 3-rate grid (seed 0) around the smaller size's best rate per arm, then seeds 1-2
   at each arm's best; the second budget at those rates, seeds 0-2. The first budgets of xs, m and l also run
   `unrouted` (item 5's estimator fix; the base size's is in benchmarks/balance.py's results).
3. `fine`: 32 experts top-1, top-4, top-4 with a shared expert (the paper's beta per configuration), top-K, the
   paper's form and its router-probability-weighted EMA, each with its own grid, at the third size.
4. `batch`: 1k, 8k and 32k tokens per step at equal total tokens (base size), each with its own grid.
(The second budgets of the two largest sizes run last.)
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from . import method
from .common import byte_corpus, code_version
from .runs import canonical, load_results, run_as_ready

RESULTS = {"cpu": "benchmarks/results/study.jsonl", "gpu": "benchmarks/results/study_gpu.jsonl"}

SIZES = {
    # CPU plan (4 layers, the first dense; expert width 2x hidden): 0.19M, 0.71M, 2.8M, 11M parameters at 8e-top1
    "xs": dict(hidden=32, inter=64, layers=4, heads=2),
    "s": dict(hidden=64, inter=128, layers=4, heads=4),
    "m": dict(hidden=128, inter=256, layers=4, heads=4),
    "l": dict(hidden=256, inter=512, layers=4, heads=4),
    # GPU plan (8 layers): 25M, 98M and 393M parameters at 8e-top1 (5.4M, 21M and 84M active)
    "g-s": dict(hidden=256, inter=512, layers=8, heads=4),
    "g-m": dict(hidden=512, inter=1024, layers=8, heads=8),
    "g-l": dict(hidden=1024, inter=2048, layers=8, heads=16),
    # quick plan (tests)
    "q1": dict(hidden=16, inter=16, layers=2, heads=2),
    "q2": dict(hidden=32, inter=32, layers=2, heads=2),
}
# Process CPU seconds of one training step of 1024 tokens, one torch thread, routing="default", 8e-top1, measured on
# this 2-core machine under load (2026-12-04; 32e-top4 at a quarter of the expert width took the same within 20%).
# Only the plan's cost estimates use them.
CPU_SECONDS_PER_1K = {"xs": 0.083, "s": 0.148, "m": 0.391, "l": 1.093}
EVAL_OVERHEAD = 1.1  # validation points, router-gradient cosines, expert load
# A run is stable if it did not diverge and its training loss (50 window means), relative to the median run of its
# cell and seed (same batches: their difficulty cancels), has no bump higher than this (nats) within 3 windows.
SPIKE_LIMIT = 0.1
# A tuned grid whose best rate is its highest (lowest) gets one more rate above (below), at most this many times.
MAX_EXTEND = 2


def _cell(size: str, tokens: int, tokens_per_step: int, shape: str = "8e-top1") -> dict:
    """The fields that, with variant, seed and rate, make a run: where on the scale, what shape, how long."""
    return dict(size=size, shape=shape, tokens=tokens, tokens_per_step=tokens_per_step)


def tuned(part, cell, arms, centre, factors, grid_seeds, seeds) -> dict:
    """A point whose arms each get their own grid (rates `centre` x `factors`, `centre` a rate or another point's
    cell, whose best rate per arm is taken; an arm it lacks takes `default`'s), then `seeds` at each arm's best."""
    return dict(
        how="tuned", part=part, cell=cell, arms=arms, centre=centre, factors=factors, grid_seeds=grid_seeds, seeds=seeds
    )


def at_best_of(part, cell, arms, source, seeds) -> dict:
    """A point run at the best rate per arm of another point (`source`, a cell), for `seeds`."""
    return dict(how="at", part=part, cell=cell, arms=arms, source=source, seeds=seeds)


def plan(kind: str) -> dict:
    """The study for "cpu" (this machine), "gpu" (one H200, bf16) or "quick" (tiny: the tests): run settings and
    its points in priority order."""
    if kind == "quick":
        base = _cell("q1", 6 * 64, 64)
        small = _cell("q2", 4 * 64, 64)
        arms = ["topk", "default"]
        return dict(
            kind=kind,
            seq=32,
            eval_batch=2,
            eval_batches=1,
            points=2,
            train_bytes=100_000,
            valid_bytes=20_000,
            probe_stride=8,
            study=[
                dict(
                    how="fair",
                    part="fair",
                    cell=base,
                    variants=arms,
                    lrs=[1e-3, 4e-3],
                    grid_seeds=[0, 1],
                    confirm_seeds=[2],
                ),
                tuned("scale", small, arms, base, [0.5, 2.0], [0], [0, 1]),
                at_best_of("scale", _cell("q2", 8 * 64, 64), arms, small, [0, 1]),
                at_best_of("batch", _cell("q1", 8 * 64, 64), arms, base, [0, 1]),
                tuned("batch", _cell("q1", 8 * 64, 256), arms, base, [1.0, 2.0], [0], [0, 1]),
                tuned(
                    "fine",
                    _cell("q2", 4 * 64, 64, "32e-top4-shared"),
                    ["topk", "default_router_prob"],
                    small,
                    [0.5, 2.0],
                    [0],
                    [0, 1],
                ),
            ],
        )
    if kind == "gpu":
        arms, seeds, tps = ["topk", "default"], [0, 1, 2], 32_768
        return dict(
            kind=kind,
            device="cuda",
            bf16=True,
            seq=512,
            eval_batch=16,
            eval_batches=4,
            points=6,
            train_bytes=4_000_000,
            valid_bytes=1_000_000,
            probe_stride=64,
            # smallest first, each grid centred at a guess (lower for wider models); 256 and 128 steps
            study=[
                tuned("gpu", _cell(size, tokens, tps), arms, centre, [1.0, 0.5, 2.0], [0], seeds)
                for size, tokens, centre in (
                    ("g-s", 8_388_608, 2e-3),
                    ("g-m", 8_388_608, 1e-3),
                    ("g-l", 4_194_304, 5e-4),
                )
            ],
        )
    if kind != "cpu":
        raise ValueError(f"study plan {kind!r}: choose from 'cpu', 'gpu', 'quick'")
    fair = _cell("s", 819_200, 1024)  # 800 steps of 1024 tokens (twice the demo's tokens)
    xs, m, large = _cell("xs", 819_200, 1024), _cell("m", 409_600, 1024), _cell("l", 409_600, 1024)
    arms, factors, seeds = ["topk", "default"], [1.0, 0.5, 2.0], [0, 1, 2]  # grids run middle rate first
    # each size's first budget also runs item 5's estimator fix (defaults averaged over tokens that did not pick the
    # expert), which ties top-K at the base size (benchmarks/balance.py): does the tie hold with scale?
    first = [*arms, "unrouted"]
    fine_arms = ["topk", "default", "default_router_prob"]
    return dict(
        kind=kind,
        seq=128,
        eval_batch=8,
        eval_batches=4,
        points=6,
        train_bytes=4_000_000,
        valid_bytes=1_000_000,
        probe_stride=64,
        study=[
            dict(
                how="fair",
                part="fair",
                cell=fair,
                variants=["topk", "default", "gradient"],
                lrs=[2e-3, 4e-3, 1e-3, 8e-3, 5e-4, 1.6e-2],  # run in this order: top-K's earlier best first
                grid_seeds=[0, 1],
                confirm_seeds=[2, 3, 4],
            ),
            tuned("scale", xs, first, fair, factors, [0], seeds),
            tuned("scale", m, first, fair, factors, [0], seeds),
            tuned("scale", large, first, m, factors, [0], seeds),
            at_best_of("scale", _cell("xs", 3_276_800, 1024), arms, xs, seeds),
            at_best_of("scale", _cell("s", 3_276_800, 1024), arms, fair, seeds),
            # the fine-grained shapes and the batch points before the last second budgets: they have no data yet,
            # where two sizes already have two budgets
            *(
                tuned("fine", _cell("m", 409_600, 1024, shape), fine_arms, m, factors, [0], seeds)
                for shape in ("32e-top1", "32e-top4", "32e-top4-shared")
            ),
            at_best_of("batch", _cell("s", 1_638_400, 1024), arms, fair, seeds),
            tuned("batch", _cell("s", 1_638_400, 8192), arms, fair, [2.0, 1.0, 4.0], [0], seeds),
            tuned("batch", _cell("s", 1_638_400, 32768), arms, fair, [4.0, 2.0, 8.0], [0], seeds),
            at_best_of("scale", _cell("m", 1_638_400, 1024), arms, m, seeds),
            at_best_of("scale", _cell("l", 1_638_400, 1024), arms, large, seeds),
        ],
    )


# ----------------------------------------------------------------------------------------------------------------
# Results, by cell (size, shape, tokens, tokens per step) -> variant -> rate -> seed


def cell_key(fields: dict) -> tuple:
    return (fields["size"], fields["shape"], fields["tokens"], fields["tokens_per_step"])


class Results:
    """The finished runs of a results file, indexed for choosing rates and for the report."""

    def __init__(self, records: list[dict]):
        self.runs: dict = {}
        # runs per code version and kernel set (None: written before runs recorded it); pairs across versions are
        # not exact
        self.code_versions = dict(Counter(run_version(record["result"]) for record in records))
        for record in records:
            key = record["key"]
            by_lr = self.runs.setdefault(cell_key(key), {}).setdefault(key["variant"], {})
            by_lr.setdefault(key["lr"], {})[key["seed"]] = record["result"]

    def get(self, cell: dict, variant: str, lr: float, seed: int) -> dict | None:
        return self.runs.get(cell_key(cell), {}).get(variant, {}).get(lr, {}).get(seed)

    def finals(self, cell: dict, variant: str, lr: float, seeds) -> list[float] | None:
        """Final validation losses of these seeds (inf if diverged), or None if any has not run yet."""
        runs = [self.get(cell, variant, lr, seed) for seed in seeds]
        if any(r is None for r in runs):
            return None
        return [r["final_val"] if not r["diverged"] else math.inf for r in runs]

    def best_lr(self, cell: dict, variant: str, lrs, seeds) -> float | None:
        """The rate of `lrs` with the lowest mean final loss over `seeds`; None until all of them have run."""
        means = {}
        for lr in lrs:
            finals = self.finals(cell, variant, lr, seeds)
            if finals is None:
                return None
            means[lr] = statistics.fmean(finals)
        return min(means, key=means.get)

    def largest_stable_lr(self, cell: dict, variant: str, lrs, seeds) -> float | None:
        """The largest rate of `lrs` stable on every seed of `seeds` (the paper's rule; see `stable`), or None
        until all have run (or if none is stable)."""
        stable = []
        for lr in lrs:
            runs = [self.get(cell, variant, lr, seed) for seed in seeds]
            if any(r is None for r in runs):
                return None
            if all(self.is_stable(cell, seed, r) for seed, r in zip(seeds, runs, strict=True)):
                stable.append(lr)
        return max(stable) if stable else None

    def spike(self, cell: dict, seed: int, result: dict) -> float:
        """Loss spike of a run: the largest bump (`_spike`) of its windowed training loss minus the window-wise
        median of every run of the same cell and seed (which saw the same batches, so the batches' varying
        difficulty cancels); inf if it diverged."""
        own = _windows(result)
        if result["diverged"] or not all(map(math.isfinite, own)):
            return math.inf
        return _spike(own, self._reference(cell, seed))

    def _reference(self, cell: dict, seed: int) -> list[float]:
        curves = [
            _windows(r)
            for by_lr in self.runs.get(cell_key(cell), {}).values()
            for by_seed in by_lr.values()
            for s, r in by_seed.items()
            if s == seed and not r["diverged"]
        ]
        curves = [c for c in curves if all(map(math.isfinite, c))]
        return [statistics.median(c[i] for c in curves) for i in range(min(map(len, curves)))]

    def is_stable(self, cell: dict, seed: int, result: dict) -> bool:
        return self.spike(cell, seed, result) <= SPIKE_LIMIT


def run_version(result: dict) -> str | None:
    """A run's code version, with its kernel set where recorded (runs before 2026-12-05 lack it)."""
    code, kernels = result.get("code"), result.get("kernels")
    return f"{code} ({kernels})" if code and kernels else code


def _windows(result: dict) -> list[float]:
    return [loss for _, loss in sorted((int(step), loss) for step, loss in result["train_curve"].items())]


def _spike(curve: list[float], reference: list[float], warmup: int = 3, horizon: int = 3) -> float:
    """Height of the largest bump of curve - reference: how far a window rises above the lowest window on *each*
    side within `horizon` windows (the higher of the two), after the first `warmup` windows (5% warm-up = 2.5 of
    50). A run that only learns faster or slower than the reference makes no bump; a spike that recovers does."""
    excess = [a - b for a, b in zip(curve, reference, strict=False)]
    bumps = [
        excess[k] - max(min(excess[k - horizon : k]), min(excess[k + 1 : k + 1 + horizon]))
        for k in range(warmup + horizon, len(excess) - 1)
    ]
    return max(bumps, default=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Jobs


def _rate(value: float) -> float:
    return float(f"{value:.3g}")


def _job(part: str, cell: dict, variant: str, lr: float, seed: int) -> dict:
    return dict(part=part, **cell, variant=variant, seed=seed, lr=lr)


def point_of(study: list[dict], cell: dict) -> dict:
    for point in study:
        if cell_key(point["cell"]) == cell_key(cell):
            return point
    raise KeyError(f"no point of the study has cell {cell}")


def grid_rates(point: dict, study: list[dict], results: Results, dry: bool) -> dict[str, list[float]] | None:
    """Each arm's grid of rates at a point (None while a rate it is centred on is not known yet)."""
    if point["how"] == "fair":
        return {v: list(point["lrs"]) for v in point["variants"]}
    if point["how"] == "at":
        return {}
    out = {}
    for arm in point["arms"]:
        centre = point["centre"]
        if isinstance(centre, dict):
            source = point_of(study, centre)
            centre = chosen_rates(source, study, results, dry).get(arm if arm in _arms(source) else "default", {})
            centre = centre.get("best")
            if centre is None:
                return None
        out[arm] = _extend(point, arm, [_rate(centre * f) for f in point["factors"]], results)
    return out


def _extend(point: dict, arm: str, rates: list[float], results: Results) -> list[float]:
    """An arm's grid, widened by one step past whichever edge its best rate sits on (the step: the grid's spacing
    there), at most `MAX_EXTEND` times, so that a tuned arm's best rate is one with a worse rate on each side."""
    for _ in range(MAX_EXTEND):
        best = results.best_lr(point["cell"], arm, rates, point["grid_seeds"])
        ordered = sorted(rates)
        if best is None or len(ordered) < 2 or ordered[0] < best < ordered[-1]:
            break
        rates = rates + [
            _rate(best * ordered[-1] / ordered[-2] if best == ordered[-1] else best * ordered[0] / ordered[1])
        ]
    return rates


def _arms(point: dict) -> list[str]:
    return point["variants"] if point["how"] == "fair" else point["arms"]


def chosen_rates(point: dict, study: list[dict], results: Results, dry: bool = False) -> dict:
    """{arm: {"best": rate, "stable": largest stable rate}} of a point, from its grid (an "at" point: its source's);
    rates not yet known are None (in a dry run, the grid's middle rate, for cost estimates)."""
    if point["how"] == "at":
        return chosen_rates(point_of(study, point["source"]), study, results, dry)
    grids = grid_rates(point, study, results, dry)
    seeds = point["grid_seeds"]
    out = {}
    for arm in _arms(point):
        lrs = grids[arm] if grids else None
        best = results.best_lr(point["cell"], arm, lrs, seeds) if lrs else None
        stable = results.largest_stable_lr(point["cell"], arm, lrs, seeds) if lrs else None
        if dry:
            middle = lrs[len(lrs) // 2] if lrs else 1e-3
            best, stable = best or middle, stable or (middle * 1.01)  # distinct: an upper bound on the runs
        out[arm] = {"best": best, "stable": stable}
    return out


def stages(p: dict, results_now, dry: bool = False):
    """(name, point, jobs) in priority order; `jobs` are the runs whose rates are known (a point's seeds: those of
    the arms whose best rate is known), None while none is. `results_now()` returns the Results so far (read again
    before each stage that chooses rates)."""
    study = p["study"]
    for point in study:
        cell, part = point["cell"], point["part"]
        name = f"{part} {cell['size']} {cell['shape']} {cell['tokens']:,} tokens {cell['tokens_per_step']}/step"
        yielded = None
        while point["how"] != "at":  # the grid, then once more for each edge it was widened past
            grids = grid_rates(point, study, results_now(), dry)
            if yielded is not None and grids == yielded:
                break
            jobs = None
            if grids is not None:  # seed by seed, rate by rate (in the plan's order: the likeliest best first)
                jobs = [
                    _job(part, cell, arm, grids[arm][i], seed)
                    for seed in point["grid_seeds"]
                    for i in range(max(map(len, grids.values())))
                    for arm in _arms(point)
                    if i < len(grids[arm])
                ]
            yield f"{name}: grid" + (", widened past its edge" if yielded else ""), point, jobs
            if grids is None:
                break
            yielded = grids
        rates = chosen_rates(point, study, results_now(), dry)
        if point["how"] == "fair":
            wanted = {arm: [r["best"], r["stable"]] for arm, r in rates.items()}
            seeds = point["confirm_seeds"]
        else:
            wanted = {arm: [rates[arm if arm in rates else "default"]["best"]] for arm in point["arms"]}
            seeds = point["seeds"]
        wanted = {arm: lrs for arm, lrs in wanted.items() if lrs[0] is not None}  # an arm whose grid is done
        if not wanted:
            yield f"{name}: seeds", point, None
            continue
        jobs = [
            _job(part, cell, arm, lr, seed)
            for seed in seeds
            for arm, lrs in wanted.items()
            for lr in dict.fromkeys(lr for lr in lrs if lr is not None)
        ]
        # seeds already run in the grid at that rate are the same jobs under the same key: dropped here
        yield f"{name}: seeds", point, list({canonical(j): j for j in jobs}.values())


def cost(job: dict) -> float:
    """Estimated CPU seconds of a run (relative units for sizes without a measured step time)."""
    per_1k = CPU_SECONDS_PER_1K.get(job["size"], 1e-3 * SIZES[job["size"]]["hidden"])
    return per_1k * job["tokens"] / 1024 * EVAL_OVERHEAD


def train(p: dict, job: dict) -> dict:
    """One run of the study (benchmarks/method.py's train_run), with its parameter counts."""
    s = dict(
        model=SIZES[job["size"]],
        batch=job["tokens_per_step"] // p["seq"],
        seq=p["seq"],
        points=p["points"],
        eval_batch=p["eval_batch"],
        eval_batches=p["eval_batches"],
        train_bytes=p["train_bytes"],
        valid_bytes=p["valid_bytes"],
        probe_stride=p["probe_stride"],
        device=p.get("device", "cpu"),
        bf16=p.get("bf16", False),
    )
    steps = job["tokens"] // job["tokens_per_step"]
    result = method.train_run(
        dict(s=s, shape=job["shape"], variant=job["variant"], seed=job["seed"], lr=job["lr"], steps=steps)
    )
    return {**result, "code": code_version(), "kernels": kernels(s["device"])}


def kernels(device: str) -> str:
    """What torch computes with here beyond `code`: the CPU's kernel set (AVX2, AVX512, ...) or the GPU. Two
    machines with the same code may differ in it, and then their runs' numbers differ (benchmarks/reproduce.py)."""
    import torch

    if device == "cuda":
        return f"cuda {torch.cuda.get_device_name()}"
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


def _describe(job: dict, result: dict) -> str:
    return (
        f"{job['part']} {job['size']} {job['shape']} {job['tokens']:,}/{job['tokens_per_step']} {job['variant']} "
        f"lr {job['lr']:g} seed {job['seed']}: val {result['final_val']:.4f} ({result['train_seconds']:.0f} s)"
    )


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def estimate(p: dict) -> list[dict]:
    """Per point of the plan: runs (an upper bound where best and largest stable rates may coincide, before any grid
    is widened past an edge: at most `MAX_EXTEND` more runs per arm and grid seed) and estimated core-hours."""
    out, seen = [], set()
    for name, point, jobs in stages(p, lambda: Results([]), dry=True):
        jobs = [job for job in jobs if canonical(job) not in seen]  # a grid run reused at the chosen rate
        seen.update(map(canonical, jobs))
        if out and out[-1]["point"] is point:
            row = out[-1]
        else:
            row = {"point": point, "name": name.rsplit(":", 1)[0], "runs": 0, "core_hours": 0.0}
            out.append(row)
        row["runs"] += len(jobs)
        row["core_hours"] += sum(map(cost, jobs)) / 3600
    return out


def left(p: dict, records: list[dict], running: list[dict] = ()) -> tuple[list[dict], list[str]]:
    """What is left of the plan: the known runs not finished nor in `running`, in priority order, and the stages
    still waiting for rates (names)."""
    results, busy = Results(records), {canonical(r["key"]) for r in records} | set(map(canonical, running))
    todo, waiting = [], []
    for name, _, jobs in stages(p, lambda: results):
        if jobs is None:
            waiting.append(name)
        for job in jobs or []:
            if canonical(job) not in busy:
                busy.add(canonical(job))  # a grid run reused at the chosen rate is listed once
                todo.append(job)
    return todo, waiting


def run(
    kind: str = "cpu",
    results_path: str | None = None,
    workers: int = 1,
    deadline_s: float | None = None,
    log=_log,
) -> Results:
    """Run (or resume) the study; returns the Results in the file at the end. Whenever a worker is free it starts
    the first known run (`left`) of the results so far."""
    import functools

    p = plan(kind)
    path = Path(results_path or RESULTS["gpu" if kind == "gpu" else "cpu"])
    byte_corpus(p["train_bytes"], "train"), byte_corpus(p["valid_bytes"], "validation")  # read once, shared
    announced = set()  # points whose first run has started

    def next_job(running: list[dict]) -> dict | None:
        todo, _ = left(p, load_results(path), running)
        if todo and (todo[0]["part"], cell_key(todo[0])) not in announced:
            job = todo[0]
            announced.add((job["part"], cell_key(job)))
            log(f"starting {job['part']} {job['size']} {job['shape']} {job['tokens']:,}/{job['tokens_per_step']}")
        return todo[0] if todo else None

    def describe(job: dict, result: dict) -> str:
        todo, waiting = left(p, load_results(path))
        hours = sum(map(cost, todo)) / 3600
        return (
            f"{_describe(job, result)}; left: {len(todo)} known runs (~{hours:.1f} core-hours), {len(waiting)} stages"
        )

    log(f"the study in {path}: {len(load_results(path))} runs finished")
    n = run_as_ready(next_job, functools.partial(train, p), path, workers, log, describe, deadline_s)
    todo, waiting = left(p, load_results(path))
    rest = f"left: {len(todo)} known runs and {len(waiting)} stages; rerun to resume" if todo or waiting else "done"
    log(f"{n} runs this time; {rest}")
    return Results(load_results(path))


def render_plan(p: dict) -> str:
    """The plan as a markdown table: what each point runs, its runs and estimated core-hours, cumulative."""
    rows, total = [], 0.0
    for row in estimate(p):
        total += row["core_hours"]
        point = row["point"]
        arms = ", ".join(_arms(point))
        if point["how"] == "fair":
            what = f"{len(point['lrs'])} rates x {len(point['grid_seeds'])} seeds, "
            what += f"+{len(point['confirm_seeds'])} seeds at best and largest stable"
        elif point["how"] == "tuned":
            what = f"grid x{'/'.join(f'{f:g}' for f in point['factors'])}, then seeds {point['seeds']} at best"
        else:
            what = f"seeds {point['seeds']} at the rates of {point['source']['size']} {point['source']['tokens']:,}"
        rows.append(f"| {row['name']} | {arms} | {what} | {row['runs']} | {row['core_hours']:.2f} | {total:.2f} |")
    unit = "core-hours" if p["kind"] == "cpu" else "relative cost (no measured step time)"
    header = f"| point | arms | runs of | runs | {unit} | cumulative |\n|---|---|---|---|---|---|\n"
    return header + "\n".join(rows) + "\n"
