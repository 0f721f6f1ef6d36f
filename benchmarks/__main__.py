"""Run the benchmarks: `python -m benchmarks [--quick] [--only speed,fidelity,quality,conversion] [--out FILE]`.

Writes a JSON file with the machine, the command, and every benchmark's results; `python -m benchmarks.report FILE...`
turns it into markdown tables (as in BENCHMARKS.md).
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

BENCHMARKS = ("speed", "fidelity", "quality", "conversion")


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny configurations, for smoke tests (< 60 s)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument(
        "--speed-parts", default="layer,steps,overhead,memory,scaling,generation", help="subset of the speed benchmark"
    )
    parser.add_argument("--out", default="BENCHMARKS-results.json", help="JSON output file")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)"
    )
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    torch.set_num_threads(args.threads)

    from .common import machine_info

    results: dict = {
        "command": shlex.join(["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine_info(),
        "benchmarks": {},
        "seconds": {},
    }
    for name in only:
        start = time.perf_counter()
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        if name == "speed":
            from . import speed

            parts = tuple(p.strip() for p in args.speed_parts.split(",") if p.strip())
            results["benchmarks"][name] = speed.run(quick=args.quick, parts=parts)
        elif name == "fidelity":
            from . import fidelity

            results["benchmarks"][name] = fidelity.run(quick=args.quick)
        elif name == "quality":
            from . import quality

            results["benchmarks"][name] = quality.run(quick=args.quick)
        elif name == "conversion":
            results["benchmarks"][name] = run_conversion(args.quick)
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
