"""Run the benchmarks: `python -m benchmarks [--quick] [--device cpu|cuda] [--only speed,fidelity,quality,conversion]
[--out FILE]`, `python -m benchmarks --only serving --checkpoint DIR` for a trained checkpoint, and
`python -m benchmarks --only method [--jobs 2]` for the paper's training protocol (about 1.5 h on two cores), and
`python -m benchmarks --only study [--jobs N] [--plan]` for issue 19's resumable study (benchmarks/study.py: hours;
one JSON line per finished run in benchmarks/results/study.jsonl, a rerun skips finished runs; `--device cuda` runs
its GPU plan in bf16; `python -m benchmarks.study_report` makes its tables and plot), and
`python -m benchmarks --only balance,finetune,defaults [--jobs N]` for issue 19's load-balance, fine-tuning and
demo-learning-rate studies (resumable the same way, in benchmarks/results/<name>_runs.jsonl; `python -m
benchmarks.balance` prints the first two's tables, `python -m benchmarks.defaults` the last's).

Writes a JSON file with the machine, the command, and every benchmark's results; `python -m benchmarks.report FILE...`
turns it into markdown tables (as in BENCHMARKS.md). `--device cuda` runs the speed benchmark on the GPU (bf16,
CUDA-event timing, peak GPU memory; see benchmarks/speed.py); the other benchmarks run on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = (
    "speed",
    "fidelity",
    "quality",
    "method",
    "conversion",
    "serving",
    "study",
    "balance",
    "finetune",
    "defaults",
)
# serving needs --checkpoint; method, study, balance, finetune and defaults take hours
DEFAULT = ("speed", "fidelity", "quality", "conversion")
ON_CUDA = ("speed", "serving", "study")  # the benchmarks that run on --device cuda


def run_conversion(quick: bool) -> dict:
    """The conversion engineer's benchmarks/conversion_memory.py, if present (its own output is kept verbatim)."""
    script = Path(__file__).with_name("conversion_memory.py")
    if not script.exists():
        return {"skipped": "benchmarks/conversion_memory.py not present"}
    cmd = [sys.executable, "-m", "benchmarks.conversion_memory", *(["--quick"] if quick else [])]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    result: dict = {"command": shlex.join(["python", *cmd[1:]]), "returncode": proc.returncode}
    lines = proc.stdout.strip().splitlines()
    try:
        result["result"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        try:
            result["result"] = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            result["stdout"] = proc.stdout[-4000:]
    if proc.returncode:
        result["stderr"] = proc.stderr[-4000:]
    return result


def main(argv: list[str] | None = None) -> dict:
    from .serving import EVAL_TOKENS

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny configurations, for smoke tests (< 60 s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where speed and serving run")
    parser.add_argument(
        "--only", help=f"comma-separated subset of {BENCHMARKS} (default: {', '.join(DEFAULT)}; on cuda: speed)"
    )
    parser.add_argument("--speed-parts", help="subset of the speed benchmark (default: all the device supports)")
    parser.add_argument("--checkpoint", metavar="DIR", help="serving: a trained Default MoE checkpoint folder")
    parser.add_argument(
        "--max-eval-tokens", type=int, default=EVAL_TOKENS, help=f"serving: validation tokens (default {EVAL_TOKENS})"
    )
    parser.add_argument("--seq-len", type=int, help="serving: sequence length (default: the checkpoint's training)")
    parser.add_argument("--out", default="BENCHMARKS-results.json", help="JSON output file")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="method, study, balance, finetune: runs at a time (one thread each)"
    )
    parser.add_argument("--method-shapes", help="method: comma-separated subset of 8e-top1,8e-top2,32e-top4")
    parser.add_argument("--method-confirm", help="method: comma-separated variants to confirm as well (e.g. unrouted)")
    parser.add_argument(
        "--balance-variants", help="balance: comma-separated variants to run (default: all, in balance.VARIANTS' order)"
    )
    parser.add_argument("--plan", action="store_true", help="study: print the plan and its estimated cost, run nothing")
    parser.add_argument(
        "--results",
        help="study: the JSON-lines results file (default benchmarks/results/study.jsonl, study_gpu.jsonl on cuda)",
    )
    parser.add_argument("--deadline", type=float, help="study, balance, finetune: start no run after this many seconds")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    only = only or (["speed"] if args.device == "cuda" else list(DEFAULT))
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    if args.device == "cuda":
        if set(only) - set(ON_CUDA):
            parser.error(f"{sorted(set(only) - set(ON_CUDA))} run on the CPU only; --device cuda runs {ON_CUDA}")
        if not torch.cuda.is_available() and not args.plan:
            parser.error("--device cuda: torch finds no CUDA device")
    if args.balance_variants:
        from .balance import VARIANTS

        unknown = sorted(set(args.balance_variants.split(",")) - set(VARIANTS))
        if unknown:
            parser.error(f"--balance-variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "serving" in only and not args.checkpoint:
        parser.error("the serving benchmark needs --checkpoint DIR (a trained Default MoE checkpoint folder)")
    if only == ["study"]:  # its own results file, appended run by run
        from . import study

        kind = "quick" if args.quick else "gpu" if args.device == "cuda" else "cpu"
        if args.plan:
            print(study.render_plan(study.plan(kind)))
            return {}
        torch.set_num_threads(args.threads)
        study.run(kind, args.results, workers=args.jobs, deadline_s=args.deadline)
        return {}
    if "study" in only:
        parser.error("--only study runs alone (it writes its own results file)")
    from . import speed

    speed_parts = speed.DEVICE_PARTS[args.device]
    if args.speed_parts:
        speed_parts = tuple(p.strip() for p in args.speed_parts.split(",") if p.strip())
    try:
        speed.check_parts(speed_parts, args.device)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)

    from .common import machine_info

    results: dict = {
        "command": shlex.join(["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine_info(args.device),
        "benchmarks": {},
        "seconds": {},
    }
    for name in only:
        start = time.perf_counter()
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        if name == "speed":
            results["benchmarks"][name] = speed.run(quick=args.quick, parts=speed_parts, device=args.device)
        elif name == "fidelity":
            from . import fidelity

            results["benchmarks"][name] = fidelity.run(quick=args.quick)
        elif name == "quality":
            from . import quality

            results["benchmarks"][name] = quality.run(quick=args.quick)
        elif name == "method":
            from . import method

            def save(partial, name=name):
                results["benchmarks"][name] = partial
                Path(args.out).write_text(json.dumps(results, indent=1, default=_json_default))

            shapes = args.method_shapes.split(",") if args.method_shapes else None
            extra = args.method_confirm.split(",") if args.method_confirm else None
            results["benchmarks"][name] = method.run(
                quick=args.quick, jobs=args.jobs, shapes=shapes, confirm_extra=extra, on_progress=save
            )
        elif name in ("balance", "finetune", "defaults"):
            import importlib

            module = importlib.import_module(f".{name}", __package__)
            # --quick writes next to --out, so that a smoke test leaves the committed results alone
            path = Path(args.out).with_suffix(f".{name}.jsonl") if args.quick else None
            extra = (
                {"variants": args.balance_variants.split(",")} if name == "balance" and args.balance_variants else {}
            )
            results["benchmarks"][name] = module.run(args.quick, args.jobs, path, deadline_s=args.deadline, **extra)
        elif name == "conversion":
            results["benchmarks"][name] = run_conversion(args.quick)
        elif name == "serving":
            from . import serving

            results["benchmarks"][name] = serving.run(
                args.checkpoint, args.max_eval_tokens, args.seq_len, device=args.device
            )
        results["seconds"][name] = round(time.perf_counter() - start, 1)
        Path(args.out).write_text(json.dumps(results, indent=1, default=_json_default))  # partial results survive
    results["machine"]["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    Path(args.out).write_text(json.dumps(results, indent=1, default=_json_default))
    print(f"[benchmarks] wrote {args.out} ({sum(results['seconds'].values()):.0f} s)", file=sys.stderr)
    return results


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()
