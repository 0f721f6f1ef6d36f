"""Canonical Default MoE tensor names and shapes, and helpers that turn source tensors into `TensorPlan`s.

Canonical layout (what `DefaultMoeForCausalLM` loads):

    model.embed_tokens.weight                              (V, H)
    model.layers.{i}.input_layernorm.weight                (H,)          norm_placement="pre" (before attention)
    model.layers.{i}.post_attention_layernorm.weight       (H,)          pre: before the MLP; post: after attention
    model.layers.{i}.post_feedforward_layernorm.weight     (H,)          norm_placement="post" (after the MLP)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight       (+ .bias if attention_bias)
    model.layers.{i}.self_attn.{q,k}_norm.weight           qk_norm="projection": widths heads*head_dim and
                                                           kv_heads*head_dim; qk_norm="head": both head_dim
    model.layers.{i}.mlp.gate.weight                       (E, H)        MoE layers (i not in dense_layers)
    model.layers.{i}.mlp.experts.gate_up_proj              (E, 2I, H)    gate rows first, then up
    model.layers.{i}.mlp.experts.down_proj                 (E, H, I)
    model.layers.{i}.mlp.default_outputs.ema               (E, H) float32
    model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight   MoE layers with a shared expert (width S)
    model.layers.{i}.mlp.shared_expert_gate.weight         (1, H)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight        dense layers (i in dense_layers)
    model.norm.weight                                      (H,)
    lm_head.weight                                         (V, H), absent when tie_word_embeddings
"""

import copy
from collections.abc import Callable

import torch

from ..configuration_default_moe import LAYER_TYPES
from .io import CheckpointReader, ConversionError, TensorPlan

# Tensors some checkpoints carry that are recomputed by every model and can be dropped.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".rotary_emb.original_inv_freq")


def attention_shapes(config) -> dict[str, tuple[int, ...]]:
    """Expected shapes of one layer's attention tensors, by suffix under `self_attn.`."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        "q_proj.weight": (q_width, hidden),
        "k_proj.weight": (kv_width, hidden),
        "v_proj.weight": (kv_width, hidden),
        "o_proj.weight": (hidden, q_width),
    }
    if config.attention_bias:
        shapes |= {
            "q_proj.bias": (q_width,),
            "k_proj.bias": (kv_width,),
            "v_proj.bias": (kv_width,),
            "o_proj.bias": (hidden,),
        }
    if config.qk_norm == "projection":  # OLMoE: over the whole projection
        shapes |= {"q_norm.weight": (q_width,), "k_norm.weight": (kv_width,)}
    elif config.qk_norm == "head":  # Qwen3: over each head, one weight shared by all heads
        shapes |= {"q_norm.weight": (head_dim,), "k_norm.weight": (head_dim,)}
    return shapes


class PlanBuilder:
    """Collects output `TensorPlan`s from a source checkpoint, checking every source tensor's shape on the way.

    `dtype` (None: keep each source tensor's dtype) applies to floating-point tensors. At the end, `finish()`
    fails if the source holds tensors no plan used (an unknown layout, e.g. a quantised checkpoint).
    """

    def __init__(self, reader: CheckpointReader, dtype: torch.dtype | None, what: str):
        self.reader = reader
        self.dtype = dtype
        self.what = what  # e.g. "Mixtral checkpoint", for messages
        self.plans: list[TensorPlan] = []
        self.used: set[str] = set()

    def source(self, name: str, shape: tuple[int, ...]):
        if name not in self.reader:
            raise ConversionError(f"{self.what} lacks tensor {name}")
        info = self.reader[name]
        if info.shape != tuple(shape):
            raise ConversionError(f"{name} has shape {tuple(info.shape)} but config.json implies {tuple(shape)}")
        self.used.add(name)
        return info

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def has(self, name: str) -> bool:
        return name in self.reader

    def mark_used(self, name: str) -> None:
        self.used.add(name)

    def copy(self, out_name: str, src_name: str, shape: tuple[int, ...]) -> None:
        info = self.source(src_name, shape)
        dtype = self.out_dtype(info.dtype)
        self.plans.append(TensorPlan(out_name, dtype, tuple(shape), lambda: info.read().to(dtype)))

    def stack(self, out_name: str, pieces: list[tuple[str, tuple[int, ...]]], layout: Callable) -> None:
        """Build one tensor from several source tensors: `layout(out, i, piece)` copies piece i into `out`.

        Only the output and one piece are in memory at a time. The output shape is given by `layout.shape`.
        """
        infos = [self.source(name, shape) for name, shape in pieces]
        dtypes = {info.dtype for info in infos}
        if len(dtypes) != 1:
            raise ConversionError(f"{out_name}: source pieces have mixed dtypes {sorted(map(str, dtypes))}")
        dtype = self.out_dtype(infos[0].dtype)

        def make():
            out = torch.empty(layout.shape, dtype=dtype)
            for i, info in enumerate(infos):
                layout(out, i, info.read())
            return out

        self.plans.append(TensorPlan(out_name, dtype, tuple(layout.shape), make))

    def new(self, out_name: str, dtype: torch.dtype, shape: tuple[int, ...], make: Callable[[], torch.Tensor]) -> None:
        self.plans.append(TensorPlan(out_name, dtype, tuple(shape), make))

    def finish(self) -> list[TensorPlan]:
        unused = [n for n in self.reader.names() if n not in self.used and not n.endswith(IGNORED_SUFFIXES)]
        if unused:
            raise ConversionError(
                f"unexpected tensor {sorted(unused)[0]} in SRC ({len(unused)} unused in all): not a plain {self.what}?"
            )
        return self.plans


class Layout:
    """A callable `(out, i, piece)` with the output `shape`, for `PlanBuilder.stack`."""

    def __init__(self, shape: tuple[int, ...], place: Callable[[torch.Tensor, int, torch.Tensor], None]):
        self.shape = tuple(shape)
        self._place = place

    def __call__(self, out: torch.Tensor, i: int, piece: torch.Tensor) -> None:
        self._place(out, i, piece)


def fuse_experts(
    builder: PlanBuilder, out_prefix: str, gate: list[str], up: list[str], down: list[str], config
) -> None:
    """Per-expert (I, H) gate/up and (H, I) down source tensors -> canonical fused `gate_up_proj`, `down_proj`."""
    num_experts, hidden, width = config.num_experts, config.hidden_size, config.intermediate_size

    def place_gate_up(out, i, piece):
        expert, half = divmod(i, 2)
        out[expert, half * width : (half + 1) * width] = piece

    pieces = [(name, (width, hidden)) for pair in zip(gate, up, strict=True) for name in pair]
    builder.stack(f"{out_prefix}.gate_up_proj", pieces, Layout((num_experts, 2 * width, hidden), place_gate_up))

    def place_down(out, i, piece):
        out[i] = piece

    builder.stack(
        f"{out_prefix}.down_proj",
        [(name, (hidden, width)) for name in down],
        Layout((num_experts, hidden, width), place_down),
    )


def copy_dense_mlp(builder: PlanBuilder, prefix: str, width: int, config) -> None:
    """A SwiGLU MLP `{prefix}.{gate,up,down}_proj.weight` of width `width`, named alike in source and output."""
    hidden = config.hidden_size
    for name, shape in (("gate_proj", (width, hidden)), ("up_proj", (width, hidden)), ("down_proj", (hidden, width))):
        builder.copy(f"{prefix}.{name}.weight", f"{prefix}.{name}.weight", shape)


def copy_shared_expert(builder: PlanBuilder, layer: int, config) -> None:
    """Qwen2-MoE's shared expert and its sigmoid gate, under the same names in source and output."""
    if config.shared_expert_intermediate_size is None:
        return
    prefix = f"model.layers.{layer}.mlp"
    copy_dense_mlp(builder, f"{prefix}.shared_expert", config.shared_expert_intermediate_size, config)
    builder.copy(f"{prefix}.shared_expert_gate.weight", f"{prefix}.shared_expert_gate.weight", (1, config.hidden_size))


def ema_plan(builder: PlanBuilder, layer: int, config) -> None:
    shape = (config.num_experts, config.hidden_size)
    builder.new(f"model.layers.{layer}.mlp.default_outputs.ema", torch.float32, shape, lambda: torch.zeros(shape))


class TensorCache:
    """Keeps the last tensor read: export slices each fused expert tensor once per expert."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.name: str | None = None
        self.tensor: torch.Tensor | None = None

    def get(self, name: str, release: bool = False) -> torch.Tensor:
        """The tensor `name`, read once; `release=True` drops the cache's reference after this use."""
        if self.name != name:
            self.name, self.tensor = None, None  # free the previous tensor before reading the next one
            self.name, self.tensor = name, self.reader.read(name)
        tensor = self.tensor
        if release:
            self.name, self.tensor = None, None
        return tensor


def plan_decoder(
    builder: PlanBuilder, config, plan_mlp: Callable[[PlanBuilder, int], None], zero_fill=(), dropped=()
) -> None:
    """Everything but the MLPs under the same names in source and output; `plan_mlp(builder, layer)` does those.

    `zero_fill` lists attention suffixes (e.g. "o_proj.bias" for Qwen2) the source lacks and that are written as
    zeros, which is exactly what the source computes without them; `dropped` the suffixes an export target lacks,
    which are not written (`require_zero` checks them first).
    """
    hidden, vocab = config.hidden_size, config.vocab_size
    builder.copy("model.embed_tokens.weight", "model.embed_tokens.weight", (vocab, hidden))
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        if config.norm_placement == "pre":
            builder.copy(f"{prefix}.input_layernorm.weight", f"{prefix}.input_layernorm.weight", (hidden,))
        for suffix, shape in attention_shapes(config).items():
            name = f"{prefix}.self_attn.{suffix}"
            if suffix in dropped:
                builder.source(name, shape)
            elif suffix in zero_fill:
                like = builder.reader[f"{prefix}.self_attn.{suffix.split('.')[0]}.weight"].dtype
                dtype = builder.out_dtype(like)
                builder.new(name, dtype, shape, lambda shape=shape, dtype=dtype: torch.zeros(shape, dtype=dtype))
            else:
                builder.copy(name, name, shape)
        builder.copy(
            f"{prefix}.post_attention_layernorm.weight", f"{prefix}.post_attention_layernorm.weight", (hidden,)
        )
        plan_mlp(builder, layer)
        if config.norm_placement == "post":
            name = f"{prefix}.post_feedforward_layernorm.weight"
            builder.copy(name, name, (hidden,))
    builder.copy("model.norm.weight", "model.norm.weight", (hidden,))
    if not config.tie_word_embeddings:
        builder.copy("lm_head.weight", "lm_head.weight", (vocab, hidden))
    elif builder.has("lm_head.weight"):
        builder.mark_used("lm_head.weight")  # a tied checkpoint that stores the copy anyway: the embedding wins


def plan_moe_source_layer(
    builder: PlanBuilder, layer: int, config, block: str, per_expert: tuple[str, str, str]
) -> None:
    """One decoder MLP of a MoE source -> canonical, from per-expert names or transformers 5 fused.

    `block` is the source MoE module name ("block_sparse_moe" or "mlp"); `per_expert` the (gate, up, down) names
    under `{block}.experts.{e}.`. transformers 5 saves fused tensors under `mlp.` whatever the original name.
    Dense layers (Qwen-MoE's `mlp_only_layers`) and shared experts keep their names.
    """
    prefix = f"model.layers.{layer}"
    if layer in config.dense_layers:
        copy_dense_mlp(builder, f"{prefix}.mlp", config.dense_intermediate_size, config)
        return
    hidden, width, num_experts = config.hidden_size, config.intermediate_size, config.num_experts
    router = next(
        (f"{prefix}.{b}.gate.weight" for b in (block, "mlp") if builder.has(f"{prefix}.{b}.gate.weight")), None
    )
    builder.copy(f"{prefix}.mlp.gate.weight", router or f"{prefix}.{block}.gate.weight", (num_experts, hidden))
    for fused_block in dict.fromkeys(("mlp", block)):
        fused = f"{prefix}.{fused_block}.experts"
        if builder.has(f"{fused}.gate_up_proj") or builder.has(f"{fused}.down_proj"):
            builder.copy(
                f"{prefix}.mlp.experts.gate_up_proj", f"{fused}.gate_up_proj", (num_experts, 2 * width, hidden)
            )
            builder.copy(f"{prefix}.mlp.experts.down_proj", f"{fused}.down_proj", (num_experts, hidden, width))
            break
    else:
        experts = [f"{prefix}.{block}.experts.{e}" for e in range(num_experts)]
        gate, up, down = ([f"{x}.{name}.weight" for x in experts] for name in per_expert)
        fuse_experts(builder, f"{prefix}.mlp.experts", gate, up, down, config)
    copy_shared_expert(builder, layer, config)
    ema_plan(builder, layer, config)


def plan_moe_export_layer(
    builder: PlanBuilder, cache: TensorCache, layer: int, config, block: str, per_expert: tuple[str, str, str]
) -> None:
    """Canonical decoder MLP -> per-expert original names (`{block}.experts.{e}.{gate|up|down}.weight`)."""
    prefix = f"model.layers.{layer}"
    if layer in config.dense_layers:
        copy_dense_mlp(builder, f"{prefix}.mlp", config.dense_intermediate_size, config)
        return
    copy_shared_expert(builder, layer, config)
    hidden, width, num_experts = config.hidden_size, config.intermediate_size, config.num_experts
    builder.copy(f"{prefix}.{block}.gate.weight", f"{prefix}.mlp.gate.weight", (num_experts, hidden))
    gate_up = builder.source(f"{prefix}.mlp.experts.gate_up_proj", (num_experts, 2 * width, hidden))
    down = builder.source(f"{prefix}.mlp.experts.down_proj", (num_experts, hidden, width))
    builder.mark_used(f"{prefix}.mlp.default_outputs.ema")  # defaults have no place in the original layout
    gate_name, up_name, down_name = per_expert
    # All gate/up slices first, then all down slices: only one fused tensor is held at a time, and the last slice
    # of each releases it (a view of it lives on until written).
    for e in range(num_experts):
        for name, rows in ((gate_name, slice(0, width)), (up_name, slice(width, 2 * width))):
            dtype = builder.out_dtype(gate_up.dtype)
            release = e == num_experts - 1 and name == up_name
            builder.new(
                f"{prefix}.{block}.experts.{e}.{name}.weight",
                dtype,
                (width, hidden),
                lambda e=e, rows=rows, dtype=dtype, release=release: cache.get(gate_up.name, release)[e, rows].to(
                    dtype
                ),
            )
    for e in range(num_experts):
        dtype = builder.out_dtype(down.dtype)
        builder.new(
            f"{prefix}.{block}.experts.{e}.{down_name}.weight",
            dtype,
            (hidden, width),
            lambda e=e, dtype=dtype, release=e == num_experts - 1: cache.get(down.name, release)[e].to(dtype),
        )


def decoder_config_fields(src) -> dict:
    """Fields every supported source shares with `DefaultMoeConfig`, from a transformers config object."""
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    rope = getattr(src, "rope_parameters", None)  # flat, or nested by attention kind (OLMo-3)
    return {
        "vocab_size": src.vocab_size,
        "hidden_size": src.hidden_size,
        "num_hidden_layers": src.num_hidden_layers,
        "num_attention_heads": src.num_attention_heads,
        "num_key_value_heads": getattr(src, "num_key_value_heads", None) or src.num_attention_heads,
        "head_dim": head_dim,
        "hidden_act": src.hidden_act,
        "max_position_embeddings": src.max_position_embeddings,
        "initializer_range": src.initializer_range,
        "rms_norm_eps": src.rms_norm_eps,
        "use_cache": getattr(src, "use_cache", True),
        "pad_token_id": src.pad_token_id,
        "bos_token_id": src.bos_token_id,
        "eos_token_id": src.eos_token_id,
        "tie_word_embeddings": bool(src.tie_word_embeddings),
        "rope_parameters": copy.deepcopy(dict(rope)) if rope else None,
        "attention_dropout": getattr(src, "attention_dropout", 0.0),
    }


def layer_type_fields(src) -> dict:
    """`layer_types` and `sliding_window` of a source whose config lists the attention kind of every layer (Qwen2,
    Qwen3, Qwen2-MoE, OLMo-3). Their configs keep a window size (or 0) even when no layer slides: dropped then."""
    layer_types = list(src.layer_types)
    sliding = "sliding_attention" in layer_types
    return {"layer_types": layer_types, "sliding_window": src.sliding_window if sliding else None}


def export_decoder_fields(config, target: str) -> dict:
    """The inverse of `decoder_config_fields`, for writing the config of the MoE model `target`."""
    fields = {
        key: getattr(config, key)
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "initializer_range",
            "rms_norm_eps",
            "use_cache",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "tie_word_embeddings",
            "rope_parameters",
            "attention_dropout",
            "intermediate_size",
            "num_experts_per_tok",
            "output_router_logits",
        )
    }
    fields["rope_parameters"] = dict(config.rope_parameters) if config.rope_parameters else None
    require(
        not set(fields["rope_parameters"] or ()) & set(LAYER_TYPES),
        target,
        f"{target} has one RoPE for all layers (rope_parameters is per attention kind here)",
    )
    # Our Switch loss is 1.0 at balance, transformers' MoE losses are K: carry the coefficient back.
    fields["router_aux_loss_coef"] = config.router_aux_loss_coef / config.num_experts_per_tok
    return fields


def router_fields(src, num_experts: int) -> dict:
    """The router fields every MoE source maps alike; the inverse of `export_decoder_fields`'s coefficient."""
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": src.num_experts_per_tok,
        # transformers' MoE losses are K at balance, ours 1.0: scale so the gradient is the same.
        "router_aux_loss_coef": src.router_aux_loss_coef * src.num_experts_per_tok,
        "output_router_logits": src.output_router_logits,
    }


def uniform_sliding_window(config, target: str) -> int | None:
    """The `sliding_window` of a target whose layers all attend alike: None when no layer slides."""
    kinds = sorted(set(config.layer_types))
    require(len(kinds) == 1, target, f"{target} attends alike on every layer (layer_types mixes {kinds} here)")
    return config.sliding_window if kinds == ["sliding_attention"] else None


def require_norm_placement(config, target: str, placement: str) -> None:
    where = {"pre": "inputs", "post": "outputs"}[placement]
    require(
        config.norm_placement == placement,
        target,
        f"{target} normalises attention and MLP {where} (norm_placement={config.norm_placement!r} here)",
    )


def require_zero(reader: CheckpointReader, names: list[str], target: str, why: str) -> None:
    """Refuse to drop a tensor the target lacks unless it is zero (then dropping it changes nothing)."""
    for name in names:
        if name in reader and bool(reader.read(name).any()):
            raise ConversionError(f"cannot export to {target}: {name} is non-zero and {why}")


def require(condition: bool, target: str, why: str) -> None:
    if not condition:
        raise ConversionError(f"cannot export to {target}: {why}")
