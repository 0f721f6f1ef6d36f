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
