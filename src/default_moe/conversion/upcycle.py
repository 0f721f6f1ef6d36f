"""Sparse upcycling of dense Llama-family models (Komatsuzaki et al. 2022; NVIDIA arXiv 2410.07524).

Sources: Llama, Mistral, Qwen2, Qwen3 (q/k norms per head: `qk_norm="head"`), OLMo-2 and OLMo-3 (whose norms sit
on the sublayer outputs: `norm_placement="post"`, with q/k norms over the whole projections). Qwen2, Qwen3 and OLMo-3
list the attention kind of every layer (`layer_types`: full or sliding window), which is carried over, as is
OLMo-3's RoPE per attention kind. Everything but the MLPs is carried over. Each MLP of width I becomes E
experts of width I/G (granularity G): the dense FFN is split into G slices along its hidden width and expert e gets
slice e mod G. The router of every MoE layer is the NVIDIA "virtual group" init: E/G fresh rows (normal, std
`initializer_range`), each repeated G times, so the G experts of a group (e = jG .. jG+G-1, one of each slice)
always share a probability.

Why step 0 reproduces the dense model exactly (with `norm_topk_prob=True`, the default, and zero defaults):
with K a multiple of G, top-K always selects whole groups (K/G of them); the renormalised weights of a selected
group j are p_j / (G * S) per expert (S = sum of the selected groups' probabilities), so the group contributes
p_j / (G * S) * sum_g FFN_g(x) = p_j / (G * S) * FFN(x), and all selected groups together FFN(x) / G. Scaling
every expert's `down_proj` by G makes the layer output FFN(x). With G = 1 no scaling is needed and any K works.

The scaling by G is exact when G is a power of two; otherwise it rounds once per weight in the output dtype,
which is negligible in float32 but not in bfloat16/float16 (a warning says so; convert with dtype=float32).

With `norm_topk_prob=False` the output is (sum of the selected probabilities) * FFN(x), a per-token shrink; with
non-zero defaults (e.g. after calibration) the unselected experts add sum p_i D_i. Both change step-0 outputs.
"""

import logging

import torch

from .io import ConversionError
from .layout import (
    Layout,
    PlanBuilder,
    copy_dense_mlp,
    decoder_config_fields,
    ema_plan,
    layer_type_fields,
    plan_decoder,
)

logger = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3")
LAYER_TYPED = ("qwen2", "qwen3", "olmo3")  # sources whose config has `layer_types`
POST_NORM = ("olmo2", "olmo3")  # norms on the sublayer outputs, q/k norms over the whole projections


def default_moe_fields(
    src, model_type: str, num_experts: int, top_k: int, granularity: int, num_dense_layers: int, norm_topk_prob: bool
) -> dict:
    if getattr(src, "mlp_bias", False):
        raise ConversionError(f"{model_type} checkpoints with mlp_bias=True are not supported (experts have no bias)")
    width = src.intermediate_size
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("granularity", granularity)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConversionError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if top_k > num_experts:
        raise ConversionError(f"--top-k {top_k} exceeds --num-experts {num_experts}")
    if num_experts % granularity or top_k % granularity or width % granularity:
        raise ConversionError(
            f"--granularity {granularity} must divide --num-experts ({num_experts}), --top-k ({top_k}) and the dense "
            f"intermediate_size ({width})"
        )
    if not 0 <= num_dense_layers <= src.num_hidden_layers:
        raise ConversionError(f"--num-dense-layers must be in [0, {src.num_hidden_layers}], got {num_dense_layers}")

    if model_type in LAYER_TYPED:
        attention = layer_type_fields(src)
    else:  # Mistral slides on every layer when it has a window
        attention = {"sliding_window": getattr(src, "sliding_window", None) if model_type == "mistral" else None}
    # Qwen2: q/k/v have a bias and o_proj does not (written as zeros); the others have all four or none.
    attention_bias = True if model_type == "qwen2" else bool(getattr(src, "attention_bias", False))
    qk_norm = "projection" if model_type in POST_NORM else "head" if model_type == "qwen3" else False
    return (
        decoder_config_fields(src)
        | attention
        | {
            "intermediate_size": width // granularity,
            "dense_intermediate_size": width,
            "num_dense_layers": num_dense_layers,
            "attention_bias": attention_bias,
            "norm_placement": "post" if model_type in POST_NORM else "pre",
            "qk_norm": qk_norm,
            "clip_qkv": None,
            "router_jitter_noise": 0.0,
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "norm_topk_prob": norm_topk_prob,
            "router_aux_loss_coef": 0.01,  # the paper's Switch-loss coefficient
        }
    )


def plan(builder: PlanBuilder, config, model_type: str, granularity: int, seed: int) -> None:
    if granularity & (granularity - 1):
        low_precision = {builder.out_dtype(info.dtype) for info in builder.reader.infos.values()} - {torch.float32}
        if low_precision:
            logger.warning(
                "granularity %d is not a power of two: scaling down_proj by it rounds in %s, so step 0 matches the "
                "dense model only approximately (pass dtype=float32 for an exact match)",
                granularity,
                sorted(map(str, low_precision))[0],
            )
    hidden, dense_width = config.hidden_size, config.dense_intermediate_size
    width, num_experts = config.intermediate_size, config.num_experts

    def plan_mlp(b: PlanBuilder, layer: int) -> None:
        prefix = f"model.layers.{layer}.mlp"
        gate, up, down = (f"{prefix}.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj"))
        if layer in config.dense_layers:
            copy_dense_mlp(b, prefix, dense_width, config)
            return
        router_dtype = b.out_dtype(b.reader[gate].dtype)

        def make_router(layer=layer):
            generator = torch.Generator().manual_seed(seed * 100_003 + layer)
            rows = torch.randn(num_experts // granularity, hidden, generator=generator) * config.initializer_range
            return rows.repeat_interleave(granularity, dim=0).to(router_dtype)

        b.new(f"{prefix}.gate.weight", router_dtype, (num_experts, hidden), make_router)

        def place_gate_up(out, i, piece):  # piece 0 is the dense gate (I, H), piece 1 the dense up
            for e in range(num_experts):
                g = e % granularity
                out[e, i * width : (i + 1) * width] = piece[g * width : (g + 1) * width]

        def place_down(out, i, piece):  # the dense down (H, I), each slice scaled by G (see the module docstring)
            for e in range(num_experts):
                g = e % granularity
                out[e] = piece[:, g * width : (g + 1) * width].float() * granularity

        b.stack(
            f"{prefix}.experts.gate_up_proj",
            [(gate, (dense_width, hidden)), (up, (dense_width, hidden))],
            Layout((num_experts, 2 * width, hidden), place_gate_up),
        )
        b.stack(
            f"{prefix}.experts.down_proj",
            [(down, (hidden, dense_width))],
            Layout((num_experts, hidden, width), place_down),
        )
        ema_plan(b, layer, config)

    zero_fill = ("o_proj.bias",) if model_type == "qwen2" else ()
    plan_decoder(builder, config, plan_mlp, zero_fill=zero_fill)
