"""The paper's protocol at our scale: does Default MoE (or one of its variants) train better than top-K?

Byte-level LM on the built-in corpus (as benchmarks/quality.py), the paper's recipe: first layer dense, Switch
load-balancing loss 0.01 over the (global) batch, AdamW with linear warm-up and cosine decay, beta 0.9 at 8 experts.
Every variant of a seed starts from the same initial weights (the routing options add no parameters) and sees the
same batches in the same order. Phases, run by one command, two runs at a time with `--jobs 2`:

1. `lr_grid`: top-K at a few learning rates (screen length, seed 0); the best is the protocol's learning rate.
2. `screen`: every variant at that rate, screen length, a few seeds.
3. `stress`: top-K, the paper's form and the best other variant of the screen at two learning rates above the best
   (loss spikes, divergence; screen length, seed 0).
4. `confirm`: the same three at full length (4x the demo's tokens), 5 seeds.

Per run: the validation-loss curve, per-layer cosine of the run's own router gradient to the dense straight-through
gradient at points over training (the paper's Fig. 4; benchmarks/fidelity.py's estimators on a held-out batch, eval
mode), expert load (max/mean tokens per expert on the validation set), and the largest training-loss spike.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import statistics
import sys
import time

import torch
from torch.nn import functional as F
from transformers import get_cosine_schedule_with_warmup

from .common import build_ours, byte_corpus, interleaved_times, median, our_config, sample_batches, train_step_fn
from .fidelity import _router_grads, _set_variant
from .quality import max_spike, train, validation_loss

# A variant is config overrides, plus optionally "patch": "module:function", a function applied to the model right
# after it is built (e.g. to change how its defaults are formed) with the model as its only argument.
VARIANTS = {
    "topk": dict(routing="topk"),
    "default": dict(routing="default"),  # the paper: plain-mean EMA, updated before use, in the forward
    "default_router_prob": dict(routing="default", default_ema_weighting="router_prob"),
    "gradient": dict(routing="default", default_term="gradient"),
    "unrouted": dict(routing="default", default_ema_source="unrouted"),
    "unrouted_gradient": dict(routing="default", default_ema_source="unrouted", default_term="gradient"),
}
# Routed shapes with the paper's EMA beta per configuration (plain-mean EMA; the router-probability-weighted EMA
# is insensitive to it). 32-expert shapes are fine-grained: each expert a quarter of the 8-expert width, so 32e-top4
# has 8e-top1's total and active expert parameters. The shared expert (always on, no default vector) has the same
# quarter width.
SHAPES = {
    "8e-top1": dict(experts=8, top_k=1, default_ema_beta=0.9),
    "8e-top2": dict(experts=8, top_k=2, default_ema_beta=0.9),
    "32e-top1": dict(experts=32, top_k=1, default_ema_beta=0.65, inter_scale=0.25),
    "32e-top2": dict(experts=32, top_k=2, default_ema_beta=0.95, inter_scale=0.25),
    "32e-top4": dict(experts=32, top_k=4, default_ema_beta=0.999, inter_scale=0.25),
    "32e-top4-shared": dict(experts=32, top_k=4, default_ema_beta=0.999, inter_scale=0.25, shared=True),
}
# Two-sided 95% Student t quantiles by degrees of freedom.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            model=dict(hidden=32, inter=32, layers=2, heads=2),
            shapes=["8e-top1"],
            batch=2,
            seq=32,
            screen_steps=4,
            confirm_steps=6,
            stress_steps=4,
            points=3,
            lr_grid=[1e-3, 3e-3],
            screen_seeds=[0],
            confirm_seeds=[0, 1],
            stress_factors=[3.0],
            eval_batches=1,
            train_bytes=400_000,
            valid_bytes=50_000,
            probe_stride=8,
            cost_models=[dict(hidden=32, inter=32, layers=2, heads=2, batch=2, seq=32)],
            cost_reps=1,
        )
    return dict(
        model=dict(hidden=64, inter=128, layers=4, heads=4),
        shapes=["8e-top1", "8e-top2"],
        batch=8,
        seq=128,
        screen_steps=200,  # half the demo's tokens
        confirm_steps=1600,  # 4x the demo's tokens (400 steps x 8 x 128)
        stress_steps=200,
        points=6,  # validation points per run (cosines at every other one)
        lr_grid=[1e-3, 2e-3, 4e-3],
        screen_seeds=[0, 1],
        confirm_seeds=[0, 1, 2, 3, 4],
        stress_factors=[3.0, 10.0],
        eval_batches=4,
        train_bytes=4_000_000,
        valid_bytes=1_000_000,
        probe_stride=64,
        # the trained model, and the speed benchmark's 8-expert shape (hidden 256, 4096 tokens per step)
        cost_models=[
            dict(hidden=64, inter=128, layers=4, heads=4, batch=8, seq=128),
            dict(hidden=256, inter=256, layers=4, heads=4, batch=8, seq=512),
        ],
        cost_reps=10,
    )


def _log(msg: str) -> None:
    print(f"[method {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _config(s: dict, shape: str, variant: str):
    """The paper's recipe: first layer dense, no renormalisation, Switch loss 0.01 over the whole batch, no z-loss,
    no jitter; the shape's beta unless the variant sets one."""
    m, sh = s["model"], dict(SHAPES[shape])
    inter = max(1, round(m["inter"] * sh.pop("inter_scale", 1.0)))
    shared = inter if sh.pop("shared", False) else None
    overrides = {k: v for k, v in VARIANTS[variant].items() if k != "patch"}
    return our_config(
        hidden=m["hidden"],
        inter=inter,
        layers=m["layers"],
        heads=m["heads"],
        vocab=256,
        norm_topk_prob=False,
        max_pos=s["seq"],
        num_dense_layers=1,
        dense_intermediate_size=m["inter"],
        shared_expert_intermediate_size=shared,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.0,
        router_jitter_noise=0.0,
        default_probe_stride=s["probe_stride"],
        **(sh | overrides),
    )


def build(s: dict, shape: str, variant: str, seed: int):
    """The run's model (same seed = same initial weights for every variant), with the variant's patch applied."""
    model = build_ours(_config(s, shape, variant), seed=seed)
    patch = VARIANTS[variant].get("patch")
    if patch:
        module, name = patch.split(":")
        getattr(importlib.import_module(module), name)(model)
    return model


def router_cosines(model, batch: torch.Tensor) -> dict[str, list[float]]:
    """Per MoE layer, cos(router gradient, dense straight-through router gradient) for the run's own estimator
    ("own": through its defaults, or top-K's for routing="topk") and for top-K's on the same model and forward."""
    model.eval()
    grads = {}
    for estimator in ("dense", "topk", "default"):
        _set_variant(model, estimator)
        grads[estimator] = _router_grads(model, batch)
    _set_variant(model, None)
    model.zero_grad(set_to_none=True)
    model.train()
    own = "default" if model.config.routing == "default" else "topk"
    return {
        name: [float(F.cosine_similarity(g, d, dim=0)) for g, d in zip(grads[est], grads["dense"], strict=True)]
        for name, est in (("own", own), ("topk", "topk"))
    }


@torch.no_grad()
def expert_load(model, batches: torch.Tensor) -> list[float]:
    """Per MoE layer, max/mean tokens per expert over the validation batches (1.0 = perfectly balanced)."""
    model.eval()
    counts = None
    for batch in batches:
        logits = model(input_ids=batch, output_router_logits=True).router_logits
        top_k = model.config.num_experts_per_tok
        layer_counts = torch.stack(
            [torch.bincount(x.topk(top_k, -1).indices.flatten(), minlength=x.shape[-1]) for x in logits]
        )
        counts = layer_counts if counts is None else counts + layer_counts
    model.train()
    return (counts.max(-1).values / counts.float().mean(-1)).tolist()


def parameter_counts(model) -> dict:
    """All parameters, and those a token uses (the routed experts' at K/E of their number)."""
    total = sum(p.numel() for p in model.parameters())
    c = model.config
    routed = sum(p.numel() for layer in model.model.layers if layer.is_moe for p in layer.mlp.experts.parameters())
    return {"params": total, "active_params": total - round(routed * (1 - c.num_experts_per_tok / c.num_experts))}


def train_run(job: dict) -> dict:
    """One training run: job = dict(s, shape, variant, seed, lr, steps). `s` may set "device" ("cpu" or "cuda")
    and "bf16" (bf16 autocast, the weights and optimizer in fp32); validation batches are `eval_batch` (default
    `batch`) sequences each. With return_model=True the result holds the trained model too (benchmarks/finetune.py
    pre-trains with it)."""
    s, steps = job["s"], job["steps"]
    device = torch.device(s.get("device", "cpu"))
    torch.set_num_threads(1)
    train_data = byte_corpus(s["train_bytes"], "train")
    valid = byte_corpus(s["valid_bytes"], "validation")
    valid_batches = sample_batches(valid, s.get("eval_batch", s["batch"]), s["seq"], s["eval_batches"], seed=4242)
    valid_batches = valid_batches.to(device)
    model = build(s, job["shape"], job["variant"], job["seed"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    eval_at = sorted({max(1, round(steps * (i + 1) / s["points"])) for i in range(s["points"])})
    cosine_at = set(eval_at[1::2])
    val, cosines = {}, {}

    def evaluate(step, loss):
        if step in eval_at:
            val[step] = validation_loss(model, valid_batches) if math.isfinite(loss) else math.inf
        if step in cosine_at and math.isfinite(loss):
            cosines[step] = router_cosines(model, valid_batches[0])

    start = time.perf_counter()
    batches = sample_batches(train_data, s["batch"], s["seq"], steps, seed=1000 + job["seed"]).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.get("bf16", False)):
        train_losses = train(model, optimizer, schedule, batches, evaluate)
        final = val[eval_at[-1]]
        load = expert_load(model, valid_batches) if math.isfinite(final) else None
    seconds = time.perf_counter() - start
    window = max(1, steps // 50)  # the training-loss curve in 50 window means (spikes, stability)
    train_curve = {
        i + window: statistics.fmean(train_losses[i : i + window]) for i in range(0, steps - window + 1, window)
    }
    return {
        **{k: job[k] for k in ("shape", "variant", "seed", "lr", "steps")},
        "tokens_per_step": s["batch"] * s["seq"],
        **parameter_counts(model),
        "val_curve": val,
        "train_curve": train_curve,
        "final_val": final,
        "cosines": cosines,
        "expert_load": load,
        "max_spike": max_spike(train_losses, warmup),
        "diverged": not math.isfinite(final) or final > math.log(256),
        "train_seconds": seconds,
    } | ({"model": model} if job.get("return_model") else {})


def _run_all(jobs: list[dict], workers: int):
    """Yield the runs' results in job order, `workers` runs at a time."""
    if workers <= 1:
        yield from map(train_run, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(train_run, jobs, chunksize=1)


# ----------------------------------------------------------------------------------------------------------------
# Summaries


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences with a two-sided 95% t interval."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": None, "per_seed": diffs, "better": sum(d < 0 for d in diffs)}
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": diffs, "better": sum(d < 0 for d in diffs)}


def tokens_to_reach(curve: dict, target: float, tokens_per_step: int) -> float | None:
    """Tokens at which a validation curve first reaches `target` (linear between points), or None."""
    previous = (0, math.inf)
    for step, loss in sorted((int(step), loss) for step, loss in curve.items()):  # JSON keys are strings
        if loss <= target:
            if not math.isfinite(previous[1]):
                return step * tokens_per_step
            fraction = (previous[1] - target) / (previous[1] - loss)
            return (previous[0] + fraction * (step - previous[0])) * tokens_per_step
        previous = (step, loss)
    return None


def summarise(runs: list[dict]) -> dict:
    """Per (shape, variant): final loss, paired difference to top-K, tokens-to-target, cosines, load, spikes."""
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in runs):
        by_variant = {}
        for r in runs:
            if r["shape"] == shape:
                by_variant.setdefault(r["variant"], {})[r["seed"]] = r
        topk = by_variant.get("topk", {})
        out[shape] = {}
        for variant, seeds in by_variant.items():
            finals = [r["final_val"] for r in seeds.values()]
            row = {
                "seeds": sorted(seeds),
                "final_val_mean": statistics.fmean(finals),
                "final_val_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "expert_load_max_over_mean": statistics.fmean(
                    statistics.fmean(r["expert_load"]) for r in seeds.values() if r["expert_load"]
                ),
                "max_spike": max(r["max_spike"] for r in seeds.values()),
                "cosine_own_per_layer": _mean_cosines(seeds.values(), "own"),
                "cosine_topk_per_layer": _mean_cosines(seeds.values(), "topk"),
                "step_seconds": statistics.fmean(r["train_seconds"] / r["steps"] for r in seeds.values()),
            }
            common = sorted(set(seeds) & set(topk))
            if variant != "topk" and common:
                row["paired_diff_vs_topk"] = paired([seeds[i]["final_val"] - topk[i]["final_val"] for i in common])
                reach = [
                    tokens_to_reach(seeds[i]["val_curve"], topk[i]["final_val"], seeds[i]["tokens_per_step"])
                    for i in common
                ]
                total = [topk[i]["steps"] * topk[i]["tokens_per_step"] for i in common]
                row["tokens_to_topk_final"] = [None if t is None else t / n for t, n in zip(reach, total, strict=True)]
            out[shape][variant] = row
    return out


def _mean_cosines(runs, name: str) -> list[float]:
    points = [point[name] for r in runs for point in r["cosines"].values()]
    return [statistics.fmean(p[layer] for p in points) for layer in range(len(points[0]))] if points else []


def best_lr(runs: list[dict]) -> float:
    """The learning rate with the lowest top-K final loss, averaged over shapes."""
    by_lr = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r["final_val"])
    return min(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))


def cost(s: dict, log=_log) -> dict:
    """Training-step CPU time of every variant relative to top-K (one thread, identical weights and batch,
    interleaved repetitions; process CPU time leaves out waiting for a core on a shared machine)."""
    torch.set_num_threads(1)
    out = {}
    for m in s["cost_models"]:
        for shape in s["shapes"]:
            local = {**s, "model": m, "seq": m["seq"]}
            batch = sample_batches(byte_corpus(200_000), m["batch"], m["seq"], 1, seed=0)[0]
            steps = {v: train_step_fn(build(local, shape, v, seed=0), batch) for v in VARIANTS}
            cpu: dict = {}
            interleaved_times(steps, s["cost_reps"], 1, cpu)
            key = f"{shape}_H{m['hidden']}_T{m['batch'] * m['seq']}"
            out[key] = {v: median(t) / median(cpu["topk"]) for v, t in cpu.items()}
            log(f"cost {key}: " + ", ".join(f"{v} {r - 1:+.1%}" for v, r in out[key].items()))
    return out


def run(
    quick: bool = False,
    jobs: int = 1,
    shapes: list[str] | None = None,
    confirm_extra: list[str] | None = None,
    log=_log,
    on_progress=None,
) -> dict:
    """The whole protocol; `confirm_extra` adds variants to the confirmation (after the three it always runs)."""
    s = settings(quick)
    unknown = sorted(set(confirm_extra or []) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown method variants {unknown}; choose from {sorted(VARIANTS)}")
    if shapes:
        unknown = sorted(set(shapes) - set(SHAPES))
        if unknown:
            raise ValueError(f"unknown method shapes {unknown}; choose from {sorted(SHAPES)}")
        s["shapes"] = shapes
    out: dict = {"settings": s, "variants": VARIANTS, "phases": {}}

    def phase(name: str, job_list: list[dict]) -> list[dict]:
        log(f"{name}: {len(job_list)} runs")
        results = []
        out["phases"][name] = {"runs": results}
        for r in _run_all(job_list, jobs):
            results.append(r)
            log(f"{r['shape']} {r['variant']} seed {r['seed']} lr {r['lr']:g}: val {r['final_val']:.4f}")
            if on_progress:  # partial results survive an interrupted run
                on_progress(out)
        lrs = dict.fromkeys(r["lr"] for r in results)
        out["phases"][name]["summary_by_lr"] = {
            f"{lr:g}": summarise([r for r in results if r["lr"] == lr]) for lr in lrs
        }
        if on_progress:
            on_progress(out)
        return results

    def jobs_for(variants, seeds, lr, steps):
        return [
            dict(s=s, shape=shape, variant=v, seed=seed, lr=lr, steps=steps)
            for seed in seeds
            for shape in s["shapes"]
            for v in variants
        ]

    out["cost_vs_topk"] = cost(s, log)
    grid = [dict(s=s, variant="topk", seed=0, lr=lr, steps=s["screen_steps"]) for lr in s["lr_grid"]]
    grid = phase("lr_grid", [dict(job, shape=shape) for job in grid for shape in s["shapes"]])
    lr = out["lr"] = best_lr(grid)
    screen = phase("screen", jobs_for(list(VARIANTS), s["screen_seeds"], lr, s["screen_steps"]))
    summary = summarise(screen)
    # The best variant other than top-K and the paper's form: lowest mean paired difference over shapes.
    candidates = [v for v in VARIANTS if v not in ("topk", "default")]
    score = {
        v: statistics.fmean(summary[sh][v]["paired_diff_vs_topk"]["mean"] for sh in s["shapes"]) for v in candidates
    }
    out["screen_winner"] = winner = min(score, key=score.get)
    confirmed = ["topk", winner, "default"]
    stress = [
        dict(s=s, variant=v, seed=0, lr=lr * f, steps=s["stress_steps"]) for f in s["stress_factors"] for v in confirmed
    ]
    phase("stress", [dict(job, shape=shape) for job in stress for shape in s["shapes"]])
    # The paper's form last: top-K and the winner are complete first should a long run be cut short.
    confirm = jobs_for(confirmed[:2], s["confirm_seeds"], lr, s["confirm_steps"])
    extra = [v for v in dict.fromkeys(confirm_extra or []) if v not in confirmed]
    phase("confirm", confirm + jobs_for(confirmed[2:] + extra, s["confirm_seeds"], lr, s["confirm_steps"]))
    return out
