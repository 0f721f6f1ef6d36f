"""Does this machine reproduce a study's runs? Rerun chosen finished runs of a results file here and compare.

    python -m benchmarks.reproduce --where part=scale,size=xs,variant=topk --jobs 2
    python -m benchmarks.reproduce --where part=fair,variant=topk,lr=0.004 --out reproduced.jsonl

A study run is keyed by its settings and records `code` (benchmarks.common.code_version: the model files, the
training code, torch and transformers), so the same key and code give the same numbers on the same machine. On
another CPU, torch may dispatch other kernels (AVX2 against AVX-512, `kernels` in a result), whose rounding differs;
over hundreds of steps that grows into a different final loss, so pairs of runs from two machines are not exact
pairs. This reruns the runs that match `--where` (every `field=value` must hold; values compared as text) with the
study's own training code, appends them to `--out` (resumable: a rerun skips what `--out` holds) and prints, for
every run in `--out`, its final loss recorded against here and their difference, then the paired gaps to top-K among
the reruns alone (where each arm of a point was rerun at one rate; call it once per arm and rate, same `--out`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

from . import study
from .runs import canonical, load_results, run_jobs


def matching(records: list[dict], where: dict[str, str]) -> list[dict]:
    """The keys of the records whose fields equal every `where` value (compared as text: `lr=0.004`)."""
    return [r["key"] for r in records if all(str(r["key"].get(field)) == value for field, value in where.items())]


def compare(recorded: list[dict], rerun: list[dict]) -> list[dict]:
    """Per rerun key: its recorded and rerun final loss and their difference (rerun minus recorded)."""
    before = {canonical(r["key"]): r["result"] for r in recorded}
    rows = []
    for record in rerun:
        old = before.get(canonical(record["key"]))
        if old is not None:
            recorded, here = old["final_val"], record["result"]["final_val"]
            rows.append(dict(key=record["key"], recorded=recorded, here=here, difference=here - recorded))
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| run | recorded | here | here minus recorded |", "|---|---|---|---|"]
    for row in rows:
        k = row["key"]
        name = f"{k['part']} {k['size']} {k['shape']} {k['tokens']:,}/{k['tokens_per_step']} {k['variant']}"
        name += f" lr {k['lr']:g} seed {k['seed']}"
        lines.append(f"| {name} | {row['recorded']:.4f} | {row['here']:.4f} | {row['difference']:+.4f} |")
    if rows:
        spread = [abs(r["difference"]) for r in rows]
        lines.append(f"\n{len(rows)} runs; |difference| mean {statistics.fmean(spread):.4f}, max {max(spread):.4f}")
    return "\n".join(lines)


def gaps(rerun: list[dict]) -> str:
    """The paired gaps (arm minus top-K, per cell, over common seeds) among the reruns alone, where each arm of a
    cell was rerun at one rate: every pair from this machine."""
    from . import study_report

    results, lines = study.Results(rerun), []
    for key, arms in results.runs.items():
        cell = dict(zip(("size", "shape", "tokens", "tokens_per_step"), key, strict=True))
        if "topk" not in arms or any(len(by_lr) != 1 for by_lr in arms.values()):
            continue
        rate = {arm: next(iter(by_lr)) for arm, by_lr in arms.items()}
        for arm in arms:
            if arm != "topk":
                d = study_report.compare(results, cell, arm, rate[arm], rate["topk"])
                name = f"{cell['size']} {cell['tokens']:,}/{cell['tokens_per_step']}"
                lines.append(f"| {name} | {arm} {rate[arm]:g} - top-K {rate['topk']:g} | {study_report.gap_cell(d)} |")
    head = ["\nPaired gaps among the reruns (each arm at one rate):\n", "| point | arms | gap |", "|---|---|---|"]
    return "\n".join(head + lines) if lines else ""


def _pairs(text: str) -> dict[str, str]:
    """`field=value,...` as a dict; at least one pair (an empty filter would rerun the whole file)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if not pairs or any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected field=value[,field=value...], got {text!r}")
    return dict(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=study.RESULTS["cpu"], help="default: %(default)s")
    parser.add_argument("--kind", choices=("cpu", "gpu", "quick"), default="cpu", help="the plan that wrote it")
    parser.add_argument("--where", type=_pairs, required=True, help="field=value[,field=value...]: runs to redo")
    parser.add_argument("--out", default="benchmarks/results/study_reproduced.jsonl", help="default: %(default)s")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    recorded = load_results(args.results)
    keys = matching(recorded, args.where)
    if not keys:
        fields = sorted({field for r in recorded for field in r["key"]})
        print(f"no run of {args.results} matches --where {args.where} (fields: {', '.join(fields)})", file=sys.stderr)
        return 2
    run_jobs(keys, functools.partial(study.train, study.plan(args.kind)), args.out, args.jobs)
    rerun = load_results(args.out)  # with earlier invocations' reruns into the same file
    print(render(compare(recorded, rerun)))
    print(gaps(rerun))
    return 0


if __name__ == "__main__":
    sys.exit(main())
