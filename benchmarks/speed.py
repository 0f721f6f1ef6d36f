"""Training-step speed and memory, MoE-layer overhead, scaling, and generation speed (CPU fp32/bf16, or CUDA bf16).

Every comparison runs its variants round-robin in one process (A B C, C B A, ...) and reports ratios of medians.
All variants of one shape share the same weights (copied state dicts) and the same batch.

`--device cuda` (`settings(quick, "cuda")`) runs the training steps and generation at the paper's shapes scaled to
one GPU: hidden 1024, expert width 2816, 8 experts top-1 and top-2 and 32 experts top-4, sequence 2048, bf16. Runs
are timed with CUDA events after a synchronisation, every variant is warmed up first, and each training step's peak
GPU memory (`torch.cuda.max_memory_allocated` above what was allocated before the step) is recorded. transformers'
Mixtral runs with the fastest of its experts implementations (grouped_mm, batched_mm, eager), measured per shape;
one that runs out of GPU memory is dropped and reported.

Variants of a training step (forward + backward + AdamW step, loss incl. the load-balancing loss):
  default  - our model, routing="default" (EMA defaults, dense router gradient)
  topk     - our model, routing="topk" (the standard sparse top-K layer)
  dense_st - our model with every MoE block computing *all* experts for the straight-through router gradient
             (DenseMixer-style; benchmark-local subclass, see common.DenseStraightThroughBlock)
  mixtral  - transformers' MixtralForCausalLM with the same weights and its fastest experts implementation
  olmoe    - transformers' OlmoeForCausalLM, compared with our topk model in OLMoE form (qk_norm, no renormalisation)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import torch

from .common import (
    build_ours,
    build_peer,
    drop_out_of_memory,
    interleaved_times,
    make_dense_st,
    median,
    our_config,
    train_step_fn,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ("layer", "steps", "overhead", "memory", "scaling", "generation")
DEVICE_PARTS = {"cpu": PARTS, "cuda": ("steps", "generation")}
# transformers' experts implementations tried per shape (batched_mm is left out on the CPU: see peer_implementation)
PEER_IMPLEMENTATIONS = {"cpu": ("grouped_mm", "eager"), "cuda": ("grouped_mm", "batched_mm", "eager")}


def settings(quick: bool, device: str = "cpu") -> dict:
    if device == "cuda":
        return _cuda_settings(quick)
    common = dict(device="cpu", dtypes=["fp32", "bf16"], warmup=1)
    if quick:
        return dict(
            **common,
            hidden=64,
            layers=2,
            vocab=256,
            heads=4,
            batch=2,
            seq=64,
            bf16_batch=1,
            shapes=[(8, 2, 64), (16, 4, 32)],
            reps=1,
            bf16_reps=1,
            dense_reps=1,
            layer_reps=2,
            scaling_experts=[4, 8],
            scaling_batches=[1, 2],
            gen_prompt=8,
            gen_new=4,
            gen_reps=1,
            peak_rss=False,
            overhead_reps=1,
        )
    return dict(
        **common,
        hidden=256,
        layers=2,
        vocab=1024,
        heads=4,
        batch=8,
        seq=512,  # 4096 tokens per step in fp32
        bf16_batch=2,  # 1024 tokens per step in bf16: bf16 matmuls are ~45x slower than fp32 on this CPU
        # (experts, top-k, expert width): constant active expert width K*I = 512, as in fine-grained MoEs
        shapes=[(8, 2, 256), (32, 4, 128), (64, 8, 64)],
        reps=5,
        bf16_reps=2,
        dense_reps=2,
        layer_reps=12,
        scaling_experts=[8, 16, 32, 64],
        scaling_batches=[2, 4, 8, 16],
        gen_prompt=32,
        gen_new=48,
        gen_reps=5,
        peak_rss=True,
        overhead_reps=10,
    )


def _cuda_settings(quick: bool) -> dict:
    """The GPU benchmark: bf16 only, more warm-up; `quick` keeps the CPU's tiny shapes (a check of the GPU path)."""
    if quick:
        return settings(True) | dict(device="cuda", dtypes=["bf16"], bf16_batch=2, warmup=2)
    return dict(
        device="cuda",
        dtypes=["bf16"],
        warmup=3,
        hidden=1024,
        layers=4,  # all MoE; 32 experts: 1.1B parameters per model, three models (plus AdamW states) on the GPU
        vocab=32000,
        heads=16,
        seq=2048,
        bf16_batch=4,  # 8192 tokens per step
        # (experts, top-k, expert width): the paper's 8 experts top-1 and top-2 and 32 experts top-4
        shapes=[(8, 1, 2816), (8, 2, 2816), (32, 4, 2816)],
        bf16_reps=10,
        gen_prompt=128,
        gen_new=128,
        gen_reps=5,
    )


def _device(s: dict) -> torch.device:
    return torch.device(s["device"])


def _models(s: dict, experts: int, top_k: int, inter: int, dtype, variants, seed: int = 0):
    """Our model in the requested variants (same weights), plus transformers peers, built on the settings' device."""
    shape = dict(hidden=s["hidden"], inter=inter, layers=s["layers"], experts=experts, top_k=top_k, vocab=s["vocab"])
    shape["heads"] = s["heads"]
    device = _device(s)
    with contextlib.nullcontext() if device.type == "cpu" else device:  # built in place (CPU: unchanged)
        return _build_models(shape, dtype, variants, seed)


def _build_models(shape: dict, dtype, variants, seed: int):
    base = build_ours(our_config(**shape, routing="default"), seed=seed)
    models = {}
    for name in variants:
        if name in ("default", "topk"):
            model = build_ours(our_config(**shape, routing=name), seed=seed)
            model.load_state_dict(base.state_dict())
        elif name == "dense_st":
            model = make_dense_st(build_ours(our_config(**shape, routing="topk"), seed=seed))
            model.load_state_dict(base.state_dict())
        elif name.startswith("mixtral_"):
            model = build_peer("mixtral", base, name.split("_", 1)[1])
        else:
            raise ValueError(name)
        models[name] = model.to(dtype)
    return models


def _olmoe_models(s: dict, experts: int, top_k: int, inter: int, dtype, impl: str, seed: int = 0):
    shape = dict(hidden=s["hidden"], inter=inter, layers=s["layers"], experts=experts, top_k=top_k, vocab=s["vocab"])
    shape.update(heads=s["heads"], qk_norm=True, norm_topk_prob=False)
    ours = build_ours(our_config(**shape, routing="topk"), seed=seed)
    default = build_ours(our_config(**shape, routing="default"), seed=seed)
    default.load_state_dict(ours.state_dict())
    olmoe = build_peer("olmoe", ours, impl)
    return {"topk": ours.to(dtype), "default": default.to(dtype), f"olmoe_{impl}": olmoe.to(dtype)}


def _batch(s: dict, batch: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, s["vocab"], (batch or s["batch"], s["seq"]), generator=gen).to(_device(s))


def _summarise(times: dict[str, list[float]], reference: str) -> dict:
    ref = median(times[reference])
    return {
        name: {"median_s": median(t), "ratio_vs_" + reference: median(t) / ref, "times_s": [round(x, 4) for x in t]}
        for name, t in times.items()
    }


def _log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------


def peer_implementation(s: dict, experts: int, top_k: int, inter: int) -> dict:
    """Pick transformers' fastest experts implementation for a training step at this shape (the first dtype).

    `batched_mm` gathers one (2I x H) weight matrix per (token, expert) pair: 4096 tokens x K x 2I x H x 4 bytes is
    8.6 GB at (8, top-2, I=512, H=256): it ran this machine out of memory, so it is excluded from CPU training
    steps. On CUDA every implementation is tried, and one that runs out of GPU memory is dropped (`out_of_memory`).
    """
    impls = PEER_IMPLEMENTATIONS[_device(s).type]
    _, dtype, rows, _ = _dtype_plan(s)[0]
    models = _models(s, experts, top_k, inter, dtype, [f"mixtral_{i}" for i in impls])
    batch = _batch(s, rows)
    fns = {n: train_step_fn(m, batch) for n, m in models.items()}
    dropped = drop_out_of_memory(fns, models, _device(s))
    if not fns:
        raise RuntimeError(f"every experts implementation ran out of memory at E={experts}, K={top_k}: {dropped}")
    times = interleaved_times(fns, reps=2, warmup=s["warmup"], device=_device(s))
    best = min((n.removeprefix("mixtral_") for n in fns), key=lambda i: median(times[f"mixtral_{i}"]))
    choice = {"best": best, "times": _summarise(times, f"mixtral_{best}")}
    if dropped:
        choice["out_of_memory"] = dropped
    return choice


def _dtype_plan(s: dict) -> list[tuple[str, torch.dtype, int, int]]:
    """(name, dtype, batch rows, repetitions) per dtype of the settings."""
    keys = {"fp32": ("batch", "reps"), "bf16": ("bf16_batch", "bf16_reps")}
    return [(name, DTYPES[name], s[keys[name][0]], s[keys[name][1]]) for name in s["dtypes"]]


def training_steps(s: dict, log=_log) -> dict:
    out = {}
    device = _device(s)
    for experts, top_k, inter in s["shapes"]:
        key = f"E{experts}_K{top_k}_I{inter}"
        choice = peer_implementation(s, experts, top_k, inter)
        impl = choice["best"]
        mixtral = f"mixtral_{impl}"
        log(f"{key}: transformers' fastest experts implementation: {impl}")
        out[key] = {"peer_implementation": choice}
        for dtype_name, dtype, rows, reps in _dtype_plan(s):
            batch = _batch(s, rows)
            names = ["default", "topk", mixtral]
            models = _models(s, experts, top_k, inter, dtype, names)
            peak = {} if device.type == "cuda" else None
            fns = {n: train_step_fn(m, batch) for n, m in models.items()}
            times = interleaved_times(fns, reps=reps, warmup=s["warmup"], device=device, peak_memory=peak)
            res = {"tokens_per_step": batch.numel(), **_summarise(times, "topk")}
            for name, values in (peak or {}).items():
                res[name]["peak_memory_bytes"] = max(values)
            res["default_overhead"] = res["default"]["ratio_vs_topk"] - 1
            res["topk_vs_mixtral"] = median(times["topk"]) / median(times[mixtral])
            del models, fns
            msg = f"{key} {dtype_name}: default/topk {res['default']['ratio_vs_topk']:.3f}"
            msg += f", topk/mixtral {res['topk_vs_mixtral']:.3f}"
            if dtype_name == "fp32":
                # The dense straight-through variant costs E/K times the experts' FLOPs: fewer repetitions, fp32 only.
                dense = _models(s, experts, top_k, inter, dtype, ["default", "dense_st"])
                dtimes = interleaved_times({n: train_step_fn(m, batch) for n, m in dense.items()}, s["dense_reps"])
                res["dense_st"] = _summarise(dtimes, "default")
                res["dense_st_over_default"] = median(dtimes["dense_st"]) / median(dtimes["default"])
                msg += f", dense_st/default {res['dense_st_over_default']:.2f}"
                del dense
                olmoe = _olmoe_models(s, experts, top_k, inter, dtype, impl)
                otimes = interleaved_times({n: train_step_fn(m, batch) for n, m in olmoe.items()}, reps=reps)
                res["olmoe_form"] = _summarise(otimes, "topk")
                res["olmoe_form"]["topk_vs_olmoe"] = median(otimes["topk"]) / median(otimes[f"olmoe_{impl}"])
                res["olmoe_form"]["default_overhead"] = median(otimes["default"]) / median(otimes["topk"]) - 1
                msg += f", topk/olmoe {res['olmoe_form']['topk_vs_olmoe']:.3f}"
                del olmoe
            out[key][dtype_name] = res
            log(msg)
    return out


def moe_layer(s: dict, log=_log) -> dict:
    """One MoE block alone (forward + backward, no optimizer): the Default MoE overhead without the rest of the model.

    Less noisy than whole steps, and it is where the overhead lives."""
    out = {}
    for dtype_name, dtype, rows, _ in _dtype_plan(s):
        layer_reps = s["layer_reps"] if dtype_name == "fp32" else max(1, s["layer_reps"] // 3)
        for experts, top_k, inter in s["shapes"]:
            models = _models(s, experts, top_k, inter, dtype, ["default", "topk"])
            gen = torch.Generator().manual_seed(5)
            x = torch.randn(rows, s["seq"], s["hidden"], generator=gen).to(dtype)
            fns = {}
            for name, model in models.items():
                block = model.model.layers[0].mlp.train()
                # Warm the defaults so the Default path multiplies real (non-zero) vectors.
                block.default_outputs.ema.normal_(0, 0.02, generator=gen)

                def fn(block=block, x=x):
                    xr = x.detach().requires_grad_(True)
                    y, losses = block(xr, return_router_losses=True)
                    (y.float().square().mean() + losses.sum()).backward()
                    for p in block.parameters():
                        p.grad = None

                fns[name] = fn
            times = interleaved_times(fns, reps=layer_reps)
            res = {"tokens": x.shape[0] * x.shape[1], **_summarise(times, "topk")}
            res["default_overhead"] = res["default"]["ratio_vs_topk"] - 1
            msg = f"layer E{experts} K{top_k} {dtype_name}: default/topk {res['default']['ratio_vs_topk']:.3f}"
            out[f"E{experts}_K{top_k}_I{inter}_{dtype_name}"] = res
            log(msg)
    return out


def overhead(s: dict, log=_log) -> dict:
    """Default MoE vs topk training steps only (fp32, every shape), with more repetitions, in wall and CPU time.

    With one torch thread, process CPU time excludes the time spent waiting for a core, so on a shared machine its
    ratios are steadier than wall-clock ratios."""
    out = {}
    for experts, top_k, inter in s["shapes"]:
        batch = _batch(s)
        models = _models(s, experts, top_k, inter, torch.float32, ["default", "topk"])
        cpu: dict = {}
        times = interleaved_times({n: train_step_fn(m, batch) for n, m in models.items()}, s["overhead_reps"], 1, cpu)
        res = {"wall": _summarise(times, "topk"), "cpu": _summarise(cpu, "topk")}
        key = f"E{experts}_K{top_k}_I{inter}"
        out[key] = res
        msg = ", ".join(f"{c} default/topk {res[c]['default']['ratio_vs_topk']:.3f}" for c in ("wall", "cpu"))
        log(f"overhead {key}: {msg}")
    return out


def scaling(s: dict, log=_log) -> dict:
    """Step time vs number of experts (top-2, fixed expert width) and vs tokens per step (8 experts, top-2), fp32."""
    out = {"experts": {}, "tokens": {}}
    inter = s["shapes"][0][2]
    batch = _batch(s)
    for experts in s["scaling_experts"]:
        models = _models(s, experts, 2, inter, torch.float32, ["default", "topk"])
        times = interleaved_times({n: train_step_fn(m, batch) for n, m in models.items()}, reps=max(1, s["reps"] // 2))
        out["experts"][str(experts)] = _summarise(times, "topk")
        log(f"scaling E={experts}: topk {median(times['topk']):.2f}s default {median(times['default']):.2f}s")
    models = _models(s, 8, 2, inter, torch.float32, ["default", "topk"])
    for rows in s["scaling_batches"]:
        batch = _batch(s, rows)
        times = interleaved_times({n: train_step_fn(m, batch) for n, m in models.items()}, reps=max(1, s["reps"] // 2))
        out["tokens"][str(rows * s["seq"])] = _summarise(times, "topk")
        med = {n: median(t) for n, t in times.items()}
        log(f"scaling tokens={rows * s['seq']}: topk {med['topk']:.2f}s default {med['default']:.2f}s")
    return out


def generation(s: dict, log=_log) -> dict:
    """Greedy generation with KV cache, batch 1 (fp32 on the CPU, bf16 on CUDA): new tokens per second, ours vs
    transformers' Mixtral in each of its experts implementations."""
    experts, top_k, inter = s["shapes"][0]
    names = ["default", "topk", "mixtral_grouped_mm", "mixtral_batched_mm", "mixtral_eager"]
    dtype_name, dtype, _, _ = _dtype_plan(s)[0]
    models = _models(s, experts, top_k, inter, dtype, names)
    prompt = _batch(s, 1)[:, : s["gen_prompt"]]
    new = s["gen_new"]
    fns = {}
    for name, model in models.items():
        model.eval()
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None

        def fn(model=model):
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)

        fns[name] = fn
    dropped = drop_out_of_memory(fns, models, _device(s))
    times = interleaved_times(fns, reps=s["gen_reps"], warmup=s["warmup"], device=_device(s))
    res = _summarise(times, "topk")
    for name in fns:
        res[name]["tokens_per_s"] = new / median(times[name])
    best = min((n for n in fns if n.startswith("mixtral")), key=lambda n: median(times[n]))
    res["fastest_mixtral"] = best
    res["default_vs_fastest_mixtral_tokens_per_s"] = res["default"]["tokens_per_s"] / res[best]["tokens_per_s"]
    res["topk_vs_fastest_mixtral_tokens_per_s"] = res["topk"]["tokens_per_s"] / res[best]["tokens_per_s"]
    if dropped:
        res["out_of_memory"] = dropped
    log(
        f"generation ({dtype_name}): default {res['default']['tokens_per_s']:.1f} tok/s, {best} "
        f"{res[best]['tokens_per_s']:.1f} tok/s"
    )
    return res


# ----------------------------------------------------------------------------------------------------------------
# Memory


def saved_activation_bytes(model, batch: torch.Tensor) -> int:
    """Bytes of the distinct tensor storages autograd saves for backward during one training forward.

    This is the part of peak memory that a Default MoE layer could change (weights, gradients and optimizer state
    are identical); counted exactly with `torch.autograd.graph.saved_tensors_hooks`, de-duplicated by storage."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    del loss
    return sum(seen.values())


def activations(s: dict, log=_log) -> dict:
    out = {}
    for experts, top_k, inter in s["shapes"]:
        for dtype_name, dtype, rows, _ in _dtype_plan(s):
            models = _models(s, experts, top_k, inter, dtype, ["default", "topk", "dense_st"])
            res = {name: saved_activation_bytes(m, _batch(s, rows)) for name, m in models.items()}
            res["default_over_topk"] = res["default"] / res["topk"]
            res["dense_st_over_topk"] = res["dense_st"] / res["topk"]
            out[f"E{experts}_K{top_k}_I{inter}_{dtype_name}"] = res
            log(f"saved activations E{experts} {dtype_name}: default/topk {res['default_over_topk']:.4f}")
    return out


def _peak_rss_worker(args: dict) -> dict:
    """Runs in a fresh process: build one variant, reset the kernel's peak-RSS mark, run two training steps, and
    report RSS before the steps and the peak during them (VmHWM; ru_maxrss would include the parent's peak)."""
    torch.set_num_threads(1)
    s = args["settings"]
    experts, top_k, inter = args["shape"]
    variant = args["variant"]
    models = _models(s, experts, top_k, inter, DTYPES[args["dtype"]], [variant])
    model = models.pop(variant)
    batch = _batch(s)
    step = train_step_fn(model, batch)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss_before = _status_bytes("VmRSS")
    step()
    step()
    return {"rss_before_steps": rss_before, "peak_rss": _status_bytes("VmHWM")}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss(s: dict, log=_log) -> dict:
    """Peak resident memory of a training process (two fp32 steps), one fresh subprocess per variant.

    glibc's malloc is told to serve every allocation above 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed
    tensors go back to the OS at once and the kernel's peak-RSS mark (VmHWM, reset after the model is built) is the
    peak of live memory, not an artefact of heap fragmentation. Torch's CPU allocator does not cache."""
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    for experts, top_k, inter in s["shapes"]:
        res = {}
        for variant in ["default", "topk", "dense_st"]:
            args = {"settings": s, "shape": [experts, top_k, inter], "dtype": "fp32", "variant": variant}
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.speed", json.dumps(args)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
                cwd=root,
            )
            res[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        topk_growth = res["topk"]["peak_rss"] - res["topk"]["rss_before_steps"]
        for variant in ["default", "dense_st"]:
            res[f"{variant}_over_topk_peak"] = res[variant]["peak_rss"] / res["topk"]["peak_rss"]
            growth = res[variant]["peak_rss"] - res[variant]["rss_before_steps"]
            res[f"{variant}_over_topk_step_growth"] = growth / topk_growth
        out[f"E{experts}_K{top_k}_I{inter}_fp32"] = res
        log(f"peak RSS E{experts} fp32: default/topk {res['default_over_topk_peak']:.4f}")
    return out


def check_parts(parts: tuple[str, ...], device: str) -> None:
    unsupported = sorted(set(parts) - set(DEVICE_PARTS[device]))
    if unsupported:
        raise ValueError(f"speed parts {unsupported} do not run on {device}; it runs {', '.join(DEVICE_PARTS[device])}")


def run(quick: bool = False, parts: tuple[str, ...] = PARTS, device: str = "cpu") -> dict:
    check_parts(parts, device)
    s = settings(quick, device)
    res = {"settings": s}
    if "layer" in parts:
        res["moe_layer"] = moe_layer(s)
    if "steps" in parts:
        res["training_step"] = training_steps(s)
    if "overhead" in parts:
        res["overhead"] = overhead(s)
    if "memory" in parts:
        res["saved_activations"] = activations(s)
        if s["peak_rss"]:
            res["peak_rss"] = peak_rss(s)
    if "scaling" in parts:
        res["scaling"] = scaling(s)
    if "generation" in parts:
        res["generation"] = generation(s)
    return res


if __name__ == "__main__":
    print(json.dumps(_peak_rss_worker(json.loads(sys.argv[1]))))
