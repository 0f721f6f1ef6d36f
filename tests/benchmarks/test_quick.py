"""Smoke test of the benchmark suite: `python -m benchmarks --quick` runs and writes finite numbers.

No timing assertions: only the structure of the results and that every number in them is finite.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _numbers(value, path="$"):
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def test_quick_suite(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "speed,fidelity,quality", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert {"python", "torch", "transformers", "date_utc"} <= set(results["machine"])

    speed = results["benchmarks"]["speed"]
    assert {"moe_layer", "training_step", "saved_activations", "scaling", "generation"} <= set(speed)
    for shape in speed["training_step"].values():
        for dtype in ("fp32", "bf16"):
            assert {"default", "topk", "default_overhead", "topk_vs_mixtral"} <= set(shape[dtype])
        assert {"dense_st", "olmoe_form"} <= set(shape["fp32"])
    assert speed["generation"]["default"]["tokens_per_s"] > 0

    fidelity = results["benchmarks"]["fidelity"]
    for by_k in fidelity["by_k"].values():
        for variant in ("topk", "default"):
            assert all(-1.0001 <= c <= 1.0001 for c in by_k[variant]["mean_per_layer"])

    quality = results["benchmarks"]["quality"]
    assert set(quality["summary"]) == {"topk", "default_mean", "default_router_prob"}
    assert len(quality["runs"]) == 3 * len(quality["settings"]["seeds"])
    assert quality["lr_sweep"]

    numbers = list(_numbers(results["benchmarks"]))
    assert numbers
    bad = [(path, value) for path, value in numbers if not math.isfinite(value)]
    assert not bad, bad[:5]


def test_report_renders(tmp_path):
    """The markdown report renders from a results file (a minimal synthetic one is enough)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    results = {"command": "python -m benchmarks --quick", "quick": True, "machine": {"date_utc": "x"}, "benchmarks": {}}
    text = report.render([results])
    assert "python -m benchmarks --quick" in text
