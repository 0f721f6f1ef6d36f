"""Render benchmark results (JSON from `python -m benchmarks`) as markdown.

    python -m benchmarks.report benchmarks/results/speed.json benchmarks/results/fidelity_quality.json > tables.md

Several files are merged (e.g. parts run separately); the tables say which command produced them.
"""

from __future__ import annotations

import json
import sys


def _f(value, digits=3) -> str:
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def _pct(ratio) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _shape_label(key: str) -> str:
    parts = dict((p[0], p[1:]) for p in key.split("_")[:3])
    return f"{parts['E']} experts, top-{parts['K']}, I={parts['I']}"


def render_speed(speed: dict, command: str) -> str:
    s = speed["settings"]
    gpu = s.get("device") == "cuda"
    if gpu:
        tokens = (
            f"bf16 steps of {s['bf16_batch'] * s['seq']} tokens on the GPU, each timed with CUDA events after "
            f"{s['warmup']} warm-up rounds and a synchronisation"
        )
    else:
        tokens = f"fp32 steps use {s['batch'] * s['seq']} tokens, bf16 steps {s['bf16_batch'] * s['seq']} tokens"
    out = [
        f"### Speed and memory\n\nCommand: `{command}`. Model: hidden {s['hidden']}, {s['layers']} MoE layers, "
        f"{s['heads']} heads, vocabulary {s['vocab']}, sequence length {s['seq']}; {tokens}. A training step is "
        "forward + backward + AdamW step (loss includes the load-balancing loss). Ratios are of medians over "
        "interleaved repetitions in one process; < 1 means faster.\n"
    ]
    if "moe_layer" in speed:
        rows = []
        for key, r in speed["moe_layer"].items():
            row = [
                _shape_label(key),
                key.rsplit("_", 1)[1],
                r["tokens"],
                _f(r["topk"]["median_s"] * 1e3, 1),
                _pct(r["default"]["ratio_vs_topk"]),
            ]
            row.append(_pct(r["default_fixed"]["ratio_vs_topk"]) if "default_fixed" in r else "-")
            row.append(len(r["topk"]["times_s"]))
            rows.append(row)
        out.append("#### One MoE layer, forward + backward (where the Default MoE overhead lives)\n")
        out.append(
            _table(
                ["shape", "dtype", "tokens", "topk ms", "default vs topk", "default + fast-path fix vs topk", "reps"],
                rows,
            )
        )
    if "training_step" in speed:
        rows, orows, prow, mrows = [], [], [], []
        for key, shape in speed["training_step"].items():
            choice = shape["peer_implementation"]
            times = {k: _f(v["median_s"], 3 if gpu else 2) + " s" for k, v in choice["times"].items()}
            times |= {k: "out of memory" for k in choice.get("out_of_memory", {})}
            prow.append([_shape_label(key), choice["best"], ", ".join(f"{k}: {v}" for k, v in times.items())])
            for dtype in ("fp32", "bf16"):
                if dtype not in shape:
                    continue
                r = shape[dtype]
                if "peak_memory_bytes" in r["topk"]:
                    mixtral = f"mixtral_{choice['best']}"
                    memory = [r[name]["peak_memory_bytes"] for name in ("default", "topk", mixtral)]
                    mrows.append([_shape_label(key), dtype, *(f"{m / 2**30:.2f}" for m in memory)])
                    mrows[-1].append(_pct(memory[0] / memory[1]))
                row = [
                    _shape_label(key),
                    dtype,
                    r["tokens_per_step"],
                    _f(r["topk"]["median_s"], 3 if gpu else 2),
                    _pct(r["default"]["ratio_vs_topk"]),
                    _pct(r["default_fixed"]["ratio_vs_topk"]) if "default_fixed" in r else "-",
                    _f(r["topk_vs_mixtral"]),
                    _f(r["dense_st_over_default"], 2) + "x" if "dense_st_over_default" in r else "-",
                    len(r["topk"]["times_s"]),
                ]
                rows.append(row)
                if "olmoe_form" in r:
                    o = r["olmoe_form"]
                    orows.append([_shape_label(key), dtype, _f(o["topk_vs_olmoe"]), _pct(1 + o["default_overhead"])])
        out.append("#### Training step\n")
        out.append(
            _table(
                [
                    "shape",
                    "dtype",
                    "tokens",
                    "topk s/step",
                    "default vs topk",
                    "default + fix vs topk",
                    "our topk / Mixtral",
                    "dense straight-through / default",
                    "reps",
                ],
                rows,
            )
        )
        out.append(
            '\n`our topk / Mixtral`: our `routing="topk"` (with `norm_topk_prob=True`) against transformers\' '
            "`MixtralForCausalLM` with identical weights and its fastest experts implementation (table below); "
            "< 1 means ours is faster. `dense straight-through / default`: the speed-up of Default MoE over "
            "computing every expert for the router gradient (DenseMixer-style).\n"
        )
        if orows:
            out.append(
                "\nOLMoE form (our model with `qk_norm=True`, `norm_topk_prob=False` vs `OlmoeForCausalLM`, "
                "same weights):\n\n"
            )
            out.append(_table(["shape", "dtype", "our topk / OLMoE", "default vs topk"], orows))
        if gpu:
            out.append(
                "\ntransformers' experts implementation per shape (the fastest bf16 training step on the GPU of "
                "those that fit in its memory):\n\n"
            )
        else:
            out.append(
                "\ntransformers' experts implementation per shape (fp32 training step; `batched_mm` gathers one "
                "weight matrix per (token, expert) pair: 4096 x K x 2I x H x 4 bytes = 4.3 GB per layer at these "
                "shapes; at I=512 it ran this 23 GB machine out of memory, so it is left out of training):\n\n"
            )
        out.append(_table(["shape", "fastest", "median step time"], prow))
        if mrows:
            out.append(
                "\nPeak GPU memory of a training step above the memory allocated before it (weights and AdamW "
                "states of the models under test; `torch.cuda.max_memory_allocated`), GiB, the largest over the "
                "repetitions:\n\n"
            )
            out.append(_table(["shape", "dtype", "default", "topk", "Mixtral", "default vs topk"], mrows))
    if "overhead" in speed:
        rows = []
        for key, r in speed["overhead"].items():
            row = [_shape_label(key), _f(r["wall"]["topk"]["median_s"], 2)]
            for clock in ("wall", "cpu"):
                row.append(_pct(r[clock]["default"]["ratio_vs_topk"]))
                row.append(_pct(r[clock]["default_fixed"]["ratio_vs_topk"]) if "default_fixed" in r[clock] else "-")
            row.append(len(r["wall"]["topk"]["times_s"]))
            rows.append(row)
        out.append(
            "\n#### Default MoE overhead, training step, more repetitions (fp32, wall and CPU time)\n\nSame step as "
            "above; process CPU time (one torch thread) leaves out time spent waiting for a core on the shared "
            "machine, so its ratios are steadier.\n\n"
        )
        out.append(
            _table(
                [
                    "shape",
                    "topk s/step",
                    "default (wall)",
                    "default + fix (wall)",
                    "default (CPU)",
                    "default + fix (CPU)",
                    "reps",
                ],
                rows,
            )
        )
    if "saved_activations" in speed:
        rows = []
        for key, r in speed["saved_activations"].items():
            rows.append(
                [
                    _shape_label(key),
                    key.rsplit("_", 1)[1],
                    f"{r['topk'] / 2**20:.1f}",
                    _pct(r["default_over_topk"]),
                    _f(r["dense_st_over_topk"], 2) + "x",
                ]
            )
        out.append(
            "\n#### Memory: bytes saved for backward\n\nDistinct tensor storages autograd saves during one "
            "training forward, counted with `torch.autograd.graph.saved_tensors_hooks` (exact and "
            "deterministic; weights, gradients and optimizer state are identical across variants).\n\n"
        )
        out.append(_table(["shape", "dtype", "topk MiB", "default vs topk", "dense straight-through / topk"], rows))
    if "peak_rss" in speed:
        rows = []
        for key, r in speed["peak_rss"].items():
            row = [
                _shape_label(key),
                f"{r['topk']['peak_rss'] / 2**20:.0f}",
                _pct(r["default_over_topk_peak"]),
                _pct(r["default_over_topk_step_growth"]),
            ]
            if "default_fixed_over_topk_peak" in r:
                row += [_pct(r["default_fixed_over_topk_peak"])]
            else:
                row += ["-"]
            row += [_f(r["dense_st_over_topk_peak"], 2) + "x"]
            rows.append(row)
        out.append(
            "\n#### Memory: peak RSS of a training process (fp32, two steps)\n\nOne fresh subprocess per "
            "variant; `MALLOC_MMAP_THRESHOLD_=65536` makes glibc return freed tensors to the OS at once, so "
            "the kernel's peak-RSS mark (VmHWM, reset after the model is built) is the peak of live memory during "
            "the steps. `growth` = peak minus RSS before the first step "
            "(activations, gradients, optimizer state).\n\n"
        )
        out.append(
            _table(
                [
                    "shape",
                    "topk peak MiB",
                    "default vs topk (peak)",
                    "default vs topk (growth)",
                    "default + fix (peak)",
                    "dense straight-through / topk (peak)",
                ],
                rows,
            )
        )
    if "scaling" in speed:
        sc = speed["scaling"]
        rows = [
            [e, _f(r["topk"]["median_s"], 2), _f(r["default"]["median_s"], 2), _pct(r["default"]["ratio_vs_topk"])]
            for e, r in sc["experts"].items()
        ]
        out.append(
            f"\n#### Scaling (fp32, top-2, I={s['shapes'][0][2]})\n\nStep time vs number of experts "
            f"({s['batch'] * s['seq']} tokens per step):\n\n"
        )
        out.append(_table(["experts", "topk s", "default s", "default vs topk"], rows))
        rows = [
            [t, _f(r["topk"]["median_s"], 2), _f(r["default"]["median_s"], 2), _pct(r["default"]["ratio_vs_topk"])]
            for t, r in sc["tokens"].items()
        ]
        out.append("\nStep time vs tokens per step (8 experts):\n\n")
        out.append(_table(["tokens", "topk s", "default s", "default vs topk"], rows))
    if "generation" in speed:
        g = speed["generation"]
        rows = [
            [name, _f(r["tokens_per_s"], 1), _f(r["median_s"], 3)]
            for name, r in g.items()
            if isinstance(r, dict) and "tokens_per_s" in r
        ]
        rows += [[name, "out of memory", "-"] for name in g.get("out_of_memory", {})]
        dtype = s.get("dtypes", ["fp32"])[0]
        out.append(
            f"\n#### Generation (greedy, KV cache, batch 1, prompt {s['gen_prompt']}, {s['gen_new']} new "
            f"tokens, {dtype}, {_shape_label('_'.join(f'{a}{b}' for a, b in zip('EKI', s['shapes'][0])))})\n\n"
        )
        out.append(_table(["model", "new tokens/s", "median s"], rows))
        out.append(
            f"\nDefault MoE / fastest Mixtral ({g['fastest_mixtral']}) tokens/s: "
            f"{_f(g['default_vs_fastest_mixtral_tokens_per_s'])}; our topk / fastest Mixtral: "
            f"{_f(g['topk_vs_fastest_mixtral_tokens_per_s'])}.\n"
        )
    return "\n".join(out)


def render_fidelity(fid: dict, command: str) -> str:
    s = fid["settings"]
    out = [
        f"### Router-gradient fidelity (paper Fig. 4)\n\nCommand: `{command}`. {s['experts']} experts, hidden "
        f"{s['hidden']}, I={s['inter']}, {s['layers']} MoE layers, no renormalisation, trained {s['train_steps']} "
        'steps with routing="default" on the built-in corpus (bytes, AdamW 2e-3). Then, on held-out batches, the '
        "model's own forward (sparse top-K plus the EMA defaults; eval mode, LM loss only) is run three times with "
        "the same forward value and a different router-gradient estimator: `topk` (selected experts only), "
        "`default` (unselected experts through their default vectors) and the reference, dense straight-through "
        "(every unselected expert computed). Cosine similarity of each layer's router-weight gradient with the "
        f"reference, mean over {s['eval_batches']} batches of {s['batch']}x{s['seq']} tokens "
        "(benchmarks/fidelity.py, `estimator_forward`).\n"
    ]
    layers = None
    rows = []
    for k, r in fid["by_k"].items():
        layers = len(r["topk"]["mean_per_layer"])
        for variant in ("topk", "default"):
            rows.append(
                [
                    k,
                    variant,
                    *[_f(c) for c in r[variant]["mean_per_layer"]],
                    _f(sum(r[variant]["mean_per_layer"]) / layers),
                ]
            )
    out.append(_table(["K", "routing", *[f"layer {i}" for i in range(layers or 0)], "mean"], rows))
    return "\n".join(out)


def render_quality(q: dict, command: str) -> str:
    s = q["settings"]
    out = [
        f"### Quality: small-scale pretraining\n\nCommand: `{command}`. Byte-level LM on the built-in corpus, "
        f"{s['layers']} layers (first {s['dense_layers']} dense), hidden {s['hidden']}, {s['experts']} experts "
        f"top-{s['top_k']} (I={s['inter']}, no renormalisation, beta {s.get('beta', 'per shape (method.SHAPES)')}), {s['batch']}x{s['seq']} tokens "
        f"per step, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, {s['warmup']} warm-up steps then constant LR "
        f"{s['lr']:g}, seeds {s['seeds']} (same seed = same initial weights and batches for every variant). "
        "Validation loss (nats/byte) on a fixed held-out set:\n"
    ]
    steps = [str(x) for x in s["eval_at"]]
    rows = []
    for variant, summary in q["summary"].items():
        rows.append([variant, *[f"{summary[st]['mean']:.4f} ± {summary[st]['std']:.4f}" for st in steps]])
    out.append(_table(["variant", *[f"step {st} (mean ± std)" for st in steps]], rows))
    rows = []
    for variant, summary in q["summary"].items():
        if "paired_diff_vs_topk_final" in summary:
            d = summary["paired_diff_vs_topk_final"]
            rows.append([variant, f"{d['mean']:+.4f} ± {d['std']:.4f}", ", ".join(f"{x:+.4f}" for x in d["per_seed"])])
    out.append(f"\nPaired difference to topk at step {steps[-1]} (negative = Default MoE better):\n\n")
    out.append(_table(["variant", "mean ± std", "per seed"], rows))
    rows = [
        [r["variant"], f"{r['lr']:g}", *[_f(v, 4) for v in r["val_loss"].values()], _f(r["max_spike"], 3)]
        for r in q["lr_sweep"].values()
    ]
    out.append(
        f"\nLearning-rate sweep (seed 0, {s['sweep_steps']} steps; `max spike` = largest rise of the training "
        "loss above its running minimum after warm-up):\n\n"
    )
    out.append(_table(["variant", "LR", "final val loss", "max spike"], rows))
    return "\n".join(out)


def render_serving(r: dict, command: str) -> str:
    m, v, summary = r["model"], r["validation"], r.get("training_summary") or {}
    dense = f" ({m['dense_layers']} dense)" if m["dense_layers"] else ""
    trained = ""
    if summary:
        recorded = summary.get("final_losses", {}).get("eval_loss")
        trained = f"; trained {summary['steps']} steps on {summary['tokens']:,} tokens"
        trained += f" (validation loss recorded by the run: {recorded:.4f})" if recorded is not None else ""
    out = [
        f"### Serving with and without the defaults\n\nCommand: `{command}`. Checkpoint `{r['checkpoint']}`: "
        f"routing={m['routing']!r}, {m['num_experts']} experts top-{m['top_k']}, {m['layers']} layers{dense}, "
        f"hidden {m['hidden_size']}, {m['parameters'] / 1e6:.2f}M parameters{trained}. Validation: "
        f"{v['sequences']} sequences of {v['sequence_length']} tokens ({v['tokens']:,} tokens) of the built-in "
        "corpus' validation split; loss = mean next-token cross-entropy (nats), as `Trainer.evaluate` reports it.\n"
    ]
    labels = {
        "defaults_on": "defaults on (the checkpoint as saved; served with `trust_remote_code`)",
        "defaults_off": "defaults off (`config.default_in_inference=False`)",
    }
    on = r["losses"]["defaults_on"]
    rows = []
    for name, loss in r["losses"].items():
        target = name.removeprefix("export_")
        label = labels.get(name, f"`default-moe export --to {target}` ({r['exports'].get(target)})")
        rows.append([label, _f(loss, 4), "-" if name == "defaults_on" else f"{loss - on:+.4f}", r["seconds"][name]])
    out.append(_table(["model", "validation loss", "vs defaults on", "eval s"], rows))
    refused = {t: why for t, why in r["exports"].items() if f"export_{t}" not in r["losses"]}
    if refused:
        out.append("\nExports the checkpoint does not allow: " + "; ".join(f"{t}: {w}" for t, w in refused.items()))
    return "\n".join(out) + "\n"


def _paired_cell(d: dict | None) -> str:
    if not d:
        return "-"
    ci = f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else ""
    return f"{d['mean']:+.4f}{ci}"


def _reach_cell(fractions: list | None) -> str:
    if not fractions:
        return "-"
    reached = [f for f in fractions if f is not None]
    if not reached:
        return f"not reached (0/{len(fractions)})"
    return f"{sum(reached) / len(reached):.0%} ({len(reached)}/{len(fractions)} seeds)"


def _method_rows(summary: dict, detail: bool) -> list[list]:
    rows = []
    for shape, variants in summary.items():
        topk_seconds = variants.get("topk", {}).get("step_seconds")
        for variant, r in variants.items():
            d = r.get("paired_diff_vs_topk")
            row = [shape, variant, len(r["seeds"]), f"{r['final_val_mean']:.4f} ± {r['final_val_std']:.4f}"]
            row += [_paired_cell(d), f"{d['better']}/{len(d['per_seed'])}" if d else "-"]
            if detail:
                row += [", ".join(f"{x:+.3f}" for x in d["per_seed"]) if d else "-"]
                row += [_reach_cell(r.get("tokens_to_topk_final"))]
            row += [" / ".join(_f(c, 2) for c in r["cosine_own_per_layer"])]
            if detail:
                row += [" / ".join(_f(c, 2) for c in r["cosine_topk_per_layer"])]
            row += [_f(r["expert_load_max_over_mean"], 2)]
            if detail:
                row += [_pct(r["step_seconds"] / topk_seconds) if topk_seconds else "-"]
            rows.append(row)
    return rows


def render_method(m: dict, command: str) -> str:
    s, phases = m["settings"], m["phases"]
    mo = s["model"]
    out = [
        f"### Method: the paper's protocol at our scale\n\nCommand: `{command}`. Byte-level LM on the built-in corpus, "
        f"{mo['layers']} layers (first dense), hidden {mo['hidden']}, expert width {mo['inter']}, {mo['heads']} heads, "
        f"{s['batch']}x{s['seq']} tokens per step, no renormalisation, beta {s.get('beta', 'per shape (method.SHAPES)')}, Switch load balancing 0.01, "
        "AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, 5% linear warm-up then cosine decay to 0; same seed = same "
        "initial weights and batches for every variant. Validation loss in nats/byte on a fixed held-out set. "
        "Paired difference = variant minus top-K per seed, mean [95% t interval]; negative = better than top-K. "
        "`cos` = per-MoE-layer cosine of the run's own router gradient to the dense straight-through gradient, "
        "mean over points in training (held-out batch); `load` = max/mean tokens per expert on the validation set, "
        "mean over layers. Variants: " + "; ".join(f"`{name}` = `{cfg}`" for name, cfg in m["variants"].items()) + ".\n"
    ]
    if "cost_vs_topk" in m:
        variants = list(m["variants"])
        rows = [[key, *[_pct(r[v]) for v in variants]] for key, r in m["cost_vs_topk"].items()]
        out.append(
            f"\nTraining-step cost vs top-K (process CPU time, one thread, median of {s['cost_reps']} "
            "interleaved steps; `H` hidden size, `T` tokens per step):\n\n"
        )
        out.append(_table(["shape", *variants], rows))
    if "lr_grid" in phases and "summary_by_lr" in phases["lr_grid"]:
        grid = phases["lr_grid"]["summary_by_lr"]
        shapes = list(next(iter(grid.values())))
        rows = [[lr, *[f"{g[sh]['topk']['final_val_mean']:.4f}" for sh in shapes]] for lr, g in grid.items()]
        out.append(
            f"\nLearning-rate grid (top-K, seed 0, {s['screen_steps']} steps); the protocol uses "
            f"{m.get('lr', '?'):g}:\n\n"
        )
        out.append(_table(["LR", *shapes], rows))
    header = ["setting", "variant", "seeds", "final val loss", "paired diff vs topk", "better"]
    if "screen" in phases and "summary_by_lr" in phases["screen"]:
        ((lr, summary),) = phases["screen"]["summary_by_lr"].items()
        out.append(
            f"\nScreen ({s['screen_steps']} steps, {s['screen_steps'] * s['batch'] * s['seq']:,} tokens, LR {lr}); "
            "winner among the "
            f"non-paper variants: `{m.get('screen_winner')}`:\n\n"
        )
        out.append(_table([*header, "cos per layer", "load"], _method_rows(summary, detail=False)))
    if "stress" in phases and "summary_by_lr" in phases["stress"]:
        rows = []
        for lr, summary in phases["stress"]["summary_by_lr"].items():
            for shape, variants in summary.items():
                for variant, r in variants.items():
                    run = next(
                        x
                        for x in phases["stress"]["runs"]
                        if x["variant"] == variant and x["shape"] == shape and f"{x['lr']:g}" == lr
                    )
                    rows.append(
                        [
                            lr,
                            shape,
                            variant,
                            _f(r["final_val_mean"], 4),
                            _f(r["max_spike"], 3),
                            "yes" if run["diverged"] else "no",
                        ]
                    )
        out.append(
            f"\nHigher learning rates (seed 0, {s['stress_steps']} steps; `max spike` = largest rise of the "
            "training loss above its running minimum after warm-up):\n\n"
        )
        out.append(_table(["LR", "setting", "variant", "final val loss", "max spike", "diverged"], rows))
    if "confirm" in phases:
        summary = phases["confirm"].get("summary_by_lr")
        if summary is None:  # an interrupted run: summarise what finished
            from .method import summarise

            summary = {"?": summarise(phases["confirm"]["runs"])}
        ((lr, summary),) = summary.items()
        out.append(
            f"\nConfirmation ({s['confirm_steps']} steps, {s['confirm_steps'] * s['batch'] * s['seq']:,} tokens, "
            f"LR {lr}). `reach` = tokens "
            "the variant needed to reach top-K's final validation loss, as a share of top-K's, mean over the "
            "seeds that reached it; `top-K's cos` = the same model's router gradient with top-K's estimator:\n\n"
        )
        out.append(
            _table(
                [*header, "per seed", "reach", "cos per layer", "top-K's cos per layer", "load", "step time vs topk"],
                _method_rows(summary, detail=True),
            )
        )
    return "\n".join(out)


def render(results_list: list[dict]) -> str:
    first = results_list[0]
    m = first.get("machine", {})
    if "gpu" in m:
        machine = (
            f"Machine: {m['gpu']} ({m['gpu_memory_bytes'] / 2**30:.0f} GiB, CUDA {m.get('cuda', '?')}), "
            f"{m.get('processor', '?')}, {m.get('cpus', '?')} CPUs"
        )
    else:
        machine = (
            f"Machine: {m.get('processor', '?')}, {m.get('cpus', '?')} CPUs **shared with other engineers running "
            f"tests** (timings are noisy; every comparison is interleaved within one process and reported as a "
            f"ratio of medians)"
        )
    out = [
        "## Benchmarks\n",
        f"{machine}, torch intra-op threads {m.get('torch_threads', '?')}, {m.get('platform', '?')}, Python "
        f"{m.get('python', '?')}, torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}. "
        f"Date (UTC): {m.get('date_utc', '?')}.\n",
        "Commands: " + "; ".join(f"`{r['command']}`" for r in results_list) + " (then "
        "`python -m benchmarks.report <json files>`).\n",
    ]
    for results in results_list:
        for name, res in results.get("benchmarks", {}).items():
            if name == "speed":
                out.append(render_speed(res, results["command"]))
            elif name == "fidelity":
                out.append(render_fidelity(res, results["command"]))
            elif name == "quality":
                out.append(render_quality(res, results["command"]))
            elif name == "serving":
                out.append(render_serving(res, results["command"]))
            elif name == "method":
                out.append(render_method(res, results["command"]))
            elif name == "conversion":
                out.append(f"### Conversion memory\n\n```\n{json.dumps(res, indent=1)[:3000]}\n```\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(render([json.loads(open(path).read()) for path in sys.argv[1:]]))
