"""LoRA for Default MoE: a `peft.LoraConfig` that reaches the router and the fused experts and keeps the EMA defaults.

Three things differ from LoRA on a Llama-style model (DESIGN.md §3):

- The router (`mlp.gate`, a `DefaultMoeTopKRouter`) and the experts (`mlp.experts`, fused 3-D parameters
  `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)) are not `nn.Linear` modules, so `target_modules` cannot reach
  them. PEFT's `target_parameters` wraps the parameters themselves (`lora.ParamWrapper`; one rank-r pair per expert for
  3-D parameters). PEFT matches a `target_parameters` entry against `<module path>.<parameter name>` exactly or as a
  dotted suffix, so `"mlp.gate.weight"` matches every MoE layer and `"model.layers.3.mlp.gate.weight"` only layer 3.
  PEFT does not support LoRA dropout on parameter targets.
- The EMA default vectors are buffers that training-mode forwards update when they train, LoRA training included.
  An adapter saves only adapter weights, so those updates would be lost. They live in a buffer-only submodule,
  `mlp.default_outputs`; listing it in `modules_to_save` makes PEFT keep a copy per adapter, route the forward's
  reads and updates to the active copy, and save and load it with the adapter (`...mlp.default_outputs.ema` in
  `adapter_model.safetensors`).
  `merge_and_unload()` puts that copy back in the model.
- Attention projections, the dense MLPs of the layers in `dense_layers` (anywhere in the stack) and a shared expert
  with its gate (Qwen2-MoE: `mlp.shared_expert.{gate,up,down}_proj`, `mlp.shared_expert_gate`) are ordinary
  `nn.Linear` modules. The targets name the module's parent (`mlp.gate_proj`, `mlp.shared_expert.gate_proj`) so that a
  dense MLP and a shared expert, whose projections share their names, are chosen separately.
"""

import re
from collections.abc import Iterable

from peft import LoraConfig

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED_EXPERT_MODULES = (
    "mlp.shared_expert.gate_proj",
    "mlp.shared_expert.up_proj",
    "mlp.shared_expert.down_proj",
    "mlp.shared_expert_gate",
)
ROUTER_PARAMETERS = ("mlp.gate.weight",)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
DEFAULTS_MODULE = "default_outputs"


def lora_config(
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    *,
    attention: bool = True,
    router: bool = True,
    experts: bool = True,
    dense_mlp: bool = True,
    shared_expert: bool = True,
    keep_defaults: bool = True,
    layers: Iterable[int] | None = None,
    model=None,
    **lora_kwargs,
) -> LoraConfig:
    """A `LoraConfig` for a `DefaultMoeForCausalLM` (use with `peft.get_peft_model(model, config)`).

    Args:
        r, alpha, dropout: LoRA rank, alpha and dropout. Dropout must be 0 when the router or experts are targeted
            (PEFT cannot apply dropout to parameter targets).
        attention: adapt `self_attn.{q,k,v,o}_proj`.
        router: adapt the router weight `mlp.gate.weight` (E, H).
        experts: adapt the fused experts `mlp.experts.gate_up_proj` and `mlp.experts.down_proj` (rank r per expert).
        dense_mlp: adapt the dense layers' `mlp.{gate,up,down}_proj`, if the model has dense layers.
        shared_expert: adapt the shared expert `mlp.shared_expert.{gate,up,down}_proj` and its gate
            `mlp.shared_expert_gate`, if the model has one.
        keep_defaults: put `default_outputs` in `modules_to_save`, so the EMA defaults that training updates are
            saved with (and restored from) the adapter. Turn off only for `routing="topk"` models or frozen-EMA runs.
        layers: only adapt these decoder layers (indices); the EMA defaults of all layers are kept regardless,
            since every training forward updates them.
        model: the model to be adapted; when given, targets it does not have (e.g. router/experts in an all-dense
            model, a shared expert in a model without one) are dropped and layer indices are checked.
        lora_kwargs: passed to `LoraConfig` (e.g. `use_rslora=True`, `init_lora_weights="gaussian"`).
    """
    if r < 1:
        raise ValueError(f"LoRA rank r={r} must be a positive integer")
    if (router or experts) and dropout:
        raise ValueError(
            f"LoRA dropout={dropout} is not supported on the router/experts (PEFT parameter targets): "
            "use dropout=0.0 or router=False, experts=False"
        )
    layers = None if layers is None else sorted(set(layers))
    moe_layers = layers  # layers whose router/experts to adapt (all given ones unless the model says otherwise)
    if model is not None:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "default_moe":
            raise ValueError(f"lora_config(model=...) expects a Default MoE model, got {type(model).__name__}")
        num_layers, dense = config.num_hidden_layers, set(config.dense_layers)
        if layers is not None and any(not 0 <= i < num_layers for i in layers):
            raise ValueError(f"layers={layers} out of range for a model with {num_layers} layers")
        chosen = range(num_layers) if layers is None else layers
        if layers is not None:
            moe_layers = [i for i in layers if i not in dense]
        any_moe = any(i not in dense for i in chosen)
        router, experts = router and any_moe, experts and any_moe
        shared_expert = shared_expert and any_moe and config.shared_expert_intermediate_size is not None
        dense_mlp = dense_mlp and any(i in dense for i in chosen)

    module_names = (ATTENTION_MODULES if attention else ()) + (DENSE_MLP_MODULES if dense_mlp else ())
    module_names += SHARED_EXPERT_MODULES if shared_expert else ()
    parameter_names = (ROUTER_PARAMETERS if router else ()) + (EXPERT_PARAMETERS if experts else ())
    if not module_names and not parameter_names:
        raise ValueError(
            "lora_config: nothing to adapt (attention, router, experts, dense_mlp and shared_expert are all off)"
        )

    if layers is None:
        target_modules = list(module_names) or None
        target_parameters = list(parameter_names) or None
    else:
        # A regex string is matched by PEFT against the full module name.
        layer_group = "|".join(str(i) for i in layers)
        alternatives = [re.escape(f"self_attn.{m}") for m in ATTENTION_MODULES if m in module_names]
        alternatives += [re.escape(m) for m in DENSE_MLP_MODULES + SHARED_EXPERT_MODULES if m in module_names]
        target_modules = f".*layers\\.({layer_group})\\.({'|'.join(alternatives)})" if alternatives else None
        target_parameters = [f"model.layers.{i}.{p}" for i in moe_layers for p in parameter_names] or None

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        target_parameters=target_parameters,
        modules_to_save=[DEFAULTS_MODULE] if keep_defaults else None,
        task_type=lora_kwargs.pop("task_type", "CAUSAL_LM"),
        **lora_kwargs,
    )


__all__ = ["lora_config"]
