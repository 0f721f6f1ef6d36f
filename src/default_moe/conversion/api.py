"""`convert` (Mixtral/OLMoE/FlexOlmo/Qwen3-MoE/Qwen2-MoE -> Default MoE, dense -> Default MoE by upcycling) and
`export` (back).

Both follow the same steps: resolve SRC (local folder, or a Hub repo id), read and check its config, plan every
output tensor with its shape (checking every source tensor against the config on the way, before anything is
written), then stream the tensors shard by shard into a temporary folder next to DST, add config, code files,
tokenizer and generation config (and a model card), and rename the folder to DST at the end.
"""

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import flex_olmo, mixtral, olmoe, qwen2_moe, qwen3_moe, upcycle
from .io import (
    CheckpointReader,
    ConversionError,
    atomic_output_folder,
    check_destination,
    parse_size,
    write_checkpoint,
)
from .layout import PlanBuilder

logger = logging.getLogger(__name__)

# Converted both ways.
MOE_MODELS = {
    "mixtral": mixtral,
    "olmoe": olmoe,
    "flex_olmo": flex_olmo,
    "qwen3_moe": qwen3_moe,
    "qwen2_moe": qwen2_moe,
}
SOURCE_TYPES = (*MOE_MODELS, *upcycle.MODEL_TYPES)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Files carried over from SRC besides the weights and config: tokenizer, chat template, generation config.
CARRIED_FILES = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|.*\.model|.*\.tiktoken"
    r"|chat_template\.(json|jinja)|generation_config\.json)"
)
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_source(src: str | Path) -> tuple[Path, str | None]:
    """(local folder, Hub repo id or None). A path that does not exist is tried as a Hub repo id."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"SRC {src} is not a folder")
        return path, None
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(src)):
        raise ConversionError(f"SRC {src} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(src), allow_patterns=HUB_FILES)), str(src)
    except Exception as error:  # offline, unknown repo, gated, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"SRC {src} is not a local folder and fetching it from the Hub failed: {reason}"
        ) from error


def read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConversionError(f"{path} has no model_type")
    return data


def load_transformers_config(folder: Path, model_type: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(f"cannot read {folder / 'config.json'} as a {model_type} config: {error}") from error
    return config


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConversionError(f"unsupported dtype {dtype}: expected one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}: expected one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def _common_dtype(plans) -> str:
    floating = [p.dtype for p in plans if p.dtype.is_floating_point and p.dtype != torch.float32]
    dtype = floating[0] if floating else torch.float32  # the EMA buffers are float32 whatever the weights are
    return str(dtype).removeprefix("torch.")


def _copy_carried_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and CARRIED_FILES.fullmatch(path.name):
            shutil.copyfile(path, dst / path.name)
            copied.append(path.name)
    return copied


def _write_default_moe_config(folder: Path, config) -> None:
    """config.json with `auto_map`, plus the two code files, exactly as `DefaultMoeForCausalLM.save_pretrained`."""
    from transformers.dynamic_module_utils import custom_object_save

    from default_moe import DefaultMoeForCausalLM

    with torch.device("meta"):
        model = DefaultMoeForCausalLM(config)
    custom_object_save(model, folder, config=config)  # copies modeling + configuration files, sets auto_map
    DefaultMoeForCausalLM.add_backbone_to_auto_map(config)
    config.architectures = ["DefaultMoeForCausalLM"]
    config.save_pretrained(folder)


def _progress(total: int, desc: str, show: bool | None):
    """A tqdm bar over tensors; `show=None` shows it only on a terminal."""
    return tqdm(total=total, desc=desc, unit="tensor", disable=None if show is None else not show)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    from_: str = "auto",
    num_experts: int | None = None,
    top_k: int | None = None,
    granularity: int | None = None,
    num_dense_layers: int | None = None,
    norm_topk_prob: bool | None = None,
    seed: int = 0,
    routing: str | None = None,
    ema_beta: float | None = None,
    ema_weighting: str | None = None,
    ema_update: str | None = None,
    router_aux_loss_coef: float | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    calibration_data: str | Path | None = None,
    calibration_tokens: int = 8192,
    calibration_seq_len: int = 256,
    base_model: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Convert a Mixtral/OLMoE/FlexOlmo/Qwen3-MoE/Qwen2-MoE checkpoint (or upcycle a Llama/Mistral/Qwen2/Qwen3/OLMo-2/
    OLMo-3 one) into Default MoE.

    Returns the output folder. See docs/conversion.md for every option; upcycling options (`num_experts`, `top_k`,
    `granularity`, `num_dense_layers`, `norm_topk_prob`, `seed`) are rejected for MoE sources, whose routing is
    fixed by the source model. Freshly converted defaults are zero (the model then computes exactly what the
    source does) unless `calibration_data` is given.
    """
    dst = Path(dst)
    out_dtype = _dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    if from_ not in ("auto", *SOURCE_TYPES):
        raise ConversionError(f"unknown --from {from_!r}: expected auto or one of {', '.join(SOURCE_TYPES)}")
    if calibration_data is not None:
        calibration_data = Path(calibration_data)
        if not calibration_data.is_file():
            raise ConversionError(f"calibration data {calibration_data} is not a file")
        if calibration_tokens < 1 or calibration_seq_len < 1:
            raise ConversionError("--calibration-tokens and --calibration-seq-len must be positive")
    if Path(src).exists():
        check_destination(Path(src), dst, overwrite)  # fail before a possibly long Hub download
    src_path, repo_id = resolve_source(src)
    check_destination(src_path, dst, overwrite)

    raw = read_config_json(src_path)
    model_type = raw["model_type"]
    if model_type not in SOURCE_TYPES:
        raise ConversionError(
            f"unsupported model_type {model_type!r} in {src_path / 'config.json'}: "
            f"expected one of {', '.join(SOURCE_TYPES)}"
        )
    if from_ != "auto" and from_ != model_type:
        raise ConversionError(f"--from {from_} given, but SRC config.json has model_type {model_type!r}")
    upcycle_options = {
        "num_experts": num_experts,
        "top_k": top_k,
        "granularity": granularity,
        "num_dense_layers": num_dense_layers,
        "norm_topk_prob": norm_topk_prob,
    }
    is_upcycle = model_type in upcycle.MODEL_TYPES
    if not is_upcycle:
        given = [name for name, value in upcycle_options.items() if value is not None]
        if given:
            raise ConversionError(
                f"--{given[0].replace('_', '-')} only applies to upcycling dense models, not to {model_type}"
            )

    src_config = load_transformers_config(src_path, model_type)
    if is_upcycle:
        fields = upcycle.default_moe_fields(
            src_config,
            model_type,
            num_experts=8 if num_experts is None else num_experts,
            top_k=2 if top_k is None else top_k,
            granularity=1 if granularity is None else granularity,
            num_dense_layers=0 if num_dense_layers is None else num_dense_layers,
            norm_topk_prob=True if norm_topk_prob is None else norm_topk_prob,
        )
    else:
        fields = MOE_MODELS[model_type].default_moe_fields(src_config)
    overrides = {
        "routing": routing,
        "default_ema_beta": ema_beta,
        "default_ema_weighting": ema_weighting,
        "default_ema_update": ema_update,
        "router_aux_loss_coef": router_aux_loss_coef,
    }
    fields |= {key: value for key, value in overrides.items() if value is not None}
    if calibration_data is not None and fields.get("routing", "default") != "default":
        raise ConversionError("--calibration-data warms the EMA defaults, which routing='topk' does not use")

    from default_moe import DefaultMoeConfig

    try:
        config = DefaultMoeConfig(**fields)
    except ValueError as error:
        raise ConversionError(str(error)) from error

    reader = CheckpointReader(src_path)
    builder = PlanBuilder(reader, out_dtype, f"{model_type} checkpoint")
    if is_upcycle:
        upcycle.plan(builder, config, model_type, granularity=granularity or 1, seed=seed)
    else:
        MOE_MODELS[model_type].plan(builder, config)
    plans = builder.finish()
    config.dtype = _common_dtype(plans)

    extra = {"source": repo_id or src_path.resolve().name, "source model_type": model_type}
    if is_upcycle:
        extra |= {"method": "sparse upcycling", "granularity": granularity or 1, "router init seed": seed}
    else:
        extra |= {"method": "weight conversion (defaults start at zero)"}

    with atomic_output_folder(dst, overwrite) as tmp:
        with _progress(len(plans), "converting", progress) as bar:
            write_checkpoint(tmp, plans, max_shard_bytes, progress=bar.update)
        _write_default_moe_config(tmp, config)
        carried = _copy_carried_files(src_path, tmp)
        if calibration_data is not None:
            from .calibrate import calibrate

            if not any(name.startswith("tokenizer") for name in carried):
                raise ConversionError(f"--calibration-data needs a tokenizer in SRC, and {src_path} has none")
            seen = calibrate(tmp, calibration_data, num_tokens=calibration_tokens, seq_len=calibration_seq_len)
            extra |= {"defaults": f"warmed on {seen} tokens of {calibration_data.name}"}
        from default_moe.cards import write_model_card

        write_model_card(tmp, base_model=base_model or repo_id, extra=extra)
    return dst


def export(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write a Default MoE checkpoint back in the original per-expert Hub layout of a MoE model (`MOE_MODELS`).

    The EMA defaults are dropped (stock transformers has no place for them), so the exported model computes the
    Default MoE model's top-K output, which equals its full output only while the defaults are zero. Returns DST.
    """
    dst = Path(dst)
    if to not in MOE_MODELS:
        raise ConversionError(f"unknown --to {to!r}: expected one of {', '.join(MOE_MODELS)}")
    out_dtype = _dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    if Path(src).exists():
        check_destination(Path(src), dst, overwrite)
    src_path, _ = resolve_source(src)
    check_destination(src_path, dst, overwrite)
    raw = read_config_json(src_path)
    if raw["model_type"] != "default_moe":
        raise ConversionError(
            f"SRC config.json has model_type {raw['model_type']!r}; export needs a default_moe checkpoint"
        )

    from default_moe import DefaultMoeConfig

    try:
        config = DefaultMoeConfig.from_pretrained(src_path)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    target = MOE_MODELS[to]
    target_config = target.export_config(config)
    reader = CheckpointReader(src_path)
    builder = PlanBuilder(reader, out_dtype, "Default MoE checkpoint")
    target.export_plan(builder, config)
    plans = builder.finish()
    _warn_if_defaults_nonzero(reader, config)
    target_config.architectures = [type(target_config).__name__.replace("Config", "ForCausalLM")]
    target_config.dtype = _common_dtype(plans)

    with atomic_output_folder(dst, overwrite) as tmp:
        with _progress(len(plans), f"exporting to {to}", progress) as bar:
            write_checkpoint(tmp, plans, max_shard_bytes, progress=bar.update)
        target_config.save_pretrained(tmp)
        _copy_carried_files(src_path, tmp)
    return dst


def _warn_if_defaults_nonzero(reader: CheckpointReader, config) -> None:
    if config.routing != "default" or config.default_term == "gradient":  # the forward is top-K: nothing is lost
        return
    for layer in config.moe_layers:
        name = f"model.layers.{layer}.mlp.default_outputs.ema"
        if name in reader and bool(reader.read(name).any()):
            logger.warning(
                "the EMA defaults are non-zero and are dropped: the exported model computes the top-K output only"
            )
            return
