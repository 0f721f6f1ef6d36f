"""Model cards: the README.md of a Default MoE checkpoint folder (`default-moe card DIR`).

`write_model_card(folder)` reads `folder/config.json` (and `folder/training_summary.json` when the training code wrote
one), and writes `folder/README.md`: YAML metadata the Hub understands (library, pipeline tag, tags, base model and its
relation, datasets, license) and a body rendered from the template in `default_moe/model_cards/`: an architecture
table with total and active parameter counts computed from the config, the routing and EMA settings, how the model
was made (conversion source, training steps, tokens, final losses) and a `trust_remote_code=True` usage snippet.

`training_summary.json` is a flat JSON object; these keys get a readable row when present, any other scalar key is
listed as is: `steps` (or `global_step`), `tokens` (or `num_tokens`, `tokens_seen`), `epochs`, `learning_rate`,
`train_runtime`, `final_losses` (a dict such as `{"lm_loss": 2.1, "aux_loss": 1.01, "eval_loss": 2.3}`), `datasets`
(or `dataset`) and `base_model`. `extra` (from the converters) is a dict rendered the same way, under "Conversion".
"""

import json
import os
from importlib import resources
from pathlib import Path
from string import Template

from huggingface_hub import ModelCard, ModelCardData

from .configuration_default_moe import DefaultMoeConfig
from .conversion.io import atomic_write_text

BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
TAGS = ["default-moe", "moe", "mixture-of-experts", "custom_code", "text-generation"]
SUMMARY_FILE = "training_summary.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# -- parameter counts --------------------------------------------------------------------------------------------------
def count_parameters(config: DefaultMoeConfig) -> dict[str, int]:
    """Parameter counts of a `DefaultMoeForCausalLM` built from `config`, without building it.

    Returns `total`, `active` (per token: K experts per MoE layer instead of E), and the parts: `embedding`,
    `attention`, `norms`, `router`, `experts`, `shared_expert` (with its gate; always active), `dense_mlp`, `lm_head`
    (0 when tied to the embedding).
    Buffers (the EMA defaults, rotary tables) are not parameters and are not counted.
    """
    hidden, heads, kv_heads, head_dim = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    if config.attention_bias:
        attention += q_width + 2 * kv_width + hidden
    if config.qk_norm == "projection":
        attention += q_width + kv_width
    elif config.qk_norm == "head":
        attention += 2 * head_dim
    num_layers = config.num_hidden_layers
    num_moe = len(config.moe_layers)
    shared = config.shared_expert_intermediate_size or 0
    experts_per_layer = config.num_experts * 3 * hidden * config.intermediate_size
    active_experts_per_layer = config.num_experts_per_tok * 3 * hidden * config.intermediate_size
    counts = {
        "embedding": config.vocab_size * hidden,
        "attention": num_layers * attention,
        "norms": num_layers * 2 * hidden + hidden,
        "router": num_moe * config.num_experts * hidden,
        "experts": num_moe * experts_per_layer,
        "shared_expert": num_moe * (3 * hidden * shared + hidden) if shared else 0,
        "dense_mlp": len(config.dense_layers) * 3 * hidden * config.dense_intermediate_size,
        "lm_head": 0 if config.tie_word_embeddings else config.vocab_size * hidden,
    }
    counts["total"] = sum(counts.values())
    counts["active"] = counts["total"] - num_moe * (experts_per_layer - active_experts_per_layer)
    return counts


def human_count(n: int) -> str:
    """12345678 -> '12.3M'."""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


# -- rendering ---------------------------------------------------------------------------------------------------------
def _table(rows: list[tuple[str, object]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _architecture_rows(config: DefaultMoeConfig, counts: dict[str, int]) -> list[tuple[str, object]]:
    num_dense = len(config.dense_layers)
    layers = f"{config.num_hidden_layers} ({num_dense} dense, {config.num_hidden_layers - num_dense} MoE)"
    if config.dense_layers != list(range(num_dense)):  # not just the first ones: say which
        layers += f"; dense: {', '.join(map(str, config.dense_layers))}"
    rows = [
        ("Total parameters", f"{counts['total']:,} ({human_count(counts['total'])})"),
        ("Active parameters per token", f"{counts['active']:,} ({human_count(counts['active'])})"),
        ("Layers", layers),
        ("Hidden size", config.hidden_size),
        ("Attention heads (query / key-value)", f"{config.num_attention_heads} / {config.num_key_value_heads}"),
        ("Head dim", config.head_dim),
        ("Experts per MoE layer", config.num_experts),
        ("Experts per token (top-k)", config.num_experts_per_tok),
        ("Expert intermediate size", config.intermediate_size),
    ]
    if config.shared_expert_intermediate_size is not None:
        rows.append(
            (
                "Shared expert (every MoE layer)",
                f"width {config.shared_expert_intermediate_size}, sigmoid-gated, always selected (no default vector)",
            )
        )
    if config.dense_layers:
        rows.append(("Dense MLP intermediate size", config.dense_intermediate_size))
    rows += [
        ("Vocabulary size", config.vocab_size),
        ("Max positions", config.max_position_embeddings),
        ("Activation", config.hidden_act),
        ("Tied embeddings", bool(config.tie_word_embeddings)),
    ]
    if config.norm_placement == "post":
        rows.append(("RMSNorm placement", "post: on attention and MLP outputs (OLMo-2 style)"))
    if config.qk_norm:
        rows.append(
            (
                "q/k RMSNorm",
                {"projection": "over the whole projections (OLMoE style)", "head": "per head (Qwen3 style)"}[
                    config.qk_norm
                ],
            )
        )
    if config.clip_qkv is not None:
        rows.append(("clip_qkv", config.clip_qkv))
    num_sliding = config.layer_types.count("sliding_attention")
    if num_sliding:
        where = (
            "every layer"
            if num_sliding == config.num_hidden_layers
            else f"{num_sliding} of {config.num_hidden_layers} layers"
        )
        rows.append(("Sliding window", f"{config.sliding_window} on {where}"))
    rope = config.rope_parameters or {}
    if rope.get("rope_theta") is not None:
        rows.append(("RoPE theta", rope["rope_theta"]))
    for kind in ("full_attention", "sliding_attention"):  # one RoPE per attention kind (OLMo-3)
        if isinstance(rope.get(kind), dict):
            rows.append((f"RoPE ({kind.replace('_', ' ')})", {k: v for k, v in rope[kind].items() if v is not None}))
    rows += [
        ("Parameters: embedding / attention / norms", _counts(counts, "embedding", "attention", "norms")),
        ("Parameters: router / experts / dense MLPs", _counts(counts, "router", "experts", "dense_mlp")),
    ]
    if counts["shared_expert"]:
        rows.append(("Parameters: shared experts", counts["shared_expert"]))
    rows += [
        ("Parameters: lm_head", "tied to the embedding" if config.tie_word_embeddings else counts["lm_head"]),
    ]
    return rows


def _counts(counts, *keys) -> str:
    return " / ".join(f"{counts[key]:,}" for key in keys)


def _routing_rows(config: DefaultMoeConfig) -> list[tuple[str, object]]:
    if config.routing == "topk":
        routing = "`topk`: standard sparse top-K MoE (no default vectors; the baseline)"
    else:
        routing = "`default`: unselected experts contribute their EMA default vector (dense router gradient)"
    weighting = {
        "mean": "`mean`: plain mean of the expert's outputs over its routed tokens (paper Eq. 10)",
        "router_prob": "`router_prob`: routed tokens weighted by their router probability",
    }[config.default_ema_weighting]
    update = {
        "before_use": "`before_use`: update with the current batch, then use (as in the paper)",
        "after_use": "`after_use`: use the previous defaults, then update (strictly causal)",
    }[config.default_ema_update]
    term = {
        "forward": "`forward`: added to the layer output (as in the paper)",
        "gradient": "`gradient`: router gradient only; the forward is exactly top-K (exports to Mixtral/OLMoE as is)",
    }[config.default_term]
    source = {
        "routed": "`routed`: the expert's outputs on the tokens routed to it (as in the paper)",
        "unrouted": f"`unrouted`: the expert's outputs on probed tokens not routed to it (1 in "
        f"{config.default_probe_stride} tokens)",
    }[config.default_ema_source]
    rows = [("Routing", routing), ("Top-k weights renormalised", bool(config.norm_topk_prob))]
    if config.routing == "default":
        rows += [
            ("Default term", term),
            ("EMA decay beta", config.default_ema_beta),
            ("EMA of", source),
            ("EMA weighting", weighting),
            ("EMA update order", update),
        ]
        if config.default_term == "forward":
            rows += [("Defaults used at inference", bool(config.default_in_inference))]
    rows += [
        ("Load-balancing loss coefficient", config.router_aux_loss_coef),
        ("Router z-loss coefficient", config.router_z_loss_coef),
        ("Router jitter noise", config.router_jitter_noise),
    ]
    return rows


_SUMMARY_LABELS = {
    "steps": "Training steps",
    "global_step": "Training steps",
    "tokens": "Training tokens",
    "num_tokens": "Training tokens",
    "tokens_seen": "Training tokens",
    "epochs": "Epochs",
    "learning_rate": "Learning rate",
    "train_runtime": "Training time (s)",
    "tokens_per_second": "Throughput (tokens/s)",
    "sequence_length": "Sequence length",
    "world_size": "Processes",
    "data": "Data",
}


def _summary_rows(summary: dict) -> list[tuple[str, object]]:
    rows, seen = [], set()
    for key, label in _SUMMARY_LABELS.items():
        if _is_plain(summary.get(key)) and label not in seen:
            seen.add(label)
            rows.append((label, summary[key]))
    losses = summary.get("final_losses")
    if isinstance(losses, dict):
        rows += [(f"Final {name.replace('_', ' ')}", value) for name, value in losses.items() if _is_plain(value)]
    skip = set(_SUMMARY_LABELS) | {"final_losses", "datasets", "dataset", "base_model", "base_model_relation"}
    rows += [(key, value) for key, value in summary.items() if key not in skip and _is_plain(value)]
    return rows


def _is_plain(value) -> bool:
    if isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (str, int, float, bool)) for v in value)
    if isinstance(value, dict):
        return all(isinstance(v, (str, int, float, bool)) for v in value.values())
    return False


def _provenance(base_model, relation, datasets, summary: dict | None, extra: dict | None) -> str:
    parts = []
    bases = [base_model] if isinstance(base_model, str) else list(base_model or [])
    if bases:
        verb = {
            "finetune": "Fine-tuned from",
            "adapter": "An adapter for",
            "merge": "A merge of",
            "quantized": "A quantized version of",
        }.get(relation or "", "Derived from")
        parts.append(f"{verb} {', '.join(f'[{b}](https://huggingface.co/{b})' for b in bases)}.")
    if extra:
        rows = [(key, value) for key, value in extra.items() if _is_plain(value)]
        parts.append("### Conversion\n\n" + _table(rows, ("Conversion", "Value")))
    if summary:
        parts.append("### Training\n\n" + _table(_summary_rows(summary), ("Training", "Value")))
    if datasets:
        names = [datasets] if isinstance(datasets, str) else list(datasets)
        parts.append("Data: " + ", ".join(f"`{name}`" for name in names) + ".")
    if not parts:
        parts.append("No training or conversion record was found next to this checkpoint.")
    return "\n\n".join(parts)


def _usage(repo_id: str, has_tokenizer: bool) -> str:
    if has_tokenizer:
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            'inputs = tokenizer("def fibonacci(n):", return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=40, do_sample=False)\n"
            "print(tokenizer.decode(output[0]))"
        )
    return (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        "input_ids = torch.tensor([[1, 2, 3, 4]])\n"
        "logits = model(input_ids).logits"
    )


# -- public API --------------------------------------------------------------------------------------------------------
def read_config(folder: str | os.PathLike) -> DefaultMoeConfig:
    """The `DefaultMoeConfig` in `folder/config.json` (ValueError with one line if missing or not Default MoE)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a checkpoint folder: {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict) or data.get("model_type") != DefaultMoeConfig.model_type:
        found = data.get("model_type") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not a Default MoE config (model_type={found!r}, expected 'default_moe')")
    return DefaultMoeConfig.from_dict(data)


def build_model_card(
    folder: str | os.PathLike,
    *,
    base_model: str | list[str] | None = None,
    base_model_relation: str | None = None,
    datasets: str | list[str] | None = None,
    extra: dict | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    title: str | None = None,
) -> ModelCard:
    """The `huggingface_hub.ModelCard` that `write_model_card` writes (see there)."""
    folder = Path(folder)
    config = read_config(folder)
    summary = None
    summary_path = folder / SUMMARY_FILE
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError as error:
            raise ValueError(f"cannot read {summary_path}: {error}") from error
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path} must hold a JSON object")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    # The training summary may name the base model and data itself; explicit arguments win.
    if summary:
        base_model = base_model or summary.get("base_model")
        base_model_relation = base_model_relation or summary.get("base_model_relation")
        datasets = datasets or summary.get("datasets") or summary.get("dataset")
    if base_model_relation is not None:
        if base_model_relation not in BASE_MODEL_RELATIONS:
            raise ValueError(f"base_model_relation={base_model_relation!r} is invalid: expected {BASE_MODEL_RELATIONS}")
        if not base_model:
            raise ValueError("base_model_relation needs a base_model")

    if isinstance(datasets, str):
        datasets = [datasets]
    metadata = {}
    if base_model_relation:
        metadata["base_model_relation"] = base_model_relation
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=list(TAGS) + ([f"routing-{config.routing}"] if config.routing != "default" else []),
        base_model=base_model or None,
        datasets=datasets or None,
        **metadata,
    )
    counts = count_parameters(config)
    name = title or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    num_moe = len(config.moe_layers)
    description = (
        f"A {human_count(counts['total'])}-parameter Default MoE decoder ({human_count(counts['active'])} active per "
        f"token): {config.num_hidden_layers} layers, {num_moe} of them Mixture-of-Experts with "
        f"{config.num_experts} experts and top-{config.num_experts_per_tok} routing."
    )
    has_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES)
    template = Template(resources.files("default_moe").joinpath("model_cards/default_moe.md").read_text())
    body = template.substitute(
        title=name,
        description=description,
        architecture_table=_table(_architecture_rows(config, counts), ("Architecture", "Value")),
        tied_note=", counted once since the output layer is tied to it" if config.tie_word_embeddings else "",
        top_k=config.num_experts_per_tok,
        num_experts=config.num_experts,
        routing_table=_table(_routing_rows(config), ("Setting", "Value")),
        provenance=_provenance(base_model, base_model_relation, datasets, summary, extra),
        usage=_usage(repo_id or "path/to/this/folder-or-repo-id", has_tokenizer),
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def write_model_card(
    folder: str | os.PathLike,
    *,
    base_model: str | list[str] | None = None,
    base_model_relation: str | None = None,
    datasets: str | list[str] | None = None,
    extra: dict | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    title: str | None = None,
) -> Path:
    """Write `folder/README.md` for the Default MoE checkpoint in `folder` and return its path.

    `base_model` (a Hub id or a list) and `base_model_relation` (one of `BASE_MODEL_RELATIONS`: "finetune" for
    training from a checkpoint, "adapter", "merge", "quantized"; leave it None for a format conversion) go into the
    metadata; `datasets` (names) too. `extra` is a dict describing a conversion (source, method, ...), rendered as a
    table. `folder/training_summary.json`, when present, supplies the training record. `repo_id` is used in the
    usage snippet. The file is written atomically (temporary file + rename); an existing README.md is replaced.
    """
    folder = Path(folder)
    card = build_model_card(
        folder,
        base_model=base_model,
        base_model_relation=base_model_relation,
        datasets=datasets,
        extra=extra,
        license=license,
        repo_id=repo_id,
        title=title,
    )
    return atomic_write_text(folder / "README.md", str(card))


# -- CLI ---------------------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("folder", help="checkpoint folder (config.json, weights, code files)")
    parser.add_argument("--base-model", action="append", help="Hub id of the model this one derives from (repeatable)")
    parser.add_argument(
        "--base-model-relation",
        choices=BASE_MODEL_RELATIONS,
        help="how it derives from --base-model (omit for a format conversion)",
    )
    parser.add_argument("--dataset", action="append", dest="datasets", help="training data set name (repeatable)")
    parser.add_argument("--license", default="apache-2.0", help="license id for the metadata (default: apache-2.0)")
    parser.add_argument("--repo-id", help="Hub repo id to show in the usage snippet")
    parser.add_argument("--title", help="card title (default: the folder or repo name)")


def run(args) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    base_model = args.base_model[0] if args.base_model and len(args.base_model) == 1 else args.base_model
    path = write_model_card(
        folder,
        base_model=base_model,
        base_model_relation=args.base_model_relation,
        datasets=args.datasets,
        license=args.license,
        repo_id=args.repo_id,
        title=args.title,
    )
    print(f"wrote {path}")
    return 0
