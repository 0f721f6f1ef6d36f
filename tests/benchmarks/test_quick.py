"""Smoke test of the benchmark suite: `python -m benchmarks --quick --device cpu` runs and writes finite numbers.

No timing assertions: only the structure of the results, that every number in them is finite, and, for the serving
benchmark, what the losses must satisfy whatever the machine. The GPU benchmark (`--device cuda`) cannot run here:
its plan (bf16 only, the same parts) runs on the CPU, its full-size models are built on the meta device, and the
report renders its output.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import report, speed  # noqa: E402


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


def serving_checkpoint(folder: Path) -> Path:
    """A micro Default MoE checkpoint with non-zero defaults, exportable to Mixtral, and its tokenizer."""
    from default_moe import DefaultMoeForCausalLM
    from default_moe.training.data import builtin_corpus, train_tokenizer
    from default_moe.training.trainer import preset_config

    tokenizer = train_tokenizer(builtin_corpus("train", max_chars=20_000), vocab_size=300)
    torch.manual_seed(0)
    model = DefaultMoeForCausalLM(preset_config("micro", vocab_size=len(tokenizer), norm_topk_prob=True))
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.default_outputs.ema, std=0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_quick_suite(tmp_path):
    out = tmp_path / "results.json"
    checkpoint = serving_checkpoint(tmp_path / "checkpoint")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = ["--quick", "--device", "cpu", "--only", "speed,fidelity,quality,serving", "--out", str(out)]
    command += ["--checkpoint", str(checkpoint), "--seq-len", "32", "--max-eval-tokens", "512"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *command],
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

    serving = results["benchmarks"]["serving"]
    losses = serving["losses"]
    assert serving["validation"] == {"sequences": 16, "sequence_length": 32, "tokens": 512}
    assert losses["defaults_on"] != losses["defaults_off"]  # the defaults are non-zero
    # The Mixtral export is the top-K model, i.e. ours with the defaults off; OLMoE and FlexOlmo refuse this model.
    assert serving["exports"]["mixtral"] == "MixtralForCausalLM"
    assert losses["export_mixtral"] == pytest.approx(losses["defaults_off"], abs=1e-5)
    assert set(losses) == {"defaults_on", "defaults_off", "export_mixtral"}
    assert serving["cost_of_dropping_defaults"] == losses["defaults_off"] - losses["defaults_on"]

    numbers = list(_numbers(results["benchmarks"]))
    assert numbers
    bad = [(path, value) for path, value in numbers if not math.isfinite(value)]
    assert not bad, bad[:5]
    text = report.render([results])
    assert "### Serving with and without the defaults" in text
    assert "Exports the checkpoint does not allow: olmoe" in text


def test_quick_method(tmp_path):
    """`--only method --quick`: every phase of the protocol runs, pairs by seed, and renders."""
    out = tmp_path / "method.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--only", "method", "--method-confirm", "unrouted"]
    cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    method = json.loads(out.read_text())["benchmarks"]["method"]
    assert list(method["phases"]) == ["lr_grid", "screen", "stress", "confirm"]
    assert float(method["lr"]) in method["settings"]["lr_grid"]
    winner = method["screen_winner"]
    assert winner in set(method["variants"]) - {"topk", "default"}
    ((_, confirm),) = method["phases"]["confirm"]["summary_by_lr"].items()
    for variants in confirm.values():
        assert list(variants) == list(dict.fromkeys(["topk", winner, "default", "unrouted"]))
        for variant in (winner, "default"):
            paired = variants[variant]["paired_diff_vs_topk"]
            assert len(paired["per_seed"]) == len(method["settings"]["confirm_seeds"])
            assert paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1]
        assert all(-1.0001 <= c <= 1.0001 for c in variants[winner]["cosine_own_per_layer"])
        assert variants["topk"]["expert_load_max_over_mean"] >= 1.0
    bad = [(path, value) for path, value in _numbers(method) if not math.isfinite(value)]
    assert not bad, bad[:5]
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    assert "Confirmation (" in report.render([json.loads(out.read_text())])


def test_report_renders(tmp_path):
    """The markdown report renders from a results file (a minimal synthetic one is enough)."""
    results = {"command": "python -m benchmarks --quick", "quick": True, "machine": {"date_utc": "x"}, "benchmarks": {}}
    text = report.render([results])
    assert "python -m benchmarks --quick" in text


@pytest.fixture
def one_thread():
    """One torch thread, as `python -m benchmarks` runs (several threads on a busy machine wait at barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_plan_runs_on_the_cpu(one_thread):
    """`--device cuda --quick`'s plan (bf16 only, training steps and generation) with the device set to the CPU:
    everything but the CUDA clock and memory counters. Its results render as the GPU tables, once the fields only
    a GPU run writes (peak memory, the GPU's name) are filled in."""
    s = speed.settings(True, "cuda")
    assert s["dtypes"] == ["bf16"] and s["warmup"] >= 2
    on_cpu = s | {"device": "cpu"}
    results = {"settings": s, "training_step": speed.training_steps(on_cpu), "generation": speed.generation(on_cpu)}
    for shape in results["training_step"].values():
        assert set(shape) == {"peer_implementation", "bf16"}
        for name in ("default", "topk", f"mixtral_{shape['peer_implementation']['best']}"):
            assert math.isfinite(shape["bf16"][name]["median_s"])
            shape["bf16"][name]["peak_memory_bytes"] = 2**30
    assert results["generation"]["default"]["tokens_per_s"] > 0
    machine = {"gpu": "a GPU", "gpu_memory_bytes": 2**37, "cuda": "x", "date_utc": "x"}
    command = "python -m benchmarks --device cuda --quick"
    text = report.render([{"command": command, "machine": machine, "benchmarks": {"speed": results}}])
    assert "Machine: a GPU (128 GiB, CUDA x)" in text
    assert "timed with CUDA events after 2 warm-up rounds" in text
    assert "Peak GPU memory of a training step" in text
    assert "OLMoE form" not in text  # fp32 only
    assert "new tokens, bf16," in text


def test_gpu_models_build_in_place():
    """The GPU benchmark's full-size models (hidden 1024, expert width 2816, 8 and 32 experts) are built directly on
    the target device, every parameter and buffer, here the meta device (no memory)."""
    s = speed.settings(False, "cuda") | {"device": "meta"}
    assert [shape[:2] for shape in s["shapes"]] == [(8, 1), (8, 2), (32, 4)]
    assert (s["hidden"], s["seq"], {shape[2] for shape in s["shapes"]}) == (1024, 2048, {2816})
    for experts, top_k, inter in s["shapes"]:
        names = ["default", "topk", *(f"mixtral_{i}" for i in speed.PEER_IMPLEMENTATIONS["cuda"])]
        models = speed._models(s, experts, top_k, inter, torch.bfloat16, names)
        for name, model in models.items():
            tensors = [*model.parameters(), *model.buffers()]
            assert {t.device.type for t in tensors} == {"meta"}, name
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, name


def test_cuda_refused_without_a_gpu(tmp_path, capsys):
    """Where torch sees no GPU, `--device cuda` stops at once with one line (here, or on any CPU-only machine)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert "--device cuda: torch finds no CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The resumable runner (benchmarks/runs.py) and issue 19's study (benchmarks/study.py, benchmarks/study_report.py)

RUNNER_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from benchmarks.runs import run_jobs

def slow_square(job):
    time.sleep(0.3)
    return {{"y": job["x"] ** 2}}

run_jobs([{{"x": x}} for x in range(8)], slow_square, {path!r})
"""


def _square(job):
    """A run for the runner's tests: its square, and when and where it ran."""
    import time

    start = time.time()
    time.sleep(job.get("sleep", 0.0))
    return {"y": job["x"] ** 2, "start": start, "end": time.time(), "pid": os.getpid()}


def test_runner_resumes_after_a_kill(tmp_path):
    """A study killed mid-way keeps its finished runs (a torn last line is ignored); the rerun runs only the rest,
    reports progress as done/total with elapsed time and ETA, and returns every run in job order."""
    path = tmp_path / "runs.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER_SCRIPT.format(root=str(ROOT), path=str(path))])
    try:
        for _ in range(600):
            if path.exists() and len(path.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    from benchmarks.runs import load_results, run_jobs

    finished = load_results(path)
    assert 3 <= len(finished) < 8
    assert all(r["result"]["y"] == r["key"]["x"] ** 2 for r in finished)
    with path.open("a") as f:  # as if killed while writing a line
        f.write('{"key": {"x": 7}, "resu')
    calls, messages = [], []

    def counted(job):
        calls.append(job["x"])
        return _square(job)

    records = run_jobs([{"x": x} for x in range(8)], counted, path, log=messages.append)
    assert sorted(calls) == sorted(set(range(8)) - {r["key"]["x"] for r in finished})
    assert [r["key"]["x"] for r in records] == list(range(8))
    assert [r["result"]["y"] for r in records] == [x * x for x in range(8)]
    assert messages[0].startswith(f"{len(finished)}/8 runs already in")
    assert messages[-1].startswith("8/8 done, elapsed ") and "ETA" in messages[-1]
    assert len(load_results(path)) == 8
    calls.clear()
    run_jobs([{"x": x} for x in range(8)], counted, path, log=messages.append)
    assert calls == []  # everything finished: nothing runs again


def test_runner_runs_jobs_in_parallel_and_stops_at_a_deadline(tmp_path):
    from benchmarks.runs import load_results, run_jobs

    jobs = [{"x": x, "sleep": 1.0} for x in range(4)]
    records = run_jobs(jobs, _square, tmp_path / "a.jsonl", workers=2, log=lambda m: None)
    results = [r["result"] for r in records]
    assert [r["y"] for r in results] == [0, 1, 4, 9]
    assert len({r["pid"] for r in results} | {os.getpid()}) == 5  # a fresh worker process per run
    first, second = sorted(results, key=lambda r: r["start"])[:2]
    assert second["start"] < first["end"]  # two ran at the same time
    assert run_jobs(jobs, _square, tmp_path / "b.jsonl", workers=2, deadline_s=0, log=lambda m: None) == []
    assert load_results(tmp_path / "b.jsonl") == []
    with pytest.raises(ValueError, match="same key"):
        run_jobs([{"x": 1}, {"x": 1}], _square, tmp_path / "c.jsonl")


def test_runner_fills_a_free_worker_with_a_run_that_became_known(tmp_path):
    """`run_as_ready` asks for the next run whenever a worker is free, so a run that depends on a finished one
    starts while a long one is still in flight; it ends when no run is left and none is running."""
    from benchmarks.runs import load_results, run_as_ready

    path = tmp_path / "runs.jsonl"
    asked = []

    def next_job(running):
        done = {r["key"]["x"] for r in load_results(path)}
        busy = done | {job["x"] for job in running}
        asked.append(sorted(job["x"] for job in running))
        # 0 (long) and 1 (short) are known from the start; 2 only once 1 has finished
        known = [{"x": 0, "sleep": 2.0}, {"x": 1, "sleep": 0.2}] + ([{"x": 2, "sleep": 0.2}] if 1 in done else [])
        return next((job for job in known if job["x"] not in busy), None)

    messages = []
    assert run_as_ready(next_job, _square, path, workers=2, log=messages.append) == 3
    runs = {r["key"]["x"]: r["result"] for r in load_results(path)}
    assert sorted(runs) == [0, 1, 2]
    assert runs[2]["start"] < runs[0]["end"]  # the dependent run did not wait for the long one
    assert [0] in asked  # asked again while 0 was still in flight
    assert messages[-1].startswith("3 done, elapsed ")
    assert run_as_ready(next_job, _square, path, workers=2, log=messages.append) == 0
    assert run_as_ready(lambda running: {"x": 9}, _square, tmp_path / "d.jsonl", workers=2, deadline_s=0) == 0


def _fake(final: float, spike: float = 0.0, load: float = 1.5, active: int = 1000) -> dict:
    """A run's result as the report reads it: final loss, a 50-window training curve with a rise of `spike`."""
    curve = {str(i): 3.0 - 0.01 * i for i in range(1, 51)}
    curve["30"] += spike
    return {
        "final_val": final,
        "diverged": False,
        "train_curve": curve,
        "expert_load": [load, load],
        "params": 2 * active,
        "active_params": active,
    }


def _record(cell: dict, variant: str, lr: float, seed: int, result: dict, part: str = "fair") -> dict:
    return {"key": dict(part=part, **cell, variant=variant, seed=seed, lr=lr), "result": result}


def test_fair_comparison_statistics_by_hand():
    """Best rate = lowest mean over the grid's seeds; largest stable = the largest rate without a spike; the paired
    gap at five seeds is the mean of per-seed differences with a Student t interval (t(4) = 2.776), by hand."""
    from benchmarks import study, study_report

    p = study.plan("cpu")
    fair = p["study"][0]
    cell = fair["cell"]
    records = []
    # top-K: best at 2e-3; 8e-3 and above spike. Default: best at 4e-3; stable up to 1.6e-2.
    topk = {5e-4: 1.90, 1e-3: 1.85, 2e-3: 1.80, 4e-3: 1.82, 8e-3: 1.88, 1.6e-2: 1.95}
    default = {5e-4: 1.95, 1e-3: 1.88, 2e-3: 1.84, 4e-3: 1.81, 8e-3: 1.83, 1.6e-2: 1.86}
    for seed in (0, 1):
        for lr in fair["lrs"]:
            offset = 0.01 * seed
            records.append(_record(cell, "topk", lr, seed, _fake(topk[lr] + offset, spike=0.5 * (lr >= 8e-3))))
            records.append(_record(cell, "default", lr, seed, _fake(default[lr] + offset)))
            records.append(_record(cell, "gradient", lr, seed, _fake(topk[lr] + offset)))
    results = study.Results(records)
    chosen = study.chosen_rates(fair, p["study"], results)
    assert chosen["topk"] == {"best": 2e-3, "stable": 4e-3}
    assert chosen["default"] == {"best": 4e-3, "stable": 1.6e-2}
    # five paired seeds at the best rates: diffs 0.01, 0.03, -0.02, 0.04, 0.02 (seeds 0-1 from the grid above)
    diffs = {0: 0.01, 1: 0.03, 2: -0.02, 3: 0.04, 4: 0.02}
    records = [r for r in records if not (r["key"]["lr"] == 4e-3 and r["key"]["variant"] == "default")]
    for seed, d in diffs.items():
        top = 1.80 + 0.01 * seed
        if seed >= 2:
            records.append(_record(cell, "topk", 2e-3, seed, _fake(top)))
        records.append(_record(cell, "default", 4e-3, seed, _fake(top + d)))
    results = study.Results(records)
    gap = study_report.compare(results, cell, "default", 4e-3, 2e-3)
    assert gap["seeds"] == [0, 1, 2, 3, 4]
    assert gap["mean"] == pytest.approx(0.016, abs=1e-12)
    assert gap["ci95"] == pytest.approx([0.016 - 0.028581, 0.016 + 0.028581], abs=2e-6)
    assert gap["better"] == 1
    text = study_report.render_parts(p, results)
    assert "| each at its best rate | default | 0.004 vs 0.002 |" in text
    assert "+0.0160 [-0.0126, +0.0446] (n=5, 1 better)" in text
    assert "| each at its largest stable rate | default | 0.016 vs 0.004 |" in text


def test_trend_fit_and_crossing():
    """Least squares of the gap on log10(compute); the sentence says where it crosses zero."""
    from benchmarks import study_report

    points = [{"compute": c, "gap": {"mean": g}} for c, g in ((1e12, 0.10), (1e13, 0.06), (1e14, 0.02), (1e15, None))]
    points[-1]["gap"] = None  # not yet run: left out
    trend = study_report.fit_trend(points)
    assert trend["slope"] == pytest.approx(-0.04) and trend["n"] == 3
    assert trend["crossing"] == pytest.approx(10**14.5)
    sentence = study_report.trend_sentence(trend)
    assert "-0.0400 per tenfold compute" in sentence and "3.2e+14 FLOPs, beyond the measured range" in sentence
    assert "Too few" in study_report.trend_sentence(study_report.fit_trend(points[:2]))


def test_trend_slope_interval_against_numpy():
    """The slope's 95% interval is t(n - 2) times its standard error, as numpy's weighted-free polyfit gives it."""
    import numpy as np

    from benchmarks import study_report

    x, y = [12.0, 12.5, 13.4, 14.0], [0.10, 0.06, 0.05, -0.01]
    trend = study_report.fit_trend([{"compute": 10**c, "gap": {"mean": g}} for c, g in zip(x, y, strict=True)])
    (slope, _), cov = np.polyfit(x, y, 1, cov=True)
    half = 4.303 * math.sqrt(cov[0, 0])  # t(2)
    assert trend["slope"] == pytest.approx(slope)
    assert trend["slope_ci95"] == pytest.approx([slope - half, slope + half])
    sentence = study_report.trend_sentence(trend)
    assert f"[{slope - half:+.4f}, {slope + half:+.4f}], which includes zero" in sentence  # 4 points: wide
    assert sentence.endswith("no trend this range can tell from none, so no crossing to read from it.")
    assert "crosses zero" not in sentence  # a line whose slope may be zero crosses anywhere


def _fair_grid_best_at(p: dict, best: float) -> list[dict]:
    """The fair point's whole grid (every arm, rate and grid seed), each arm best at `best`."""
    fair = p["study"][0]
    return [
        _record(fair["cell"], v, lr, seed, _fake(1.8 - (lr == best) * 0.1))
        for v in fair["variants"]
        for lr in fair["lrs"]
        for seed in fair["grid_seeds"]
    ]


def test_a_grid_widens_past_the_edge_its_best_rate_sits_on():
    """A tuned point's arm whose best rate is its grid's highest gets the next rate up (and lowest: down), one step
    of the grid's spacing at a time, at most `MAX_EXTEND` times; an arm with its best inside keeps its grid. The
    runner asks for the widened grid's runs before the seeds at the best rate."""
    from benchmarks import study

    p = study.plan("cpu")
    xs, records = p["study"][1], _fair_grid_best_at(p, 4e-3)
    grid = [4e-3, 2e-3, 8e-3]  # x1, x0.5, x2 around the fair point's best
    # top-K falls with the rate all the way; Default is best inside
    topk, default = {2e-3: 2.0, 4e-3: 1.9, 8e-3: 1.85, 1.6e-2: 1.84, 3.2e-2: 1.83}, {2e-3: 2.0, 4e-3: 1.9, 8e-3: 1.95}
    for lr in grid:
        records.append(_record(xs["cell"], "topk", lr, 0, _fake(topk[lr]), part="scale"))
        records.append(_record(xs["cell"], "default", lr, 0, _fake(default[lr]), part="scale"))

    def names_and_jobs(records):
        stages = study.stages(p, lambda: study.Results(records))
        return [(name, jobs) for name, point, jobs in stages if point is xs]

    assert study.grid_rates(xs, p["study"], study.Results(records), dry=False) == {
        "topk": [*grid, 1.6e-2],
        "default": grid,
        "unrouted": grid,  # not run yet: its grid as planned
    }
    (first, jobs), (second, _) = names_and_jobs(records)[:2]
    assert first.endswith(": grid") and second.endswith(": seeds")
    assert ("topk", 1.6e-2) in {(j["variant"], j["lr"]) for j in jobs}
    records.append(_record(xs["cell"], "topk", 1.6e-2, 0, _fake(topk[1.6e-2]), part="scale"))
    assert study.grid_rates(xs, p["study"], study.Results(records), dry=False)["topk"] == [*grid, 1.6e-2, 3.2e-2]
    records.append(_record(xs["cell"], "topk", 3.2e-2, 0, _fake(topk[3.2e-2]), part="scale"))
    results = study.Results(records)
    assert study.grid_rates(xs, p["study"], results, dry=False)["topk"] == [*grid, 1.6e-2, 3.2e-2]  # MAX_EXTEND = 2
    assert study.chosen_rates(xs, p["study"], results)["topk"]["best"] == 3.2e-2
    # the low edge widens downwards
    low = [r for r in records if not (r["key"]["part"] == "scale" and r["key"]["variant"] == "default")]
    for lr, loss in {2e-3: 1.8, 4e-3: 1.9, 8e-3: 1.95}.items():
        low.append(_record(xs["cell"], "default", lr, 0, _fake(loss), part="scale"))
    assert study.grid_rates(xs, p["study"], study.Results(low), dry=False)["default"] == [*grid, 1e-3]


def test_a_settled_arm_starts_its_seeds_while_another_arm_widens():
    """At a tuned point whose grid has run, an arm whose best rate lies inside its grid has its seeds known at
    once, so they run beside the other arm's widening; a later point whose rates are known comes after both; the
    widened arm's seeds, and a point at its rates, wait for its new rate."""
    from benchmarks import study

    p = study.plan("cpu")
    xs, records = p["study"][1], _fair_grid_best_at(p, 4e-3)
    losses = {2e-3: (2.0, 2.0, 1.9), 4e-3: (1.9, 1.88, 1.87), 8e-3: (1.85, 1.95, 1.95)}
    for lr, by_arm in losses.items():
        for arm, loss in zip(("topk", "default", "unrouted"), by_arm, strict=True):
            records.append(_record(xs["cell"], arm, lr, 0, _fake(loss), part="scale"))
    todo, waiting = study.left(p, records)
    scaling = [j for j in todo if j["part"] != "fair"]  # (the fair point's confirmation seeds come first)
    assert [(j["size"], j["variant"], j["lr"], j["seed"]) for j in scaling[:5]] == [
        ("xs", "topk", 1.6e-2, 0),
        ("xs", "default", 4e-3, 1),
        ("xs", "unrouted", 4e-3, 1),
        ("xs", "default", 4e-3, 2),
        ("xs", "unrouted", 4e-3, 2),
    ]
    assert scaling[5]["size"] == "m"  # m's grid is centred on the fair point's rates: known
    second = {j["variant"] for j in todo if j["size"] == "xs" and j["tokens"] == 3_276_800}
    assert second == {"default"}  # xs's second budget at xs's rates: top-K's is not known yet
    assert "fine m 32e-top1 409,600 tokens 1024/step: grid" in waiting  # centred on m's rates
    busy = todo[:2]  # with those in flight, the next free worker takes the next known run
    assert study.left(p, records, busy)[0][0] == todo[2]


def test_report_marks_a_best_rate_at_its_grids_edge():
    """A scaling point whose best rate is still its grid's highest (or lowest) after the grid was widened as far as
    it goes says so, in the gap table and the grid table, since the arm's true best may lie beyond the grid."""
    from benchmarks import study, study_report

    p = study.plan("cpu")
    xs, records = p["study"][1], _fair_grid_best_at(p, 4e-3)
    # xs grid around 4e-3 (x1, x0.5, x2), widened twice for top-K, which keeps improving; Default is best inside
    topk, default = {2e-3: 2.0, 4e-3: 1.9, 8e-3: 1.85, 1.6e-2: 1.84, 3.2e-2: 1.83}, {2e-3: 2.0, 4e-3: 1.88, 8e-3: 1.95}
    for variant, losses in (("topk", topk), ("default", default)):
        for lr, loss in losses.items():
            records.append(_record(xs["cell"], variant, lr, 0, _fake(loss), part="scale"))
    text = study_report.render_parts(p, study.Results(records))
    assert "| 0.032↑ / 0.004 | +0.0500 (n=1, 0 better) |" in text
    row = "| xs 8e-top1, 819,200 tokens, 1,024/step | topk | 0.002: 2.0000 · 0.004: 1.9000 · 0.008: 1.8500 · "
    assert row + "0.016: 1.8400 · **0.032: 1.8300** |" in text
    assert (
        "| xs 8e-top1, 819,200 tokens, 1,024/step | default | 0.002: 2.0000 · **0.004: 1.8800** · 0.008: 1.9500 |"
        in text
    )
    # while the grid's last widening has not run: the best so far, marked
    pending = [r for r in records if not (r["key"]["part"] == "scale" and r["key"]["lr"] == 3.2e-2)]
    assert "| 0.016↑* / 0.004 | +0.0400 (n=1, 0 better) |" in study_report.render_parts(p, study.Results(pending))


def test_unrouted_defaults_are_compared_to_top_k_at_each_first_budget():
    """The first budget of xs, m and l also runs `unrouted` (item 5's estimator fix), each arm over its own grid
    (centred, as the paper's form's, on the smaller size's best; the fair point has no `unrouted`, so its `default`
    best): the report tables its gap to top-K at each arm's best rate, beside the paper's form's trend, and only at
    the points that run it."""
    from benchmarks import study, study_report

    p = study.plan("cpu")
    runs_it = [point["cell"]["size"] for point in p["study"] if "unrouted" in study._arms(point)]
    assert runs_it == ["xs", "m", "l"]
    xs, records = p["study"][1], _fair_grid_best_at(p, 4e-3)
    losses = {"topk": {2e-3: 2.0, 4e-3: 1.9, 8e-3: 1.95}, "unrouted": {2e-3: 1.86, 4e-3: 1.95, 8e-3: 2.1}}
    for arm, by_lr in losses.items():
        for lr, loss in by_lr.items():
            records.append(_record(xs["cell"], arm, lr, 0, _fake(loss), part="scale"))
    assert study.grid_rates(xs, p["study"], study.Results(records), dry=False)["unrouted"] == [4e-3, 2e-3, 8e-3, 1e-3]
    records.append(_record(xs["cell"], "unrouted", 1e-3, 0, _fake(1.9), part="scale"))
    for seed, (topk, unrouted) in {1: (1.92, 1.89), 2: (1.88, 1.87)}.items():
        records.append(_record(xs["cell"], "topk", 4e-3, seed, _fake(topk), part="scale"))
        records.append(_record(xs["cell"], "unrouted", 2e-3, seed, _fake(unrouted), part="scale"))
    text = study_report.render_parts(p, study.Results(records))
    table = text.split("`unrouted` defaults (item 5's estimator fix")[1].split("\n\n")[1]
    assert "| LR top-K / unrouted | unrouted minus top-K |" in table
    # per seed 1.86 - 1.90, 1.89 - 1.92, 1.87 - 1.88: mean -0.0267, sd 0.01528, t(2) 4.303 x sd / sqrt(3) = 0.0380
    row = "| xs | 0.00M | 819,200 | 1,024 | 4.92e+09 | 0.004 / 0.002 | -0.0267 [-0.0646, +0.0113] (n=3, 3 better) |"
    assert row in table
    assert "| m |" in table and "| s |" not in table  # a point that does not run it has no row


def test_32_expert_table_shows_each_arms_best_so_far():
    """The 32-expert rows compare every arm to top-K at each one's best rate; while a grid is still running, at the
    best of the rates that have run, marked `*` (and ↑/↓ at the edge of those)."""
    from benchmarks import study, study_report

    p = study.plan("cpu")
    m = next(point for point in p["study"] if point["part"] == "scale" and point["cell"]["size"] == "m")
    fine = next(point for point in p["study"] if point["part"] == "fine")
    records = _fair_grid_best_at(p, 4e-3)
    for arm in m["arms"]:  # m's grid around 4e-3, best inside: the 32-expert grids are centred there too
        for lr, loss in {4e-3: 1.7, 2e-3: 1.8, 8e-3: 1.9}.items():
            records.append(_record(m["cell"], arm, lr, 0, _fake(loss), part="scale"))
    losses = {"topk": {4e-3: 2.0, 2e-3: 1.95}, "default": {4e-3: 2.1, 2e-3: 2.2}, "default_router_prob": {4e-3: 2.03}}
    for arm, by_lr in losses.items():
        for lr, loss in by_lr.items():
            records.append(_record(fine["cell"], arm, lr, 0, _fake(loss, load=2.0), part="fine"))
    text = study_report.arms_table(p, "fine", study.Results(records))
    name = "| m 32e-top1, 409,600 tokens, 1,024/step |"
    assert f"{name} topk | 0.002↓* | 1.9500 (1) | - | 2.00 |" in text
    assert f"{name} default | 0.004↑* | 2.1000 (1) | +0.1500 (n=1, 0 better) | 2.00 |" in text
    assert f"{name} default_router_prob | 0.004↑* | 2.0300 (1) | +0.0800 (n=1, 0 better) | 2.00 |" in text


def test_report_on_partial_results(tmp_path):
    """The report renders whatever has run: missing cells say so, a single seed has no interval, and the plot is
    written."""
    from benchmarks import study, study_report

    p = study.plan("cpu")
    fair = p["study"][0]
    records = [
        _record(fair["cell"], v, lr, 0, _fake(1.8 + (v == "default") * 0.05))
        for v in fair["variants"]
        for lr in fair["lrs"][:4]
    ]
    path = tmp_path / "study.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = study_report.render(path, "cpu", tmp_path / "gap.png")
    assert "| topk | not yet run | 1.8000 (1/2 seeds) |" in text  # columns by rate: 5e-4 has not run
    assert "| default | not yet run | +0.0500 (n=1, 0 better) |" in text  # one seed: no interval
    assert "Too few scaling points have run" in text
    assert (tmp_path / "gap.png").stat().st_size > 1000
    assert "mixes code versions" not in text


def test_report_flags_results_of_two_code_versions(tmp_path):
    """Runs are keyed by their settings, so a file can outlive its code: the report says when the runs come from
    more than one code version (`benchmarks.common.code_version`), and how many from each."""
    from benchmarks.common import code_version

    from benchmarks import study, study_report

    fair = study.plan("cpu")["study"][0]
    records = [_record(fair["cell"], v, 2e-3, 0, {**_fake(1.8), "code": code_version()}) for v in fair["variants"]]
    path = tmp_path / "study.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "mixes code versions" not in study_report.render(path, "cpu")
    del records[0]["result"]["code"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = study_report.render(path, "cpu")
    assert f"(runs per version: unrecorded: 1, {code_version()}: 2;" in text
    # the same code on another CPU's kernels is another version too, and a gap whose pair spans two is marked
    records[0]["result"]["code"] = records[2]["result"]["code"] = code_version()
    records[2]["result"]["kernels"] = "cpu AVX512"  # `gradient`; `default` (records[1]) keeps top-K's version
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = study_report.render(path, "cpu")
    assert f"(runs per version: {code_version()}: 2, {code_version()} (cpu AVX512): 1;" in text
    same, across = (
        study_report.compare(study.Results(records), fair["cell"], arm, 2e-3, 2e-3) for arm in fair["variants"][1:]
    )
    assert (same["mixed"], across["mixed"]) == (0, 1)
    assert study_report.gap_cell(across) == "+0.0000 (n=1, 0 better, 1 across versions †)"


def test_reproduce_reruns_a_finished_run_to_the_same_numbers(tmp_path, one_thread, capsys):
    """`python -m benchmarks.reproduce` reruns the runs of a results file that match `--where` with the study's own
    training and prints recorded against here: on the machine that wrote them, identical; it records the kernel
    set; a `--where` that matches nothing exits 2 naming the fields."""
    from benchmarks.runs import load_results, run_jobs

    from benchmarks import reproduce, study

    p = study.plan("quick")
    job = dict(part="scale", size="q1", shape="8e-top1", tokens=2 * 64, tokens_per_step=64, seed=0, lr=1e-3)
    jobs = [job | {"variant": v} for v in ("topk", "default")]
    path, out = tmp_path / "study.jsonl", tmp_path / "again.jsonl"
    run_jobs(jobs, lambda j: study.train(p, j), path, log=lambda m: None)
    assert reproduce.main([str(path), "--kind", "quick", "--where", "variant=default,lr=0.001", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    recorded = next(r["result"] for r in load_results(path) if r["key"]["variant"] == "default")
    assert f"| scale q1 8e-top1 128/64 default lr 0.001 seed 0 | {recorded['final_val']:.4f} |" in printed
    assert "| +0.0000 |" in printed and "1 runs; |difference| mean 0.0000, max 0.0000" in printed
    assert "Paired gaps" not in printed  # no top-K rerun to pair with yet
    assert reproduce.main([str(path), "--kind", "quick", "--where", "variant=topk", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    topk = next(r["result"] for r in load_results(path) if r["key"]["variant"] == "topk")
    difference = recorded["final_val"] - topk["final_val"]
    gap = f"{difference:+.4f} (n=1, {int(difference < 0)} better)"
    assert f"| q1 128/64 | default 0.001 - top-K 0.001 | {gap} |" in printed
    assert [r["key"]["variant"] for r in load_results(out)] == ["default", "topk"]
    assert load_results(out)[0]["result"]["kernels"] == study.kernels("cpu")
    assert reproduce.main([str(path), "--kind", "quick", "--where", "variant=nope", "--out", str(out)]) == 2
    assert "no run of" in capsys.readouterr().err
    for where in ("", "variant"):  # an empty or malformed filter is refused before anything runs
        with pytest.raises(SystemExit):
            reproduce.main([str(path), "--kind", "quick", "--where", where, "--out", str(out)])
        assert "--where: expected field=value" in capsys.readouterr().err
    assert len(load_results(out)) == 2


def test_quick_study_runs_resumes_and_renders(tmp_path, one_thread):
    """`--only study --quick`: every point of the plan runs (grids, chosen rates, seeds, 32 experts with a shared
    expert), a rerun runs nothing, and the report has every table."""
    from benchmarks.common import code_version

    from benchmarks import study, study_report

    path = tmp_path / "study.jsonl"
    study.run("quick", str(path), log=lambda m: None)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    quick = study.plan("quick")
    widened = sum(
        study.MAX_EXTEND * len(point["arms"]) * len(point["grid_seeds"])
        for point in quick["study"]
        if point["how"] == "tuned"
    )
    assert 0 < len(records) <= sum(row["runs"] for row in study.estimate(quick)) + widened
    assert {r["key"]["part"] for r in records} == {"fair", "scale", "batch", "fine"}
    assert all(math.isfinite(r["result"]["final_val"]) for r in records)
    assert {r["result"]["code"] for r in records} == {code_version()}
    study.run("quick", str(path), log=lambda m: None)
    assert len(path.read_text().splitlines()) == len(records)
    text = study_report.render(path, "quick", tmp_path / "gap.png")
    assert study_report.NOT_RUN not in text
    assert "#### 32 experts and a shared expert" in text and "default_router_prob" in text


def test_study_bf16_run_on_the_cpu(one_thread):
    """The GPU plan's run (bf16 autocast) at a tiny size, on the CPU: what `--device cuda` does but the device."""
    from benchmarks import study

    p = study.plan("quick") | {"bf16": True}
    job = dict(
        part="gpu", size="q1", shape="8e-top1", tokens=4 * 64, tokens_per_step=64, variant="default", seed=0, lr=1e-3
    )
    result = study.train(p, job)
    assert math.isfinite(result["final_val"]) and result["active_params"] < result["params"]
    gpu = study.plan("gpu")
    assert gpu["device"] == "cuda" and gpu["bf16"] is True
    assert [point["cell"]["size"] for point in gpu["study"]] == ["g-s", "g-m", "g-l"]


@pytest.mark.parametrize("results", ["method.json", "speed.json", "fidelity_quality.json"])
def test_report_tables_have_one_cell_per_header(results):
    """Every markdown table the report renders from a committed results file has as many cells in each row as in
    its header (the method confirmation once had one more, so its last columns showed the wrong figures)."""
    text = report.render([json.loads((ROOT / "benchmarks" / "results" / results).read_text())])
    tables = 0
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if len(lines) < 3:
            continue
        tables += 1
        widths = {line.count(" | ") for line in lines if not line.startswith("|---")}
        assert len(widths) == 1, lines[0]
    assert tables


def test_spike_is_a_bump_against_the_same_batches():
    """A run's spike: a bump of its windowed training loss over the median run of its seed. Batch-to-batch noise
    that every run of a seed shares cancels; learning faster or slower is no bump; a spike that recovers is."""
    from benchmarks import study

    noise = [0.3 * math.sin(7.0 * i) for i in range(50)]  # the same batches for every run of the seed
    slow = [3.0 - 0.02 * i + n for i, n in enumerate(noise)]
    fast = [2.5 - 0.02 * i - 0.5 * math.exp(-i / 5) + n for i, n in enumerate(noise)]  # catches up: no bump
    spiky = list(slow)
    spiky[30] += 0.4
    spiky[31] += 0.2
    assert study._spike(slow, slow) == pytest.approx(0.0)
    assert study._spike(fast, slow) < 0.01
    assert study._spike(spiky, slow) == pytest.approx(0.4)
    assert study._spike(slow, [0.0] * 50) > study.SPIKE_LIMIT  # without the reference, the batches' noise is a spike
    cell = study.plan("cpu")["study"][0]["cell"]

    def run(curve, lr):
        result = _fake(2.0) | {"train_curve": {str(i + 1): c for i, c in enumerate(curve)}}
        return _record(cell, "topk", lr, 0, result)

    results = study.Results([run(slow, 1e-3), run(fast, 2e-3), run(spiky, 4e-3)])
    lrs = [1e-3, 2e-3, 4e-3]
    assert [results.is_stable(cell, 0, results.get(cell, "topk", lr, 0)) for lr in lrs] == [True, True, False]
    assert results.largest_stable_lr(cell, "topk", lrs, [0]) == 2e-3
