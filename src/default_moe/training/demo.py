"""`default-moe demo`: Default MoE against top-K in about five minutes on a laptop CPU, offline.

For each of two seeds, trains a tiny Default MoE model (the tiny preset's recommended setting) and the same model
with `routing="topk"` from the same initial weights on the same batches of the built-in corpus (the Python standard
library's source files, with a byte-level BPE tokenizer trained on them); prints validation loss (mean and spread),
the per-seed differences and throughput, says in one sentence what the comparison shows, writes the loss curves,
saves the first seed's Default MoE checkpoint, reloads it with `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)` and generates a sample.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .trainer import MEASURED_LR

# (preset, sequence length, batch size, default steps, learning rate, vocabulary, validation tokens)
FULL = dict(
    preset="tiny", seq_len=128, batch_size=8, steps=250, lr=MEASURED_LR["tiny"], vocab_size=4096, eval_tokens=16384
)
QUICK = dict(preset="micro", seq_len=64, batch_size=4, steps=30, lr=2e-3, vocab_size=1024, eval_tokens=2048)
PROMPT = "def "
# What issue 19's study measured (BENCHMARKS.md, "Where does it pay off?"), said after the demo's own result.
BENCHMARK_ANSWER = (
    "the study that gives each arm its own learning rate (`python -m benchmarks --only study`; BENCHMARKS.md, "
    "\"Where does it pay off?\") found the paper's form behind top-K at each one's best rate, by 0.087 nats/byte "
    "on a 0.7M-parameter model (5 seeds) and by 0.028 on a 25M-parameter GPU run (3 seeds), and ahead only at rates "
    "too high for either, so the gains the paper reports at 2B parameters and 160B tokens do not show at these scales"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1].replace("\n", " ")
    parser.add_argument(
        "--output-dir", default="default-moe-demo", help="where results go (default ./default-moe-demo)"
    )
    parser.add_argument("--steps", type=int, help=f"optimizer steps per model (default {FULL['steps']})")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (seconds), for smoke tests")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one pair of runs per seed (default 0 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    demo(args)
    return 0


def demo(args: argparse.Namespace) -> dict:
    import torch

    from .compare import run_pair, summary_rows, text_table, write_reports
    from .trainer import check_output_dir, load_model, prepare_data

    start = time.perf_counter()
    settings = dict(QUICK if args.quick else FULL)
    steps = args.steps if args.steps is not None else settings["steps"]
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has repeats: {args.seeds}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    output = check_output_dir(args.output_dir, overwrite=True)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    print(f"[1/4] built-in corpus and tokenizer (vocabulary {settings['vocab_size']})", flush=True)
    train_tokens = steps * settings["batch_size"] * settings["seq_len"]
    run_data = prepare_data(
        settings["seq_len"],
        vocab_size=settings["vocab_size"],
        max_train_tokens=train_tokens,
        max_eval_tokens=settings["eval_tokens"],
    )
    seeds = args.seeds
    base = load_model(settings["preset"], vocab_size=len(run_data.tokenizer), seed=seeds[0])
    total = sum(p.numel() for p in base.parameters())
    print(
        f"      {run_data.train.num_tokens:,} training tokens, {run_data.eval.num_tokens:,} validation tokens; "
        f"model: preset {settings['preset']!r}, {total / 1e6:.2f}M parameters, {base.config.num_experts} experts, "
        f"top-{base.config.num_experts_per_tok}, {describe_setting(base.config)}",
        flush=True,
    )

    print(
        f"[2/4] training routing='default' and routing='topk' from the same init, {steps} steps each, "
        f"seeds {' '.join(map(str, seeds))}",
        flush=True,
    )
    training_args = demo_training_args(output, steps, settings, args)
    records = []
    for seed in seeds:
        if seed != seeds[0]:
            base = load_model(settings["preset"], vocab_size=len(run_data.tokenizer), seed=seed)
        records += run_pair(base, run_data, training_args, seed, save_routing="default" if seed == seeds[0] else None)
    reports = write_reports(records, output, f"Default MoE vs top-K, {steps} steps ({settings['preset']})")
    print()
    print(text_table(summary_rows(records)))
    differences = seed_differences(records)
    print("per-seed difference (default - topk): " + ", ".join(f"seed {s}: {d:+.4f}" for s, d in differences))
    print(verdict([d for _, d in differences]))
    print()

    final = next(r.final_dir for r in records if r.routing == "default")
    print(f"[3/4] reloading {final} with AutoModelForCausalLM.from_pretrained(trust_remote_code=True)", flush=True)
    sample = generate_sample(final, seeds[0])
    print(f"[4/4] sample (prompt {PROMPT!r}):\n{'-' * 60}\n{sample}\n{'-' * 60}")
    seconds = time.perf_counter() - start
    print(f"loss curves: {reports['plot']}; table: {reports['markdown']}; checkpoint: {final}")
    print(f"demo finished in {seconds:.0f} s")
    return {"records": records, "reports": reports, "final_dir": final, "sample": sample, "seconds": seconds}


def demo_training_args(output: Path, steps: int, settings: dict, args: argparse.Namespace):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["batch_size"] * 2,
        learning_rate=settings["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.1,
        logging_steps=max(1, steps // 50),
        eval_strategy="steps",
        eval_steps=max(1, steps // 5),
        save_strategy="no",
        seed=args.seeds[0],
        report_to="none",
        disable_tqdm=args.no_progress,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def describe_setting(config) -> str:
    term = "defaults in the router gradient only" if config.default_term == "gradient" else "defaults in the forward"
    return f"{term}, EMA of expert outputs on {config.default_ema_source} tokens"


def seed_differences(records) -> list[tuple[int, float]]:
    """(seed, Default MoE minus top-K final validation loss) per seed."""
    loss = {(r.routing, r.seed): r.eval_loss for r in records}
    return [(seed, loss["default", seed] - loss["topk", seed]) for seed in dict.fromkeys(r.seed for r in records)]


def verdict(differences: list[float]) -> str:
    """One plain sentence on what the paired differences show, and where the longer benchmark's answer is."""
    n, mean = len(differences), sum(differences) / len(differences)
    if all(d < 0 for d in differences):
        shown = f"Default MoE reached a lower validation loss than top-K on all {n} seeds (mean {mean:+.4f})"
    elif all(d > 0 for d in differences):
        shown = f"top-K reached a lower validation loss than Default MoE on all {n} seeds (mean {mean:+.4f})"
    else:
        shown = (
            f"the difference changes sign between seeds (mean {mean:+.4f}), so this short run cannot tell them apart"
        )
    return f"In this {n}-seed demo {shown}; {BENCHMARK_ANSWER}"


def generate_sample(folder: Path, seed: int, max_new_tokens: int = 80) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    inputs = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=0.8,
            top_k=40,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0], skip_special_tokens=True)
