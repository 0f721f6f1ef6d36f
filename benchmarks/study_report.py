"""Every table and the plot of the study (benchmarks/study.py), from its results file, finished or not.

    python -m benchmarks.study_report [RESULTS] [--kind cpu|gpu|quick] [--plot PNG]

Defaults: benchmarks/results/study.jsonl and the CPU plan; the plot goes to RESULTS with `_gap.png` for `.jsonl`.
Cells not yet run say so; intervals (two-sided 95% Student t over paired seeds) appear where two or more seeds are
paired. Rates are chosen as the study chooses them (benchmarks/study.py: best = lowest mean final validation loss
over the grid's seeds; largest stable = the largest rate whose grid runs neither diverged nor spiked).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from . import study
from .method import T_975, paired
from .runs import load_results

NOT_RUN = "not yet run"


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def gap_cell(d: dict | None) -> str:
    if not d:
        return NOT_RUN
    interval = f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else ""
    mixed = f", {d['mixed']} across versions †" if d.get("mixed") else ""
    return f"{d['mean']:+.4f}{interval} (n={len(d['per_seed'])}, {d['better']} better{mixed})"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _seeds_at(results: study.Results, cell: dict, arm: str, lr: float | None) -> dict[int, dict]:
    if lr is None:
        return {}
    return results.runs.get(study.cell_key(cell), {}).get(arm, {}).get(lr, {})


def compare(results: study.Results, cell: dict, arm: str, arm_lr, topk_lr) -> dict | None:
    """Paired difference arm minus top-K (final validation loss, each at its own rate) over the seeds both have;
    `mixed`: how many of those pairs come from two code versions or kernel sets (not exact pairs)."""
    mine, theirs = _seeds_at(results, cell, arm, arm_lr), _seeds_at(results, cell, "topk", topk_lr)
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    out = paired([mine[s]["final_val"] - theirs[s]["final_val"] for s in common])
    mixed = sum(study.run_version(mine[s]) != study.run_version(theirs[s]) for s in common)
    return out | {"seeds": common, "mixed": mixed}


def _load(runs: dict[int, dict]) -> str:
    loads = [statistics.fmean(r["expert_load"]) for r in runs.values() if r.get("expert_load")]
    return f"{_mean(loads):.2f}" if loads else "-"


def _cell_name(cell: dict) -> str:
    return f"{cell['size']} {cell['shape']}, {cell['tokens']:,} tokens, {cell['tokens_per_step']:,}/step"


def _tuned_at(p: dict, point: dict) -> dict:
    """The point whose grid chose a point's rates: itself, or an "at" point's source."""
    return study.point_of(p["study"], point["source"]) if point["how"] == "at" else point


def _grid(p: dict, point: dict, results: study.Results, arm: str) -> list[float]:
    """The rates an arm's best was chosen from at a point."""
    grids = study.grid_rates(_tuned_at(p, point), p["study"], results, dry=False) or {}
    return grids.get(arm if arm in grids else "default", [])


def _rate_mark(lr: float | None, grid: list[float]) -> str:
    """A chosen rate, with ↑ (↓) where it is its grid's highest (lowest): the best may lie beyond the grid."""
    if lr is None:
        return "?"
    edge = "" if not grid else "↑" if lr == max(grid) else "↓" if lr == min(grid) else ""
    return f"{lr:g}{edge}"


def progress(p: dict, results: study.Results) -> str:
    """Runs finished per point of the plan (planned: `study.estimate`'s, before any grid is widened)."""
    finished = {
        study.cell_key(point["cell"]): sum(
            len(seeds)
            for by_lr in results.runs.get(study.cell_key(point["cell"]), {}).values()
            for seeds in by_lr.values()
        )
        for point in p["study"]
    }
    rows = [
        [row["name"], finished[study.cell_key(row["point"]["cell"])], row["runs"], f"{row['core_hours']:.2f}"]
        for row in study.estimate(p)
    ]
    return _table(["point", "runs finished", "runs planned (before widening)", "estimated core-hours"], rows)


def lr_table(p: dict, point: dict, results: study.Results) -> str:
    """Final validation loss per arm and rate (mean over the grid's seeds), the chosen rates marked."""
    grids = study.grid_rates(point, p["study"], results, dry=False) or {}
    chosen = study.chosen_rates(point, p["study"], results)
    lrs = sorted({lr for rates in grids.values() for lr in rates})
    seeds = point["grid_seeds"]
    rows = []
    for arm in study._arms(point):
        row = [arm]
        for lr in lrs:
            if lr not in grids.get(arm, []):
                row.append("")
                continue
            runs = [results.get(point["cell"], arm, lr, s) for s in seeds]
            done = [r for r in runs if r is not None]
            if not done:
                row.append(NOT_RUN)
                continue
            text = f"{_mean([r['final_val'] for r in done]):.4f}"
            text += "" if len(done) == len(seeds) else f" ({len(done)}/{len(seeds)} seeds)"
            stable = (results.is_stable(point["cell"], s, r) for s, r in zip(seeds, runs, strict=True) if r)
            text += " ✗" if not all(stable) else ""
            text += " **best**" if chosen[arm]["best"] == lr else ""
            text += " (largest stable)" if point["how"] == "fair" and chosen[arm]["stable"] == lr else ""
            row.append(text)
        rows.append(row)
    return _table(["arm", *[f"LR {lr:g}" for lr in lrs]], rows)


def same_rate_table(point: dict, results: study.Results) -> str:
    """Paired gap to top-K at the same rate, per rate (the grid's seeds)."""
    lrs = sorted(point["lrs"])
    rows = []
    for arm in point["variants"][1:]:
        rows.append([arm, *[gap_cell(compare(results, point["cell"], arm, lr, lr)) for lr in lrs]])
    return _table(["arm minus top-K", *[f"LR {lr:g}" for lr in lrs]], rows)


def fair_comparison(p: dict, point: dict, results: study.Results) -> str:
    chosen = study.chosen_rates(point, p["study"], results)
    rows = []
    for rule, label in (("best", "each at its best rate"), ("stable", "each at its largest stable rate")):
        for arm in point["variants"][1:]:
            arm_lr, topk_lr = chosen[arm][rule], chosen["topk"][rule]
            d = compare(results, point["cell"], arm, arm_lr, topk_lr)
            rate = lambda lr: "?" if lr is None else f"{lr:g}"  # noqa: E731
            mine = _seeds_at(results, point["cell"], arm, arm_lr)
            theirs = _seeds_at(results, point["cell"], "topk", topk_lr)
            rows.append(
                [
                    label,
                    arm,
                    f"{rate(arm_lr)} vs {rate(topk_lr)}",
                    f"{_mean([r['final_val'] for r in mine.values()]):.4f}" if mine else NOT_RUN,
                    f"{_mean([r['final_val'] for r in theirs.values()]):.4f}" if theirs else NOT_RUN,
                    gap_cell(d),
                    ", ".join(f"{x:+.3f}" for x in d["per_seed"]) if d else "-",
                    f"{_load(mine)} vs {_load(theirs)}",
                ]
            )
    header = ["comparison", "arm", "LR (arm vs top-K)", "arm val", "top-K val", "arm minus top-K"]
    return _table([*header, "per seed", "load (arm vs top-K)"], rows)


def _best_so_far(p: dict, point: dict, results: study.Results, arm: str) -> tuple[float | None, str]:
    """An arm's best rate at a point and its mark (`_rate_mark`); until its grid (widened or not) has run, the best of
    the rates that have, marked `*`."""
    grid = _grid(p, point, results, arm)
    best = study.chosen_rates(point, p["study"], results)[arm]["best"]
    if best is not None:
        return best, _rate_mark(best, grid)
    source = _tuned_at(p, point)
    done = [lr for lr in grid if results.finals(source["cell"], arm, lr, source["grid_seeds"]) is not None]
    best = results.best_lr(source["cell"], arm, done, source["grid_seeds"]) if done else None
    return best, _rate_mark(best, done) + ("*" if best is not None else "")


def gap_points(p: dict, results: study.Results, parts=("fair", "scale", "gpu"), arm: str = "default") -> list[dict]:
    """An arm (the paper's form by default) minus top-K, each at its own best rate, per 8e-top1 point of these parts
    that runs the arm."""
    out = []
    for point in p["study"]:
        cell = point["cell"]
        if point["part"] not in parts or cell["shape"] != "8e-top1":
            continue
        if arm not in study._arms(point):
            continue
        (topk, topk_mark), (mine, mine_mark) = (_best_so_far(p, point, results, a) for a in ("topk", arm))
        d = compare(results, cell, arm, mine, topk)
        runs = _seeds_at(results, cell, "topk", topk)
        active = next(iter(runs.values()))["active_params"] if runs else None
        out.append(
            dict(
                point=point,
                cell=cell,
                gap=d,
                rates=(topk_mark, mine_mark),
                params=next(iter(runs.values()))["params"] if runs else None,
                compute=6 * active * cell["tokens"] if active else None,
            )
        )
    return out


def fit_trend(points: list[dict]) -> dict | None:
    """Least squares of the mean gap on log10(compute) over the points with a gap, with a 95% t interval on the
    slope (n - 2 degrees of freedom); None with fewer than 3 points."""
    xy = [(math.log10(q["compute"]), q["gap"]["mean"]) for q in points if q["gap"] and q["compute"]]
    if len(xy) < 3:
        return None
    mx, my = _mean([x for x, _ in xy]), _mean([y for _, y in xy])
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    slope = sum((x - mx) * (y - my) for x, y in xy) / sxx
    intercept = my - slope * mx
    residual = sum((y - intercept - slope * x) ** 2 for x, y in xy)
    half = T_975.get(len(xy) - 2, 1.96) * math.sqrt(residual / (len(xy) - 2) / sxx)
    crossing = 10 ** (-intercept / slope) if slope else None
    return dict(
        slope=slope,
        slope_ci95=[slope - half, slope + half],
        intercept=intercept,
        crossing=crossing,
        n=len(xy),
        lo=min(x for x, _ in xy),
        hi=max(x for x, _ in xy),
    )


def trend_sentence(trend: dict | None) -> str:
    if trend is None:
        return "Too few scaling points have run to fit a trend (3 needed)."
    span = f"measured from {10 ** trend['lo']:.1e} to {10 ** trend['hi']:.1e} FLOPs"
    direction = "shrinks" if trend["slope"] < 0 else "grows"
    lo, hi = trend["slope_ci95"]
    sure = "excludes" if lo > 0 or hi < 0 else "includes"
    text = (
        f"Fitted over {trend['n']} points ({span}): the gap (Default minus top-K, nats/byte) changes by "
        f"{trend['slope']:+.4f} per tenfold compute (95% interval [{lo:+.4f}, {hi:+.4f}], which {sure} zero)"
    )
    if trend["crossing"] is None:
        return text + ", flat: no crossing."
    if sure == "includes":  # a crossing of a line whose slope may be zero is an artefact of the noise
        return text + ": no trend this range can tell from none, so no crossing to read from it."
    x0 = math.log10(trend["crossing"])
    where = (
        "inside the measured range"
        if trend["lo"] <= x0 <= trend["hi"]
        else "beyond the measured range (an extrapolation)"
        if x0 > trend["hi"]
        else "below the measured range"
    )
    ahead = "Default ahead beyond it" if trend["slope"] < 0 else "top-K ahead beyond it"
    return (
        text
        + f"; the line {direction} with compute and crosses zero at {trend['crossing']:.1e} FLOPs, {where} ({ahead})."
    )


def scaling_table(points: list[dict], arm: str = "Default") -> str:
    rows = []
    for q in sorted(points, key=lambda q: q["compute"] or math.inf):
        cell = q["cell"]
        rows.append(
            [
                cell["size"],
                f"{q['params'] / 1e6:.2f}M" if q["params"] else "?",
                f"{cell['tokens']:,}",
                f"{cell['tokens_per_step']:,}",
                f"{q['compute']:.2e}" if q["compute"] else "?",
                " / ".join(q["rates"]),
                gap_cell(q["gap"]),
            ]
        )
    header = ["size", "params", "tokens", "tokens/step", "compute (6·active·tokens)", f"LR top-K / {arm}"]
    return _table([*header, f"{arm} minus top-K"], rows)


def grids_table(p: dict, parts: tuple[str, ...], results: study.Results) -> str:
    """Each arm's grid at every tuned point of these parts: final validation loss per rate (mean over the grid's
    seeds), the best in bold, ✗ where a run was unstable."""
    rows = []
    for point in p["study"]:
        if point["part"] not in parts or point["how"] != "tuned":
            continue
        chosen = study.chosen_rates(point, p["study"], results)
        for arm in point["arms"]:
            cells = []
            for lr in sorted(_grid(p, point, results, arm)):
                runs = [results.get(point["cell"], arm, lr, seed) for seed in point["grid_seeds"]]
                done = [(seed, r) for seed, r in zip(point["grid_seeds"], runs, strict=True) if r]
                if not done:
                    cells.append(f"{lr:g}: -")
                    continue
                text = f"{lr:g}: {_mean([r['final_val'] for _, r in done]):.4f}"
                text += "" if all(results.is_stable(point["cell"], seed, r) for seed, r in done) else " ✗"
                cells.append(f"**{text}**" if chosen[arm]["best"] == lr else text)
            rows.append([_cell_name(point["cell"]), arm, " · ".join(cells) if cells else NOT_RUN])
    return _table(["point", "arm", "rate: final validation loss (grid seeds; best in bold)"], rows)


def arms_table(p: dict, part: str, results: study.Results) -> str:
    """Every arm against top-K, each at its own best rate, at each point of a part (the 32-expert rows)."""
    rows = []
    for point in p["study"]:
        if point["part"] != part:
            continue
        best = {arm: _best_so_far(p, point, results, arm) for arm in point["arms"]}
        for arm in point["arms"]:
            lr, mark = best[arm]
            runs = _seeds_at(results, point["cell"], arm, lr)
            d = None if arm == "topk" else compare(results, point["cell"], arm, lr, best["topk"][0])
            rows.append(
                [
                    _cell_name(point["cell"]),
                    arm,
                    mark,
                    f"{_mean([r['final_val'] for r in runs.values()]):.4f} ({len(runs)})" if runs else NOT_RUN,
                    "-" if arm == "topk" else gap_cell(d),
                    _load(runs),
                ]
            )
    return _table(["point", "arm", "best LR", "val (seeds)", "minus top-K", "load max/mean"], rows)


def _yerr(gap: dict) -> list[list[float]] | None:
    """Matplotlib's error bar of a paired gap: its 95% interval around the mean (None with one seed)."""
    if not gap["ci95"]:
        return None
    return [[gap["mean"] - gap["ci95"][0]], [gap["ci95"][1] - gap["mean"]]]


def _hollow(axis, points: list[dict], marker: str, colour: str, label, nudge: float = 1.0) -> None:
    """Points shown beside the fitted ones (hollow markers, not fitted): gap with its interval at compute x nudge."""
    for q in points:
        if q["gap"] and q["compute"]:
            g = q["gap"]
            axis.errorbar(
                q["compute"] * nudge,
                g["mean"],
                yerr=_yerr(g),
                fmt=marker,
                mfc="none",
                capsize=3,
                color=colour,
                label=label(q),
            )


def plot(
    points: list[dict],
    batch: list[dict],
    trend: dict | None,
    path: str | Path,
    gpu: list[dict] = (),
    unrouted: list[dict] = (),
) -> None:
    """The gap against compute (`points`, fitted by `trend`; `gpu` and `unrouted`'s gaps beside them, not fitted) and
    against tokens per step (`batch`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [2, 1]})
    sizes = sorted({q["cell"]["size"] for q in points if q["params"]}, key=lambda s: study.SIZES[s]["hidden"])
    colours = plt.get_cmap("viridis")
    for q in sorted(points, key=lambda q: study.SIZES[q["cell"]["size"]]["hidden"]):
        if not q["gap"] or not q["compute"]:
            continue
        g = q["gap"]
        i = sizes.index(q["cell"]["size"])
        left.errorbar(
            q["compute"],
            g["mean"],
            yerr=_yerr(g),
            fmt="o",
            capsize=3,
            color=colours(0.85 * i / max(1, len(sizes) - 1)),
            label=f"{q['cell']['size']} ({q['params'] / 1e6:.2f}M)",
        )
        left.annotate(
            f"{q['cell']['tokens'] / 1e6:.2g}M tok",
            (q["compute"], g["mean"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    _hollow(
        left, gpu, "D", "C3", lambda q: f"GPU {q['cell']['size']} ({q['params'] / 1e6:.0f}M, 8 layers, not in the fit)"
    )
    # nudged right of the paper's form's point at the same compute
    _hollow(left, unrouted, "^", "C1", lambda q: "unrouted defaults (item 5's fix), not in the fit", nudge=1.15)
    if trend:
        xs = [trend["lo"] - 0.2, trend["hi"] + 0.5]
        left.plot(
            [10**x for x in xs],
            [trend["intercept"] + trend["slope"] * x for x in xs],
            "k--",
            lw=1,
            label=f"fit: {trend['slope']:+.3f} per 10x",
        )
    left.axhline(0, color="grey", lw=0.8)
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("training compute, FLOPs (6 x active parameters x tokens)")
    left.set_ylabel("Default minus top-K, validation nats/byte\n(each at its own best LR; < 0: Default better)")
    per_step = ", ".join(f"{t:,}" for t in sorted({q["cell"]["tokens_per_step"] for q in points}))
    left.set_title(f"Gap vs compute (8 experts, top-1, {per_step} tokens/step), 95% intervals")
    handles, labels = left.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    left.legend(unique.values(), unique.keys(), fontsize=8)
    for q in batch:
        if not q["gap"]:
            continue
        g = q["gap"]
        right.errorbar(q["cell"]["tokens_per_step"], g["mean"], yerr=_yerr(g), fmt="s", capsize=3, color="C1")
    if not any(q["gap"] for q in batch):
        right.text(0.5, 0.5, "not yet run", ha="center", transform=right.transAxes)
    right.axhline(0, color="grey", lw=0.8)
    right.set_xscale("log", base=2)
    ticks = sorted({q["cell"]["tokens_per_step"] for q in batch})
    right.set_xticks(ticks, [f"{t // 1024}k" for t in ticks])
    right.set_xlabel("tokens per step (equal total tokens)")
    right.set_title("Gap vs tokens per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(
    results_path: str | Path, kind: str = "cpu", plot_path: str | Path | None = None, gpu_path: str | Path | None = None
) -> str:
    """The report of a results file under the plan `kind`; `gpu_path`: a GPU plan's results, shown beside the CPU
    points (their own protocol: 8 layers, bf16, sequence 512), not fitted with them."""
    records = load_results(results_path)
    gpu = []
    if gpu_path and Path(gpu_path).exists():
        gpu = gap_points(study.plan("gpu"), study.Results(load_results(gpu_path)))
    return f"Results: `{results_path}` ({len(records)} runs).\n\n" + render_parts(
        study.plan(kind), study.Results(records), plot_path, gpu
    )


def render_parts(p: dict, results: study.Results, plot_path: str | Path | None = None, gpu: list[dict] = ()) -> str:
    """Progress, then every table of the plan `p` (and the plot, if `plot_path`); `gpu`: `gap_points` of a GPU
    plan, tabled and plotted beside the trend, not fitted."""
    out = ["Progress:\n", progress(p, results)]
    if len(results.code_versions) > 1:
        versions = ", ".join(f"{code or 'unrecorded'}: {n}" for code, n in results.code_versions.items())
        out.append(
            f"\n**The results file mixes code versions** (runs per version: {versions}; `benchmarks.common."
            "code_version`, with the kernel set, `study.kernels`, where recorded): a pair of runs from two versions "
            "differs by their numerics too (`python -m benchmarks.reproduce` measures by how much). A gap marked † "
            "has that many such pairs; rerun them to make them exact.\n"
        )
    fair = next((point for point in p["study"] if point["how"] == "fair"), None)
    if fair:
        out.append(
            f"\n#### Fair protocol: each arm's own learning-rate grid ({_cell_name(fair['cell'])})\n\nFinal validation "
            f"loss (nats/byte), mean over seeds {fair['grid_seeds']}; ✗ = unstable: a run diverged, or its training "
            f"loss (50 window means) minus the median run of its seed (same batches) rose and fell back by more than "
            f"{study.SPIKE_LIMIT} within 3 windows either side:\n"
        )
        out.append(lr_table(p, fair, results))
        out.append("\nPaired gap to top-K at the same rate (the grid's seeds):\n")
        out.append(same_rate_table(fair, results))
        out.append(
            "\n#### The fair comparison\n\n(a) each arm at its own best rate, (b) each at its largest stable rate "
            "(the paper's rule); paired by seed (same initial weights and batches), mean [95% t interval]:\n"
        )
        out.append(fair_comparison(p, fair, results))
    points = gap_points(p, results)
    trend = fit_trend(points)
    out.append(
        "\n#### The trend with scale\n\nThe paper's form minus top-K, each at its own best rate (a size's second "
        "budget uses its first budget's rates; ↑/↓: the best is the grid's highest/lowest rate, so it may lie beyond "
        "it; *: the best so far, the grid not finished or still to be widened past that edge), paired seeds:\n"
    )
    out.append(scaling_table(points))
    out.append("\n" + trend_sentence(trend) + "\n")
    unrouted = gap_points(p, results, arm="unrouted")
    if unrouted:
        out.append(
            "\n`unrouted` defaults (item 5's estimator fix: each expert's EMA over tokens that did not pick it) minus "
            "top-K, each at its own best rate, at the points that run it:\n"
        )
        out.append(scaling_table(unrouted, "unrouted"))
    if any(q["gap"] for q in gpu):
        out.append("\nThe GPU plan's points (8 layers, bf16, sequence 512; shown on the plot, not fitted):\n")
        out.append(scaling_table([q for q in gpu if q["gap"]]))
    if any(point["how"] == "tuned" for point in p["study"]):
        out.append("\nEach arm's grid at the scaling, batch and 32-expert points (one seed per rate):\n")
        out.append(grids_table(p, ("scale", "batch", "fine"), results))
    batch = gap_points(p, results, parts=("batch",))
    if batch:
        out.append("\n#### Tokens per step (equal total tokens)\n")
        out.append(scaling_table(batch))
    if any(point["part"] == "fine" for point in p["study"]):
        out.append("\n#### 32 experts and a shared expert (the paper's beta per configuration)\n")
        out.append(arms_table(p, "fine", results))
    if plot_path:
        plot(points, batch, trend, plot_path, gpu, unrouted)
        out.append(f"\n![gap vs compute]({Path(plot_path).name})\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study_report", description=__doc__)
    parser.add_argument("results", nargs="?", help="JSON-lines results (default: the plan's file)")
    parser.add_argument("--kind", choices=("cpu", "gpu", "quick"), default="cpu")
    parser.add_argument("--plot", help="PNG path (default: next to the results, *_gap.png)")
    parser.add_argument(
        "--gpu",
        default=study.RESULTS["gpu"],
        help="a GPU plan's results to show beside the CPU trend, not fitted (default: %(default)s, if it exists; "
        "'' for none)",
    )
    args = parser.parse_args(argv)
    path = Path(args.results or study.RESULTS["gpu" if args.kind == "gpu" else "cpu"])
    plot_path = args.plot or path.with_name(path.stem + "_gap.png")
    print(render(path, args.kind, plot_path, args.gpu if args.kind == "cpu" and args.gpu else None))


if __name__ == "__main__":
    main()
