"""`default-moe train`: pretrain or fine-tune a Default MoE model with `transformers.Trainer`.

Model: `--preset NAME` (default tiny), `--config FILE` (a config.json) or `--model DIR` (a checkpoint to continue
from); `--set KEY=VALUE` changes config fields. Data: `--data FILE...` (.txt: one document per file; .jsonl: one JSON
object per line with a "text" field), `--dataset NAME` (a `datasets` name; needs the package and the network) or,
by default, the built-in corpus (the Python standard library's source files). Any `TrainingArguments` field is
reachable with `--training-arg KEY=VALUE`. Checkpoints go to OUTPUT_DIR/checkpoint-N, the final model to
OUTPUT_DIR/final (written atomically). SIGTERM saves a checkpoint at the next step and exits with status 143;
`--resume` continues from the newest complete checkpoint. Multi-process: `accelerate launch [--cpu] --num_processes N
-m default_moe.cli train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from .data import DataError, check_seq_len, load_tokenizer
from .trainer import MEASURED_LR, PRESETS, UNMEASURED_LR, check_output_dir, default_lr, parse_overrides


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"model shape for a fresh model: {', '.join(PRESETS)} (default tiny)")
    source.add_argument("--config", metavar="FILE", help="a config.json for a fresh model")
    source.add_argument("--model", metavar="DIR", help="a Default MoE checkpoint folder to continue training")
    group.add_argument("--base-model", metavar="REPO_ID", help="the Hub id of --model, for the model card's metadata")
    group.add_argument("--routing", choices=("default", "topk"), help="override the config's routing")
    group.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a config field")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (default: the built-in standard-library corpus)")
    group.add_argument("--data", nargs="+", metavar="FILE", help="training text (.txt) or .jsonl files")
    group.add_argument("--eval-data", nargs="+", metavar="FILE", help="validation text or .jsonl files")
    group.add_argument("--dataset", metavar="NAME", help="a Hugging Face `datasets` name (online, optional package)")
    group.add_argument("--dataset-config", metavar="NAME", help="the data set's configuration name")
    group.add_argument("--dataset-split", default="train", help="training split of --dataset (default train)")
    group.add_argument("--eval-split", help="validation split of --dataset")
    group.add_argument("--text-field", default="text", help="text field in .jsonl files and data sets")
    group.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder (default: the checkpoint's, else a new BPE)"
    )
    group.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of a newly trained BPE tokenizer")
    group.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default 256)")
    group.add_argument("--max-train-tokens", type=int, help="use at most this many training tokens")
    group.add_argument("--max-eval-tokens", type=int, default=65536, help="validation tokens (default 65536)")


def add_trainer_arguments(parser: argparse.ArgumentParser, output_required: bool = True) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--output-dir", required=output_required, help="checkpoints, logs, plots and final/")
    group.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs)")
    group.add_argument("--epochs", type=float, default=1.0, help="epochs when --max-steps is not given")
    group.add_argument(
        "--lr",
        type=float,
        help=f"peak learning rate (default: {MEASURED_LR['tiny']:g} for a fresh tiny-preset model, measured in "
        f"BENCHMARKS.md; else {UNMEASURED_LR:g})",
    )
    group.add_argument("--lr-scheduler", default="cosine", help="transformers scheduler type (default cosine)")
    group.add_argument("--warmup-steps", type=float, default=0.05, help="warmup steps, or a ratio if < 1")
    group.add_argument("--weight-decay", type=float, default=0.1)
    group.add_argument("--max-grad-norm", type=float, default=1.0)
    group.add_argument("--batch-size", type=int, default=8, help="sequences per device per micro-batch")
    group.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    group.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    group.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    group.add_argument(
        "--gradient-checkpointing", "--activation-checkpointing", action="store_true", help="activation checkpointing"
    )
    group.add_argument("--logging-steps", type=int, default=10)
    group.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: at the end only)")
    group.add_argument("--save-steps", type=int, default=500, help="write a Trainer checkpoint every N steps")
    group.add_argument("--save-total-limit", type=int, help="keep at most N Trainer checkpoints")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument(
        "--training-arg", action="append", default=[], metavar="KEY=VALUE", help="any other TrainingArguments field"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1].replace("\n", " ")
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_trainer_arguments(parser)
    group = parser.add_argument_group("run")
    group.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="resume from a checkpoint (default: the newest complete one in OUTPUT_DIR)",
    )
    group.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_DIR/final")
    group.add_argument("--no-monitor", action="store_true", help="do not attach DefaultMoeCallback")
    group.add_argument("--dump-ema", metavar="DIR", help="debug: each rank writes its EMA defaults to DIR at the end")


def training_arguments(args: argparse.Namespace, evaluate: bool, output_dir: str | None = None, **fixed):
    """`TrainingArguments` from the common flags plus `--training-arg KEY=VALUE` overrides."""
    import torch
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    extra = parse_overrides(args.training_arg)
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"unknown TrainingArguments field(s): {', '.join(unknown)}")
    for name in ("batch_size", "grad_accum", "logging_steps", "save_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps == 0 or args.epochs <= 0:
        raise ValueError("nothing to train: --max-steps and --epochs must be positive")
    if args.lr is None:
        args.lr = default_lr(args.preset, args.config, args.model)
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    eval_strategy = "no"
    if evaluate:
        eval_strategy = "steps" if args.eval_steps else "no"
    # transformers 5.23 renamed gradient_checkpointing (the old name warns from 5.25; 5.20-5.22 know only it).
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    values = dict(
        output_dir=output_dir or args.output_dir,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps if args.warmup_steps < 1 else int(args.warmup_steps),
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        bf16=args.bf16,
        **{checkpointing: args.gradient_checkpointing},
        logging_steps=args.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        disable_tqdm=args.no_progress,
        report_to="none",
        # The model all-reduces its EMA statistics itself; broadcasting rank 0's buffers would only hide a bug.
        ddp_broadcast_buffers=False,
        ddp_find_unused_parameters=False,  # every parameter takes part in every forward
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if args.bf16 and not torch.cuda.is_available():
        values["use_cpu"] = True  # Trainer accepts bf16 without a GPU only as explicit CPU training (autocast)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            # accelerate 1.15 selects FSDP only for GPU-type devices; on CPU it would silently run DDP instead.
            raise RuntimeError(
                "FSDP through accelerate needs GPUs: on CPU accelerate 1.15 ignores the FSDP settings and would run "
                "plain DDP; launch with --multi_gpu (no --use_fsdp) for CPU data parallelism"
            )
        values["use_cpu"] = True  # several processes on a machine without GPUs: CPU data parallel over gloo
    values.update(fixed)
    values.update(extra)
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"invalid training arguments: {str(error).strip().splitlines()[0]}") from None


def model_overrides(args: argparse.Namespace) -> dict:
    overrides = parse_overrides(args.set)
    if args.routing:
        overrides["routing"] = args.routing
    return overrides


def resolve_resume(args: argparse.Namespace, output_dir: Path):
    """The checkpoint to resume from: `--resume PATH` if it is complete, `--resume` alone the newest complete
    checkpoint-N in OUTPUT_DIR. The newer, incomplete ones (a run killed while saving) are removed on the main process,
    since the resumed run writes those steps again, and named in one line."""
    if not args.resume:
        return None
    from .checkpoints import checkpoint_problems, describe_incomplete, last_complete_checkpoint, scan_checkpoints

    if args.resume == "latest":
        chosen, incomplete = scan_checkpoints(output_dir)
        if chosen is None and incomplete:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint-N folder in {output_dir} (incomplete: "
                f"{describe_incomplete(incomplete)})"
            )
        if chosen is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N folder in {output_dir}")
        return last_complete_checkpoint(output_dir, remove_incomplete=int(os.environ.get("RANK", "0")) == 0)
    if not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume: checkpoint folder not found: {args.resume}")
    problems = checkpoint_problems(args.resume)
    if problems:
        raise ValueError(f"--resume: {args.resume} is not a complete Trainer checkpoint ({problems})")
    return args.resume


def model_config_preview(args: argparse.Namespace, vocab_size: int | None):
    """The config the run will use, built without weights, for the checks that come before training."""
    from .trainer import build_config, checkpoint_config

    if args.model:
        return checkpoint_config(args.model, model_overrides(args))
    return build_config(args.preset, args.config, vocab_size, model_overrides(args))


def prepare(args: argparse.Namespace, output_dir: str | None = None):
    """All checks and data preparation, before any training: returns (output_dir, run_data, resume)."""
    from .trainer import prepare_data

    output = check_output_dir(output_dir or args.output_dir, overwrite=args.overwrite, resume=bool(args.resume))
    resume = resolve_resume(args, output)
    if args.preset and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif args.model and (Path(args.model) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(args.model)
    # Check the config (and the sequence length against it) before reading any data.
    config = model_config_preview(args, None if tokenizer is None else len(tokenizer))
    check_seq_len(args.seq_len, config.max_position_embeddings)
    run_data = prepare_data(
        args.seq_len,
        data_files=args.data,
        eval_files=args.eval_data,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        dataset_split=args.dataset_split,
        eval_split=args.eval_split,
        text_field=args.text_field,
        tokenizer=tokenizer,
        vocab_size=args.vocab_size,
        max_train_tokens=args.max_train_tokens,
        max_eval_tokens=args.max_eval_tokens,
    )
    if args.model and len(run_data.tokenizer) > config.vocab_size:
        raise DataError(
            f"the tokenizer has {len(run_data.tokenizer)} tokens, the checkpoint's vocabulary only {config.vocab_size}"
        )
    return output, run_data, resume


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


def train(args: argparse.Namespace, callbacks: list | None = None):
    """The `train` command as a function: returns the `RunResult` (final folder, summary, log history)."""
    from .trainer import dump_ema, load_model, run_training

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    has_eval = bool(args.eval_data or args.eval_split or not (args.data or args.dataset))
    training_args = training_arguments(args, evaluate=has_eval)  # checks the flags before reading any data
    output, run_data, resume = prepare(args)
    model = load_model(
        args.preset if not (args.config or args.model) else None,
        args.config,
        args.model,
        len(run_data.tokenizer),
        model_overrides(args),
        seed=args.seed,
    )
    extra = {}
    if args.model:
        extra["initialized_from"] = str(args.model)
        if args.base_model:  # a Hub id: the card lists it as base_model with relation "finetune"
            extra.update(base_model=args.base_model, base_model_relation="finetune")
    result = run_training(
        model,
        run_data,
        training_args,
        callbacks=callbacks,
        monitor=not args.no_monitor,
        resume_from_checkpoint=resume,
        summary_extra=extra,
    )
    if args.dump_ema:
        dump_ema(model, args.dump_ema, int(os.environ.get("RANK", "0")))
    if result.final_dir is not None:
        print(describe(result))
    return result


def describe(result) -> str:
    """One line about a finished run."""
    summary = result.summary
    losses = summary["final_losses"]
    name = next((n for n in ("eval_loss", "lm_loss", "loss") if n in losses), None)
    label = {"eval_loss": "validation loss", "lm_loss": "LM loss", "loss": "training loss"}.get(name)
    loss = f"{label} {losses[name]:.4f}" if name else "no loss logged"
    return (
        f"trained {summary['steps']} steps on {summary['tokens']:,} tokens "
        f"({summary['tokens_per_second'] or 0:,.0f} tokens/s); {loss}; model saved to {result.final_dir}"
    )
