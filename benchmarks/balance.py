"""Why Default MoE's experts balance worse here than top-K's (issue 19, item 5): diagnostics over training, and the
explanations tested as variants.

The model and data are the method benchmark's (benchmarks/method.py: byte-level LM on the built-in corpus, hidden 64,
4 layers with the first dense, 8 experts top-1, beta 0.9, Switch loss 0.01 over the batch, AdamW, warm-up and cosine
decay, clip 1). Each run records, at points over training, per MoE layer and per expert (`diagnostics`):

- the EMA defaults D_i: their norms, the norm of their mean against their mean norm (1 = all the same vector, ~0 =
  no common part), and the cosine of each D_i to the mean;
- the router: mass left on unselected experts (1 - sum of the selected probabilities), mean top probability, tokens
  per expert (max/mean and entropy / log E), mean router probability per expert;
- the size of the default term `sum_{i not in A} p_i D_i` against the routed term `sum_{i in A} w_i E_i(x)` and
  against the block's output, the cosine of the term to the mean default, and the part of it that is the common
  component `(1 - p_A) mean_i D_i`;
- the train/validation gap: mean training loss over the steps before the point, minus the validation loss.

For runs whose forward does not use the defaults, the defaults are measured as they would be: routing="topk" runs
track the paper's EMA without using it (`track_defaults`: the block's own EMA code with the default term dropped,
so forward, backward and router losses stay exactly top-K's; routing="default" with default_term="gradient" would
track the same EMA but gives the router the default term's gradient, so it is not a top-K run: it is the `gradient`
row). Their "default term" is the one the paper's form would add; `in_forward` says which.

Variants (`VARIANTS`; each a row, per-variant learning rate, paired seeds against top-K): the paper's form, top-K,
gradient-only, centred defaults (`centre_defaults`: the default term uses D_i minus the mean over experts, so it
carries no shared bias), after-use EMA order, router-probability weighting, beta, and the aux-loss coefficient per arm.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import get_cosine_schedule_with_warmup

from default_moe.modeling_default_moe import DefaultMoeSparseMoeBlock

from . import method
from .common import build_ours, byte_corpus, sample_batches
from .quality import max_spike, train, validation_loss

# name -> (config overrides on the method benchmark's 8e-top1 model, model patch or None)
VARIANTS = {  # in the order they run: the explanations' tests first
    "topk": (dict(routing="topk"), "track_defaults"),
    "default": (dict(routing="default"), None),  # the paper's form
    "centred": (dict(routing="default"), "centre_defaults"),  # no shared bias in the default term
    # Experts that get no tokens keep their default forever (stale): let it decay instead, or keep it current.
    "decay_stale": (dict(routing="default"), "decay_stale_defaults"),
    "unrouted": (dict(routing="default", default_ema_source="unrouted"), None),
    "after_use": (dict(routing="default", default_ema_update="after_use"), None),  # no leak of the batch
    "gradient": (dict(routing="default", default_term="gradient"), None),  # the router gradient without the term
    "aux_0.05": (dict(routing="default", router_aux_loss_coef=0.05), None),  # more balancing pressure, per arm
    "topk_aux_0.05": (dict(routing="topk", router_aux_loss_coef=0.05), "track_defaults"),
    "router_prob": (dict(routing="default", default_ema_weighting="router_prob"), None),
    "beta_0.5": (dict(routing="default", default_ema_beta=0.5), None),
    "beta_0.99": (dict(routing="default", default_ema_beta=0.99), None),
}


# ----------------------------------------------------------------------------------------------------------------
# Model patches (benchmark-local; the Hub files stay as they are)


class CentredDefaultsBlock(DefaultMoeSparseMoeBlock):
    """The default term uses D_i - mean_j D_j: `sum_{i not in A} p_i (D_i - D_mean)`, in training and in eval. The
    EMA itself (the buffer) is unchanged; only what the forward adds, and so the router's gradient
    <dL/dy, D_i - D_mean>, lose the component shared by all experts."""

    def _training_statistics(self, *args):
        defaults_EH, counts_E, ema_update = super()._training_statistics(*args)
        return _centred(defaults_EH), counts_E, ema_update

    def forward(self, hidden_states, token_mask=None, return_router_losses=False):
        if self.training:
            return super().forward(hidden_states, token_mask, return_router_losses)
        ema = self.default_outputs.ema  # eval reads the buffer directly: lend it the centred defaults meanwhile
        self.default_outputs.ema = _centred(ema)
        try:
            return super().forward(hidden_states, token_mask, return_router_losses)
        finally:
            self.default_outputs.ema = ema


def _centred(defaults_EH: torch.Tensor | None) -> torch.Tensor | None:
    return None if defaults_EH is None else defaults_EH - defaults_EH.mean(0, keepdim=True)


class TrackedDefaultsBlock(DefaultMoeSparseMoeBlock):
    """A top-K block that keeps the paper's EMA of its experts' outputs without using it: the block's own EMA code
    runs (its config says routing="default") and its defaults are dropped, so the forward value, every gradient and
    the router losses are top-K's; eval adds nothing (default_in_inference=False, default_term="forward")."""

    def _training_statistics(self, *args):
        _, counts_E, ema_update = super()._training_statistics(*args)
        return None, counts_E, ema_update


class DecayingDefaultsBlock(DefaultMoeSparseMoeBlock):
    """An expert that gets no tokens in a forward has its default decay towards zero, D_i <- beta D_i, instead of
    keeping it unchanged; experts that get tokens update as the paper's EMA. (The paper's rule leaves a dead
    expert's last default in every token's output for as long as the router gives the expert probability.)"""

    def _ema_after(self, update_E1: torch.Tensor, batch_mean_EH: torch.Tensor) -> torch.Tensor:
        ema_EH, beta = self.default_outputs.ema, self.config.default_ema_beta
        return torch.where(update_E1, beta * ema_EH + (1.0 - beta) * batch_mean_EH, beta * ema_EH)


def _patch_blocks(model, block_class, name: str):
    """Turn every MoE block of a routing="default" model into `block_class`, in place."""
    if model.config.routing != "default":
        raise ValueError(f"{name}: routing must be 'default', got {model.config.routing!r}")
    for block in moe_blocks(model):
        block.__class__ = block_class
    return model


def decay_stale_defaults(model):
    """Patch every MoE block of a routing="default" model in place to `DecayingDefaultsBlock`."""
    return _patch_blocks(model, DecayingDefaultsBlock, "decay_stale_defaults")


def centre_defaults(model):
    """Patch every MoE block of a routing="default" model in place to centred defaults (`CentredDefaultsBlock`)."""
    return _patch_blocks(model, CentredDefaultsBlock, "centre_defaults")


def track_defaults(model):
    """Patch every MoE block of a routing="topk" model in place to track (not use) the EMA defaults."""
    if model.config.routing != "topk":
        raise ValueError(f"track_defaults: routing must be 'topk', got {model.config.routing!r}")
    for block in moe_blocks(model):
        block.config = type(model.config)(
            **{**model.config.to_dict(), "routing": "default", "default_term": "forward", "default_in_inference": False}
        )
        block.__class__ = TrackedDefaultsBlock
    return model


PATCHES = {
    "centre_defaults": centre_defaults,
    "decay_stale_defaults": decay_stale_defaults,
    "track_defaults": track_defaults,
}


def moe_blocks(model) -> list[DefaultMoeSparseMoeBlock]:
    return [layer.mlp for layer in model.model.layers if layer.is_moe]


# ----------------------------------------------------------------------------------------------------------------
# Diagnostics


@torch.no_grad()
def diagnostics(model, batches: torch.Tensor) -> list[dict]:
    """Per MoE layer: the defaults, the router and the default term on `batches` (eval mode; see the module doc)."""
    model.eval()
    blocks = moe_blocks(model)
    inputs: dict[int, list] = {i: [] for i in range(len(blocks))}
    hooks = [
        block.register_forward_hook(lambda _, args, out, i=i: inputs[i].append((args[0], out)))
        for i, block in enumerate(blocks)
    ]
    try:
        for batch in batches:
            model(input_ids=batch)
    finally:
        for hook in hooks:
            hook.remove()
    model.train()
    return [_layer_diagnostics(block, inputs[i]) for i, block in enumerate(blocks)]


def _layer_diagnostics(block: DefaultMoeSparseMoeBlock, captured: list) -> dict:
    num_experts = block.num_experts
    x_TH = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in captured])
    y_TH = torch.cat([(out[0] if isinstance(out, tuple) else out).reshape(-1, x_TH.shape[-1]) for _, out in captured])
    _, probs_TE, weights_TK, index_TK = block.gate(x_TH)
    routed_TH = block.experts(x_TH, index_TK, weights_TK).float()
    ema_EH = block.default_outputs.ema.float()
    in_forward = block.config.routing == "default" and block.config.default_term == "forward"
    if isinstance(block, TrackedDefaultsBlock):
        in_forward = False
    used_EH = _centred(ema_EH) if isinstance(block, CentredDefaultsBlock) else ema_EH
    unselected_TE = probs_TE.scatter(1, index_TK, 0.0)
    default_TH = unselected_TE @ used_EH  # as the forward adds it (or, not in the forward, as the paper's would)
    mean_H = ema_EH.mean(0)
    unselected_mass_T = unselected_TE.sum(-1)
    common_TH = unselected_mass_T.unsqueeze(-1) * mean_H
    counts_E = torch.bincount(index_TK.flatten(), minlength=num_experts).float()
    share_E = counts_E / counts_E.sum()
    entropy = float(-(share_E * share_E.clamp_min(1e-12).log()).sum() / math.log(num_experts))
    norms_E = ema_EH.norm(dim=-1)

    def mean_norm(v_TH):
        return float(v_TH.norm(dim=-1).mean())

    return {
        "in_forward": in_forward,
        "ema_norm_per_expert": norms_E.tolist(),
        "ema_norm_mean": float(norms_E.mean()),
        "ema_common_norm": float(mean_H.norm()),
        "ema_common_ratio": float(mean_H.norm() / norms_E.mean().clamp_min(1e-12)),
        "ema_cos_to_mean_per_expert": F.cosine_similarity(ema_EH, mean_H.expand_as(ema_EH), dim=-1).tolist(),
        "unselected_mass": float(unselected_mass_T.mean()),
        "top_prob": float(probs_TE.max(-1).values.mean()),
        "tokens_per_expert": counts_E.tolist(),
        "load_max_over_mean": float(counts_E.max() / counts_E.mean()),
        "load_entropy": entropy,
        "router_prob_per_expert": probs_TE.mean(0).tolist(),
        "routed_norm": mean_norm(routed_TH),
        "default_norm": mean_norm(default_TH),
        "output_norm": mean_norm(y_TH.float()),
        "default_over_routed": mean_norm(default_TH) / max(mean_norm(routed_TH), 1e-12),
        "default_over_output": mean_norm(default_TH) / max(mean_norm(y_TH.float()), 1e-12),
        "default_cos_to_mean": float(F.cosine_similarity(default_TH, mean_H.expand_as(default_TH), dim=-1).mean()),
        "common_term_over_default": mean_norm(common_TH) / max(mean_norm(unselected_TE @ ema_EH), 1e-12),
    }


# ----------------------------------------------------------------------------------------------------------------
# Runs


def settings(quick: bool) -> dict:
    """The method benchmark's model and recipe; runs of `steps` steps with diagnostics at `points` points."""
    s = method.settings(quick)
    if quick:
        return {**s, "steps": 6, "points": 2, "lr_grid": [1e-3, 3e-3], "grid_seeds": [0], "seeds": [0, 1]}
    # 800 steps (819,200 tokens): the length of the per-variant grid; the anomaly is there (load 1.8-3.8 vs
    # 1.3-2.4) at half the confirmation's cost.
    return {**s, "steps": 800, "points": 8, "lr_grid": [2e-3, 4e-3], "grid_seeds": [0, 1], "seeds": [0, 1, 2, 3, 4]}


def _log(msg: str) -> None:
    print(f"[balance {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(s: dict, variant: str, seed: int):
    overrides, patch = VARIANTS[variant]
    base = method._config(s, "8e-top1", "topk")
    model = build_ours(type(base)(**{**base.to_dict(), **overrides}), seed=seed)
    return PATCHES[patch](model) if patch else model


def train_run(job: dict) -> dict:
    """One run: job = dict(variant, seed, lr, quick). Validation loss, diagnostics and train/validation gap at
    `points` points over training."""
    s = settings(job.get("quick", False))
    steps = s["steps"]
    torch.set_num_threads(1)
    quick = job.get("quick", False)
    train_data = byte_corpus(400_000 if quick else 4_000_000, "train")
    valid = byte_corpus(50_000 if quick else 1_000_000, "validation")
    valid_batches = sample_batches(valid, s["batch"], s["seq"], s["eval_batches"], seed=4242)
    model = build(s, job["variant"], job["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    eval_at = sorted({max(1, round(steps * (i + 1) / s["points"])) for i in range(s["points"])})
    points: dict = {}
    losses: list[float] = []

    def evaluate(step, loss):
        losses.append(loss)
        if step in eval_at:
            val = validation_loss(model, valid_batches) if math.isfinite(loss) else math.inf
            window = losses[-max(1, steps // (2 * s["points"])) :]
            points[str(step)] = {
                "val": val,
                "train": statistics.fmean(window),
                "layers": diagnostics(model, valid_batches) if math.isfinite(val) else None,
            }

    start = time.perf_counter()
    batches = sample_batches(train_data, s["batch"], s["seq"], steps, seed=1000 + job["seed"])
    train_losses = train(model, optimizer, schedule, batches, evaluate)
    final = points[str(eval_at[-1])]["val"]
    return {
        **{k: job[k] for k in ("variant", "seed", "lr")},
        "steps": steps,
        "tokens_per_step": s["batch"] * s["seq"],
        "points": points,
        "final_val": final,
        "max_spike": max_spike(train_losses, warmup),
        "diverged": not math.isfinite(final) or final > math.log(256),
        "train_seconds": time.perf_counter() - start,
    }


def grid_jobs(quick: bool = False, variants: list[str] | None = None) -> list[dict]:
    """The learning-rate grid of every variant, in the order that leaves whole, paired comparisons if cut short:
    rate by rate, seed by seed, the variants in `VARIANTS`' order (the most informative first)."""
    s = settings(quick)
    variants = variants or list(VARIANTS)
    grid = [dict(variant=v, seed=seed, lr=lr) for lr in s["lr_grid"] for seed in s["grid_seeds"] for v in variants]
    return [{**job, "quick": quick} for job in grid]


def seed_jobs(runs: list[dict], quick: bool = False, variants: list[str] | None = None) -> list[dict]:
    """The remaining seeds of every variant (of `variants`, default all) whose grid is complete in `runs`, at its
    best rate."""
    s = settings(quick)
    best = best_lrs(runs, s)
    return [
        dict(variant=v, seed=seed, lr=lr, quick=quick)
        for seed in s["seeds"]
        if seed not in s["grid_seeds"]
        for v, lr in best.items()
        if variants is None or v in variants
    ]


def best_lrs(runs: list[dict], s: dict, group=lambda r: r["variant"]) -> dict:
    """Per group of runs (a variant, by default) whose grid is whole: its best rate (`own_best`)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(group(r), []).append(r)
    return {key: own_best(mine, s) for key, mine in groups.items() if grid_done(mine, s)}


# ----------------------------------------------------------------------------------------------------------------
# Tables (markdown, from the results files; partial results render with their seed counts)

RESULTS = Path(__file__).resolve().parent / "results"


def read_runs(path: Path) -> list[dict]:
    """The results file's runs (one JSON object a line); a missing file is no runs."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else math.nan


def _layers(run: dict, point: str | None = None) -> list[dict]:
    points = run["points"]
    return points[point or max(points, key=int)]["layers"] or []


def _per_layer(runs: list[dict], key: str, point: str | None = None) -> str:
    """Mean over runs of a per-layer number, layers separated by slashes."""
    rows = [[layer[key] for layer in _layers(r, point)] for r in runs]
    rows = [row for row in rows if row]
    if not rows:
        return "-"
    return " / ".join(f"{_mean(col):.2f}" for col in zip(*rows, strict=True))


def _dead(runs: list[dict]) -> tuple[str, str]:
    """Per layer, mean over runs: experts that got no validation token, and the router mass they get."""
    counts, mass = [], []
    for r in runs:
        layers = _layers(r)
        dead = [[n == 0 for n in layer["tokens_per_expert"]] for layer in layers]
        counts.append([sum(d) for d in dead])
        mass.append([sum(p for p, d in zip(layer["router_prob_per_expert"], ds, strict=True) if d)
                     for layer, ds in zip(layers, dead, strict=True)])  # fmt: skip

    def cell(rows, digits):
        return " / ".join(f"{_mean(col):.{digits}f}" for col in zip(*rows, strict=True)) if rows else "-"

    return cell(counts, 1), cell(mass, 2)


def _cos_mean(runs: list[dict]) -> str:
    rows = [[_mean(layer["ema_cos_to_mean_per_expert"]) for layer in _layers(r)] for r in runs]
    rows = [row for row in rows if row]
    return " / ".join(f"{_mean(col):.2f}" for col in zip(*rows, strict=True)) if rows else "-"


def _gap(runs: list[dict]) -> str:
    gaps = [r["points"][max(r["points"], key=int)]["train"] - r["final_val"] for r in runs]
    return f"{_mean(gaps):+.3f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def _paired_cell(diffs: list[float]) -> str:
    if not diffs:
        return "-"
    p = method.paired(diffs)
    interval = f" [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p["ci95"] else ""
    return f"{p['mean']:+.3f}{interval} ({p['better']}/{len(diffs)} better)"


def grid_done(runs: list[dict], s: dict) -> bool:
    """Whether `runs` (one variant's) hold every grid cell: each rate on each grid seed."""
    cells = {(r["lr"], r["seed"]) for r in runs}
    return all((lr, seed) in cells for lr in s["lr_grid"] for seed in s["grid_seeds"])


def own_best(runs: list[dict], s: dict) -> float | None:
    """The grid rate with the lowest mean final loss over the grid's seeds among `runs` (one variant's, so far), or
    None. The seeds run later at the chosen rate do not count: a mean over more seeds is not comparable."""
    by_lr: dict = {}
    for r in runs:
        if r["lr"] in s["lr_grid"] and r["seed"] in s["grid_seeds"]:
            by_lr.setdefault(r["lr"], []).append(r["final_val"])
    return min(by_lr, key=lambda lr: statistics.fmean(by_lr[lr])) if by_lr else None


def render(runs: list[dict], quick: bool = False) -> str:
    """The load-balance tables: diagnostics at the end and over training, and the variants as paired rows."""
    s = settings(quick)
    if not runs:
        return "### Load balance (issue 19, item 5)\n\nNo runs yet.\n"
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    first_lr = s["lr_grid"][0]
    out = [
        "### Load balance (issue 19, item 5)\n",
        f"{len(runs)} runs of {s['steps']} steps ({s['steps'] * s['batch'] * s['seq']:,} tokens), the method "
        "benchmark's model (hidden 64, 4 layers, first dense, 8 experts top-1, beta 0.9, Switch loss 0.01). Values "
        "per MoE layer (L1 / L2 / L3) on the held-out batches, at the end of training. `load` = max/mean tokens "
        "per expert, `H` = entropy of the expert shares / log 8 (1 = even), `unsel.` = router mass on unselected "
        "experts, `norm D` = mean norm of the EMA defaults, `common` = norm of their mean / their mean norm, "
        "`cos` = mean cosine of D_i to the mean, `term/routed` and `term/out` = mean norm of the default term over "
        "that of the routed term and of the block's output (for top-K and gradient-only: the term the paper's "
        "form would add; top-K tracks the EMA without using it), `common/term` = share of the term's norm that is "
        "`(1 - p_A) mean D`, `dead` = experts that got no token of the held-out batches, `p dead` = the router's "
        "mean probability on them (their defaults, frozen since they last got tokens, are in every token's output "
        "with that weight), `train-val` = training loss (mean over the last 50 steps) minus validation loss.\n",
    ]
    header = ["variant", "seeds", "load", "H", "unsel.", "norm D", "common", "cos", "term/routed", "term/out"]
    header += ["common/term", "dead", "p dead", "train-val"]
    for lr in sorted({r["lr"] for r in runs}):
        rows = []
        for v in variants:
            at = [r for r in runs if r["variant"] == v and r["lr"] == lr]
            if not at:
                continue
            rows.append(
                [v, len(at), _per_layer(at, "load_max_over_mean"), _per_layer(at, "load_entropy"),
                 _per_layer(at, "unselected_mass"), _per_layer(at, "ema_norm_mean"),
                 _per_layer(at, "ema_common_ratio"), _cos_mean(at), _per_layer(at, "default_over_routed"),
                 _per_layer(at, "default_over_output"), _per_layer(at, "common_term_over_default"), *_dead(at),
                 _gap(at)]
            )  # fmt: skip
        out += [f"\nAt LR {lr:g}:\n\n", _table(header, rows)]

    over = [v for v in ("topk", "default", "centred", "after_use") if v in variants]
    seed0 = {v: next((r for r in runs if r["variant"] == v and r["lr"] == first_lr), None) for v in over}
    seed0 = {v: r for v, r in seed0.items() if r}
    if seed0:
        steps = sorted({int(p) for r in seed0.values() for p in r["points"]})
        rows = []
        for step in steps:
            row = [step]
            for r in seed0.values():
                point = r["points"].get(str(step))
                layers = (point or {}).get("layers") or []
                row.append(
                    " / ".join(
                        f"{_mean(layer[k] for layer in layers):.2f}"
                        for k in ("load_max_over_mean", "ema_common_ratio", "default_over_output")
                    )
                    + f" / {point['train'] - point['val']:+.3f}"
                    if layers
                    else "-"
                )
            rows.append(row)
        out += [
            f"\nOver training (seed {next(iter(seed0.values()))['seed']}, LR {first_lr:g}; each cell: load / common / "
            "term/out, means over the MoE layers / train-val):\n\n",
            _table(["step", *seed0], rows),
        ]

    topk_best = own_best([r for r in runs if r["variant"] == "topk"], s)
    rows = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        per_lr = []
        for lr in s["lr_grid"]:
            cell = [r["final_val"] for r in mine if r["lr"] == lr]
            per_lr.append(f"{_mean(cell):.4f} ({len(cell)})" if cell else "-")
        best = own_best(mine, s)
        at_best = {r["seed"]: r for r in mine if r["lr"] == best}
        topk = {r["seed"]: r for r in runs if r["variant"] == "topk" and r["lr"] == topk_best}
        # best against best only once both grids are whole: a partial grid's "best" is not one
        whole = grid_done(mine, s) and grid_done([r for r in runs if r["variant"] == "topk"], s)
        common = sorted(set(at_best) & set(topk)) if whole else []
        same_lr = {r["seed"]: r for r in mine if r["lr"] == first_lr}
        topk_same = {r["seed"]: r for r in runs if r["variant"] == "topk" and r["lr"] == first_lr}
        common_same = sorted(set(same_lr) & set(topk_same))
        load = _mean(_mean(layer["load_max_over_mean"] for layer in _layers(r)) for r in at_best.values())
        rows.append(
            [v, *per_lr, f"{best:g}" if grid_done(mine, s) else f"({best:g}: grid partial)",
             "-" if v == "topk" else _paired_cell([at_best[i]["final_val"] - topk[i]["final_val"] for i in common]),
             "-" if v == "topk" else _paired_cell([same_lr[i]["final_val"] - topk_same[i]["final_val"]
                                                   for i in common_same]),
             f"{load:.2f}"]
        )  # fmt: skip
    lr_cols = [f"LR {lr:g} (seeds)" for lr in s["lr_grid"]]
    out += [
        "\nVariants: final validation loss per rate (mean, number of seeds), each variant's best rate so far, and "
        "the paired difference to top-K (variant minus top-K, same seeds; mean [95% t interval]; negative = better) "
        f"with each at its own best rate once both grids are whole (top-K's so far: {topk_best:g}), and both at "
        f"{first_lr:g}; `load` = max/mean at the best rate, mean over layers and seeds:\n\n",
        _table(["variant", *lr_cols, "best LR", "vs top-K, own best", f"vs top-K at {first_lr:g}", "load"], rows),
    ]
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Running


def describe(job: dict, result: dict) -> str:
    return f"{job['variant']} seed {job['seed']} lr {job['lr']:g}: val {result['final_val']:.4f}"


def run(
    quick: bool = False,
    workers: int = 1,
    results_path: Path | None = None,
    deadline_s: float | None = None,
    log=_log,
    variants: list[str] | None = None,
) -> dict:
    """The study, resumable: the grid, then the remaining seeds at each variant's best rate (none started after
    `deadline_s`), for `variants` (default all); returns the tables of everything in the results file."""
    from .runs import load_results, run_jobs

    path = results_path or RESULTS / "balance_runs.jsonl"
    start = time.monotonic()
    run_jobs(grid_jobs(quick, variants), train_run, path, workers, log=log, describe=describe, deadline_s=deadline_s)
    grid = [r["result"] for r in load_results(path)]
    left = None if deadline_s is None else max(0.0, deadline_s - (time.monotonic() - start))
    run_jobs(seed_jobs(grid, quick, variants), train_run, path, workers, log=log, describe=describe, deadline_s=left)
    runs = [r["result"] for r in load_results(path)]
    return {"results_file": str(path), "runs": len(runs), "tables": render(runs, quick)}


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.balance` prints the tables of items 5 and 4 (markdown) from their results files."""
    import argparse

    from . import finetune
    from .runs import load_results

    parser = argparse.ArgumentParser(prog="python -m benchmarks.balance", description=main.__doc__)
    parser.add_argument("--balance", type=Path, default=RESULTS / "balance_runs.jsonl", help="item 5's results")
    parser.add_argument("--finetune", type=Path, default=RESULTS / "finetune_runs.jsonl", help="item 4's results")
    args = parser.parse_args(argv)
    print(render([r["result"] for r in load_results(args.balance)]))
    print(finetune.render([r["result"] for r in load_results(args.finetune)]))


if __name__ == "__main__":
    main()
