"""Trainer runs: presets, model sources, data preparation, input checks and the atomic final checkpoint.

The pieces are shared by `default-moe train`, `compare` and `demo`. Every check that can fail on user input runs in
`prepare_run` before a model is trained, so a bad input ends with a one-line error and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from default_moe.conversion.io import atomic_output_file, remove_stale_temporaries, replace_folder

from .data import (
    DataError,
    PackedDataset,
    builtin_corpus,
    builtin_tokenizer,
    check_seq_len,
    load_hub_dataset,
    load_tokenizer,
    pack,
    read_text_files,
    train_tokenizer,
)

# Model shapes. vocab_size is set from the tokenizer. The first layer is dense, as in the paper.
PRESETS: dict[str, dict] = {
    # For tests and smoke runs: seconds on a laptop CPU.
    "micro": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
        num_experts_per_tok=1, num_dense_layers=0, max_position_embeddings=256,
    ),
    # The demo model: ~3.8M parameters with a 4096-token vocabulary.
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_experts=8,
        num_experts_per_tok=2, num_dense_layers=1, max_position_embeddings=512,
    ),
    "small": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8, num_experts=8,
        num_experts_per_tok=2, num_dense_layers=1, max_position_embeddings=1024,
    ),
    "base": dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_experts=16,
        num_experts_per_tok=2, num_dense_layers=1, max_position_embeddings=2048,
    ),
    # The paper's smallest shape: 8 experts, top-1, first layer dense.
    "paper-8e": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16, num_experts=8,
        num_experts_per_tok=1, num_dense_layers=1, max_position_embeddings=2048, default_ema_beta=0.9,
    ),
}  # fmt: skip


# Peak learning rate by what is trained. A fresh tiny-preset model: 2e-3, the best rate of both routings in the
# demo's own run over 1e-3 / 2e-3 / 4e-3 (benchmarks/defaults.py; at 4e-3 top-K degrades, Default much less).
# Anything else (larger presets, config files, checkpoints to fine-tune) is not measured here and keeps 6e-4.
MEASURED_LR = {"tiny": 2e-3}
UNMEASURED_LR = 6e-4


def default_lr(preset: str | None, config_file: str | None, checkpoint: str | None) -> float:
    """The peak learning rate `train` and `compare` use when `--lr` is not given."""
    if config_file or checkpoint:
        return UNMEASURED_LR
    return MEASURED_LR.get(preset or "tiny", UNMEASURED_LR)


def preset_config(name: str, **overrides):
    from default_moe import DefaultMoeConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return DefaultMoeConfig(**{**PRESETS[name], **overrides})


def parse_overrides(items: list[str] | None) -> dict:
    """`["routing=topk", "num_experts=4"]` -> `{"routing": "topk", "num_experts": 4}` (values parsed as JSON if
    they are valid JSON, else kept as strings)."""
    overrides = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[key.strip()] = value
    return overrides


# ----------------------------------------------------------------------------------------------------------------
# What to train on

BUILTIN_DESCRIPTION = (
    f"built-in corpus (Python {sys.version_info.major}.{sys.version_info.minor} standard library sources)"
)


@dataclass
class RunData:
    tokenizer: object
    train: PackedDataset
    eval: PackedDataset | None
    description: str  # what the data is, for the summary and the model card
    hub_dataset: str | None = None  # the `datasets` name when the data came from the Hub


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def prepare_data(
    seq_len: int,
    data_files: list[str] | None = None,
    eval_files: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    dataset_split: str = "train",
    eval_split: str | None = None,
    text_field: str = "text",
    tokenizer=None,
    vocab_size: int = 4096,
    max_train_tokens: int | None = None,
    max_eval_tokens: int | None = 65536,
) -> RunData:
    """Read, tokenise and pack the training (and evaluation) data. Built-in corpus when no files/dataset given."""
    if data_files and dataset:
        raise DataError("give either data files or a data set name, not both")
    if data_files:
        train_texts = read_text_files(data_files, text_field)
        eval_texts = read_text_files(eval_files, text_field) if eval_files else None
        name = ", ".join(Path(f).name for f in data_files)
    elif dataset:
        train_texts = load_hub_dataset(dataset, dataset_split, dataset_config, text_field)
        eval_texts = load_hub_dataset(dataset, eval_split, dataset_config, text_field) if eval_split else None
        if eval_files:
            eval_texts = read_text_files(eval_files, text_field)
        name = dataset
    else:
        # The built-in corpus: read only about as much text as the token budget needs (~3.5 characters a token;
        # 6 leaves a margin).
        max_chars = None if max_train_tokens is None else max(int(max_train_tokens * 6), 1_000_000)
        train_texts = builtin_corpus("train", max_chars=max_chars)
        eval_texts = read_text_files(eval_files, text_field) if eval_files else builtin_corpus("validation")
        name = BUILTIN_DESCRIPTION
    if not train_texts:
        raise DataError(f"the training data {name} holds no text")
    if tokenizer is None:
        builtin = not (data_files or dataset)
        tokenizer = builtin_tokenizer(vocab_size) if builtin else train_tokenizer(train_texts, vocab_size)
    train = PackedDataset(pack(train_texts, tokenizer, seq_len, max_train_tokens, what="the training data"))
    evaluation = None
    if eval_texts is not None:
        evaluation = PackedDataset(pack(eval_texts, tokenizer, seq_len, max_eval_tokens, what="the evaluation data"))
    return RunData(tokenizer, train, evaluation, description=name, hub_dataset=dataset)


# ----------------------------------------------------------------------------------------------------------------
# What to train


def build_config(
    preset: str | None = None,
    config_file: str | None = None,
    vocab_size: int | None = None,
    overrides: dict | None = None,
):
    """The config of a fresh model: a preset (default tiny) or a config.json file, plus overrides."""
    from default_moe import DefaultMoeConfig

    overrides = dict(overrides or {})
    if vocab_size:
        overrides["vocab_size"] = vocab_size
    if preset is not None and config_file is not None:
        raise ValueError("give either a preset or a config file, not both")
    if config_file is None:
        return preset_config(preset or "tiny", **overrides)
    path = Path(config_file)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {path} is not valid JSON ({error.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    if values.get("model_type", "default_moe") != "default_moe":
        raise ValueError(f"config file {path} is for model_type {values['model_type']!r}, not 'default_moe'")
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        values.pop(key, None)
    return DefaultMoeConfig(**{**values, **overrides})


def checkpoint_config(checkpoint: str | os.PathLike, overrides: dict | None = None):
    from default_moe import DefaultMoeConfig

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise ValueError(f"not a checkpoint folder (no config.json): {path}")
    try:
        return DefaultMoeConfig.from_pretrained(path, **(overrides or {}))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"cannot read the config of {path}: {_first_line(error)}") from None


def load_model(
    preset: str | None = None,
    config_file: str | None = None,
    checkpoint: str | None = None,
    vocab_size: int | None = None,
    overrides: dict | None = None,
    seed: int = 0,
):
    """A fresh model (seeded) from a preset or a config file, or a pretrained one from a checkpoint folder."""
    import default_moe  # noqa: F401 - registers the Auto classes
    from default_moe import DefaultMoeForCausalLM

    if checkpoint is not None:
        if preset is not None or config_file is not None:
            raise ValueError("give either a checkpoint or a preset/config file, not both")
        config = checkpoint_config(checkpoint, overrides)
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens, the checkpoint's vocabulary only {config.vocab_size}"
            )
        return DefaultMoeForCausalLM.from_pretrained(checkpoint, config=config, dtype=torch.float32)
    config = build_config(preset, config_file, vocab_size, overrides)
    torch.manual_seed(seed)
    return DefaultMoeForCausalLM(config)


def set_special_tokens(model, tokenizer) -> None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.config, name, value)
            if model.generation_config is not None:
                setattr(model.generation_config, name, value)


# ----------------------------------------------------------------------------------------------------------------
# Where it goes


FINAL = "final"


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> Path:
    """Make sure `path` can be created and written, without creating it (a failed run leaves nothing behind), and
    refuse to clobber a finished run."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OSError(f"output folder {path} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(f"output folder {path} cannot be created: {existing} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".default-moe-write-test-"):
            pass
    except OSError as error:
        raise OSError(f"output folder {path} is not writable ({error.strerror or error})") from None
    if (path / FINAL).exists() and not (overwrite or resume):
        raise FileExistsError(f"{path / FINAL} already holds a trained model: pass --overwrite or another --output-dir")
    return path


def save_final(
    output_dir: str | os.PathLike,
    summary: dict,
    write_files,
    write_card: bool = True,
    is_main: bool = True,
    barrier=None,
) -> Path | None:
    """Write `output_dir/final` atomically: everything goes to a temporary sibling folder first, then one rename
    (`replace_folder`). A kill leaves the previous `final` or none; the next save removes what the killed one left.

    `write_files(folder)` writes the weights (with the EMA defaults), config with `auto_map`, both model code files
    and the tokenizer; then come `training_summary.json` and, when `default_moe.cards` is available, the README model
    card. In multi-process runs every rank calls this (`write_files` may be collective, e.g. `Trainer.save_model`
    under FSDP), with `barrier` synchronising them; only the main process touches the file system itself.
    Returns the final folder on the main process, None elsewhere.
    """
    output_dir = Path(output_dir)
    final = output_dir / FINAL
    staging = output_dir / f".{FINAL}.tmp-staging"  # one fixed name, so that all ranks agree on it
    barrier = barrier or (lambda: None)
    try:
        if is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(final)  # what a killed save left (this staging folder too)
            staging.mkdir()
        barrier()
        write_files(staging)
        barrier()
        if not is_main:
            return None
        (staging / "training_args.bin").unlink(missing_ok=True)  # Trainer.save_model's; not part of a model folder
        umask = os.umask(0)
        os.umask(umask)
        for path in staging.iterdir():  # transformers writes the weights 0600 (temporary file + rename)
            path.chmod(0o666 & ~umask)
        (staging / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if write_card:
            write_model_card_if_available(staging, title=output_dir.resolve().name)
        replace_folder(staging, final)
    except BaseException:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def write_model_card_if_available(folder: Path, title: str | None = None) -> bool:
    """README.md through `default_moe.cards` (which reads config.json and training_summary.json in `folder`)."""
    try:
        from default_moe.cards import write_model_card
    except ImportError:
        return False
    summary = json.loads((folder / "training_summary.json").read_text())
    write_model_card(
        folder,
        base_model=summary.get("base_model"),
        base_model_relation=summary.get("base_model_relation"),
        datasets=summary.get("dataset"),
        title=title,
    )
    return True


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunResult:
    final_dir: Path | None
    summary: dict
    log_history: list[dict] = field(default_factory=list)
    callback: object | None = None


def training_summary(trainer, run_data: RunData, callback, train_seconds: float, **extra) -> dict:
    state = trainer.state
    args = trainer.args
    world = args.world_size
    tokens = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    tokens *= run_data.train.blocks.shape[1]
    last = next((w for w in reversed(callback.history) if "lm_loss" in w), {}) if callback else {}
    evals = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    if not last:  # not monitored: the Trainer's last logged training loss (LM + router losses)
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        last = {"loss": losses[-1]} if losses else {}
    summary = {
        "steps": state.global_step,
        "tokens": tokens,
        "sequence_length": run_data.train.blocks.shape[1],
        "final_losses": {
            name: value
            for name, value in (
                ("loss", last.get("loss")),
                ("lm_loss", last.get("lm_loss")),
                ("aux_loss", last.get("aux_loss")),
                ("z_loss", last.get("z_loss")),
                ("eval_loss", evals[-1] if evals else None),
            )
            if value is not None
        },
        "learning_rate": args.learning_rate,
        "train_runtime": round(train_seconds, 2),
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        "world_size": world,
    }
    # "dataset" is a Hub data set id (the card puts it in its metadata); other data is described under "data".
    if run_data.hub_dataset:
        summary["dataset"] = run_data.hub_dataset
    else:
        summary["data"] = run_data.description
    summary.update(extra)
    return summary


def run_training(
    model,
    run_data: RunData,
    training_args,
    callbacks: list | None = None,
    monitor: bool = True,
    resume_from_checkpoint: str | None = None,
    save: bool = True,
    summary_extra: dict | None = None,
) -> RunResult:
    """Train with `transformers.Trainer` and (on the main process) save `output_dir/final` atomically.

    When checkpoints are on, SIGTERM saves one at the next step boundary and raises `Preempted` (no final save).
    """
    from transformers import Trainer, TrainerState, default_data_collator

    from .callback import DefaultMoeCallback
    from .checkpoints import Preempted, PreemptionCallback

    set_special_tokens(model, run_data.tokenizer)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=run_data.train,
        eval_dataset=run_data.eval,
        data_collator=default_data_collator,
        processing_class=run_data.tokenizer,
        callbacks=callbacks,
    )
    monitor_callback = None
    if monitor:
        monitor_callback = DefaultMoeCallback()
        if training_args.report_to and training_args.report_to != ["none"]:
            monitor_callback.install(trainer)  # before the reporters, so they see its values
        else:
            trainer.add_callback(monitor_callback)  # after the console printer: keep the console readable
    preemption = None
    if training_args.save_strategy != "no":  # then SIGTERM saves a checkpoint to resume from and stops
        preemption = PreemptionCallback()
        trainer.add_callback(preemption)
    state = None
    if resume_from_checkpoint is not None:
        state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / "trainer_state.json"))
    seconds = 0.0
    if state is not None and 0 < training_args.max_steps <= state.global_step:
        # Resumed at max_steps (a run killed after its last checkpoint), Trainer.train would still run one more step
        # (transformers 5.24): the training is done, so take the checkpoint's weights and state as they are.
        trainer._load_from_checkpoint(resume_from_checkpoint)
        trainer.state = state
    else:
        start = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        finally:
            if preemption is not None:
                preemption.restore()
        seconds = time.perf_counter() - start
    if preemption is not None and preemption.preempted():
        saved = f"checkpoint saved to {preemption.checkpoint}" if preemption.checkpoint else "no checkpoint saved"
        raise Preempted(f"stopped by SIGTERM after step {trainer.state.global_step}: {saved} (continue with --resume)")
    if run_data.eval is not None:
        last_eval_step = max((e["step"] for e in trainer.state.log_history if "eval_loss" in e), default=-1)
        if last_eval_step != trainer.state.global_step:
            trainer.evaluate()
    summary = training_summary(trainer, run_data, monitor_callback, seconds, **(summary_extra or {}))
    final_dir = None
    if save:
        # Trainer.save_model gathers the full state dict under FSDP/DeepSpeed and writes on the main process only.
        final_dir = save_final(
            training_args.output_dir,
            summary,
            lambda folder: trainer.save_model(str(folder)),
            is_main=trainer.is_world_process_zero(),
            barrier=trainer.accelerator.wait_for_everyone,
        )
    return RunResult(final_dir, summary, list(trainer.state.log_history), monitor_callback)


def dump_ema(model, folder: str | os.PathLike, rank: int) -> Path:
    """This rank's EMA default vectors as a safetensors file (to check that all ranks agree)."""
    from safetensors.torch import save_file

    from .callback import moe_blocks

    tensors = {
        f"layer{layer}": block.default_outputs.ema.detach().cpu().contiguous() for layer, block in moe_blocks(model)
    }
    path = Path(folder) / f"ema_rank{rank}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_file(path) as tmp:
        save_file(tensors, str(tmp))
    return path


__all__ = [
    "FINAL",
    "build_config",
    "checkpoint_config",
    "PRESETS",
    "RunData",
    "RunResult",
    "check_output_dir",
    "check_seq_len",
    "dump_ema",
    "load_model",
    "load_tokenizer",
    "parse_overrides",
    "prepare_data",
    "preset_config",
    "run_training",
    "save_final",
]
