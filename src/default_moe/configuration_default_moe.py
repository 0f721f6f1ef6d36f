"""Configuration of a Default MoE decoder (Panda, Baherwani et al., arXiv 2504.12463).

This file is copied next to every checkpoint and may import only transformers.
"""

import transformers
from transformers.configuration_utils import PreTrainedConfig

ROUTINGS = ("default", "topk")
EMA_WEIGHTINGS = ("mean", "router_prob")
EMA_UPDATES = ("before_use", "after_use")
DEFAULT_TERMS = ("forward", "gradient")
EMA_SOURCES = ("routed", "unrouted")
NORM_PLACEMENTS = ("pre", "post")
QK_NORMS = (False, "projection", "head")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Where tensor parallelism alone puts the experts, as transformers' own MoEs do in each release: up to 5.24 the TP
# plan splits each expert's width (`packed_colwise` + `rowwise` + `moe_tp_experts`, as Mixtral and Qwen3-MoE there);
# from 5.25 on that style is deprecated (removal in 5.28), the TP plans of Mixtral, OLMoE and the Qwen MoEs name no
# expert, and the experts are split only by expert parallelism (`ep_size`), replicated under `tp_size` alone.
EXPERTS_IN_TP_PLAN = tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 25)


class DefaultMoeConfig(PreTrainedConfig):
    r"""
    A Llama-style decoder whose MLPs are sparse top-K Mixture-of-Experts layers with *default vectors*: each expert
    keeps an exponential moving average (EMA) of its outputs, and the experts a token did not pick contribute that
    EMA weighted by their router probability, so the router gets a dense gradient while the experts stay sparse.

    Decoder fields follow Mixtral/OLMoE/Qwen. `qk_norm` normalises q and k with an RMSNorm: `"projection"` over the
    *whole* q and k projections, before the per-head reshape (OLMoE, OLMo-2/3; `True` in configs written before
    `"head"` existed), `"head"` over each head's head_dim after the reshape, one weight shared by all heads (Qwen3,
    Qwen3-MoE), or `False` (none). `clip_qkv` clamps q, k and v; `router_jitter_noise` is Mixtral's multiplicative
    input jitter in training. `norm_placement` says where each sublayer's RMSNorm sits: `"pre"` normalises the
    attention and MLP *inputs*, `x + f(norm(x))` (Llama, Mixtral, OLMoE, Qwen); `"post"` normalises their *outputs*
    inside the residual branch, `x + norm(f(x))` (OLMo-2's reordered norm, OLMo-3, FlexOlmo).

    `layer_types` gives each layer's attention: `"full_attention"` (causal) or `"sliding_attention"` (causal within
    the last `sliding_window` positions); default: every layer sliding if `sliding_window` is set, else every layer
    full (OLMo-3 and Qwen2/Qwen3's `max_window_layers` mix them). `rope_parameters` is one dict for all layers, or,
    as in OLMo-3, one per attention kind (`{"full_attention": {...}, "sliding_attention": {...}}`).

    `dense_layers` lists the layers whose MLP is a dense SwiGLU of width `dense_intermediate_size` (default:
    `intermediate_size`) instead of a MoE block (Qwen3-MoE's `mlp_only_layers` and `decoder_sparse_step`). Without
    it, the first `num_dense_layers` layers are dense (the paper keeps the first layer dense); once set,
    `num_dense_layers` is the number of dense layers.

    MoE fields: `num_experts`, `num_experts_per_tok` (K), `norm_topk_prob` (divide the K selected probabilities by
    their sum; Mixtral always does, OLMoE and the paper do not), `router_aux_loss_coef` (Switch load-balancing loss,
    per layer, averaged over layers; 1.0 when perfectly balanced), `router_z_loss_coef`, `output_router_logits`.
    `shared_expert_intermediate_size` (default None: none) adds Qwen2-MoE's *shared expert* to every MoE layer: a dense
    SwiGLU MLP of that width that every token goes through, scaled by a sigmoid gate, `sigmoid(x . g) * S(x)`, and
    added to the routed output. Since it is always selected it needs no default vector: the Default MoE term covers
    the routed experts only, `y = sum_{i in topK} w_i E_i(x) + sum_{i not in topK} p_i D_i + sigmoid(x . g) S(x)`,
    and the EMA defaults average the routed experts' outputs alone.

    Default MoE fields:
        routing (`str`): `"default"` adds the EMA defaults of unselected experts; `"topk"` is the standard layer.
        default_ema_beta (`float`): EMA decay beta in [0, 1): `D <- beta * D + (1 - beta) * batch_mean`.
        default_ema_weighting (`str`): `"mean"` (paper Eq. 10, plain mean over routed tokens) or `"router_prob"`
            (each routed token weighted by its router probability, the paper's final variant).
        default_ema_update (`str`): `"before_use"` (the paper: update with this batch, then use) or `"after_use"`
            (strictly causal: use the previous defaults, then update).
        default_term (`str`): `"forward"` (the paper) adds `sum p_i D_i` to the output; `"gradient"` adds it to the
            router gradient only: the forward is exactly top-K (a trained model exports to Mixtral/OLMoE unchanged)
            while the router still gets `<dL/dy, D_i>` for every unselected expert.
        default_ema_source (`str`): which tokens an expert's default is the EMA of. `"routed"` (the paper): its
            outputs on the tokens routed to it. `"unrouted"`: its outputs on tokens *not* routed to it, which is what
            the default stands in for (an expert's output on its own tokens overshoots the rest when experts
            specialise): every `default_probe_stride`-th token of a training forward also runs through the experts it
            did not pick, without gradient, for the EMA only.
        default_probe_stride (`int`): one probed token per this many tokens with `default_ema_source="unrouted"`;
            extra expert compute ~ num_experts / (3 * num_experts_per_tok * stride) of the experts' training cost.
        default_in_inference (`bool`): whether eval-mode forwards add the defaults (with `default_term="forward"`).
        all_reduce_router_stats (`bool`): all-reduce the per-expert EMA statistics and load-balancing token counts
            across data-parallel ranks when `torch.distributed` is initialised (training mode only).
    """

    model_type = "default_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Expert parallelism through transformers (`DistributedConfig(ep_size=...)`), the same on every release: whole
    # experts per rank, tokens dispatched inside the experts' standard call (with 5.24's default
    # `ep_implementation="auto"`: all-to-all in training, so each pair's output reaches every rank that holds its
    # token). The router stays replicated, so every rank has the unmasked router probabilities the default term needs.
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    attribute_map = {"num_local_experts": "num_experts"}
    default_theta = 10000.0

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    norm_placement: str = "pre"
    qk_norm: bool | str = False
    clip_qkv: float | None = None
    router_jitter_noise: float = 0.0
    num_dense_layers: int = 0
    dense_layers: list[int] | None = None
    dense_intermediate_size: int | None = None

    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    output_router_logits: bool = False

    routing: str = "default"
    default_ema_beta: float = 0.9
    default_ema_weighting: str = "mean"
    default_ema_update: str = "before_use"
    default_term: str = "forward"
    default_ema_source: str = "routed"
    default_probe_stride: int = 64
    default_in_inference: bool = True
    all_reduce_router_stats: bool = True

    def _tensor_parallel_plan(self) -> dict[str, str]:
        """`base_model_tp_plan`, set per config in `__post_init__` (transformers reads it from the instance, never
        saves it, and 5.20 adds the tied embedding's rule to it there), with a rule for exactly the modules this
        config has: tensor parallelism through transformers (`tp_plan="auto"`), as its own MoEs: attention heads
        colwise/rowwise; the dense layers' MLPs and the shared expert colwise/rowwise (as DeepSeek-V3's shared
        experts); the router and the shared expert's gate replicated. With `qk_norm="projection"` q, k and v are
        gathered for the norm over the whole projection (as OLMoE); with `qk_norm="head"` the per-head norm weights
        are replicated and their gradients, each rank's from its own heads, all-reduced (as Qwen3-MoE). The experts:
        see `EXPERTS_IN_TP_PLAN`; the block adds the default term once, after the experts' outputs are complete.
        The embedding's `embedding_rowwise` comes from transformers itself (5.20 adds it for tied embeddings, 5.24 and
        5.25 for any model with a TP plan), `lm_head`'s `colwise_gather_output` from `DefaultMoeForCausalLM._tp_plan`
        (as Llama and Qwen3): both split on the vocabulary, so a tied pair stays one tensor."""
        if self.qk_norm == "projection":
            attention = {"q_proj": "colwise_gather_output", "k_proj": "colwise_gather_output"}
            attention |= {"v_proj": "colwise_gather_output", "o_proj": "rowwise_split_input"}
        else:
            attention = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
        if self.qk_norm == "head":
            attention |= {"q_norm": "replicated_with_grad_allreduce", "k_norm": "replicated_with_grad_allreduce"}
        plan = {f"layers.*.self_attn.{name}": style for name, style in attention.items()}
        mlps = ["mlp"] if self.dense_layers else []
        if self.moe_layers and self.shared_expert_intermediate_size is not None:
            mlps.append("mlp.shared_expert")
        for mlp in mlps:
            plan |= {f"layers.*.{mlp}.gate_proj": "colwise", f"layers.*.{mlp}.up_proj": "colwise"}
            plan |= {f"layers.*.{mlp}.down_proj": "rowwise"}
        if self.moe_layers and EXPERTS_IN_TP_PLAN:  # each expert's width split, partial outputs all-reduced
            plan |= {"layers.*.mlp.experts.gate_up_proj": "packed_colwise", "layers.*.mlp.experts.down_proj": "rowwise"}
            plan |= {"layers.*.mlp.experts": "moe_tp_experts"}
        return plan

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.dense_intermediate_size is None:
            self.dense_intermediate_size = self.intermediate_size
        if self.qk_norm is True:  # written before qk_norm="head" existed
            self.qk_norm = "projection"
        self._check_fields()
        self.base_model_tp_plan = self._tensor_parallel_plan()
        super().__post_init__(**kwargs)

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers with a MoE block: every layer not in `dense_layers`."""
        dense = set(self.dense_layers)
        return [i for i in range(self.num_hidden_layers) if i not in dense]

    def _check_fields(self):
        def fail(field, accepted):
            raise ValueError(f"DefaultMoeConfig.{field}={getattr(self, field)!r} is invalid: expected {accepted}")

        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "num_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
            "dense_intermediate_size",
            "default_probe_stride",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(field, "a positive integer")
        if self.head_dim is None:
            fail("num_attention_heads", f"a divisor of hidden_size={self.hidden_size} (or set head_dim)")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", f"at most num_experts={self.num_experts}")
        if not 0 <= self.num_dense_layers <= self.num_hidden_layers:
            fail("num_dense_layers", f"an integer in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.norm_placement not in NORM_PLACEMENTS:
            fail("norm_placement", f"one of {NORM_PLACEMENTS}")
        if self.routing not in ROUTINGS:
            fail("routing", f"one of {ROUTINGS}")
        if self.default_ema_weighting not in EMA_WEIGHTINGS:
            fail("default_ema_weighting", f"one of {EMA_WEIGHTINGS}")
        if self.default_ema_update not in EMA_UPDATES:
            fail("default_ema_update", f"one of {EMA_UPDATES}")
        if self.default_term not in DEFAULT_TERMS:
            fail("default_term", f"one of {DEFAULT_TERMS}")
        if self.default_ema_source not in EMA_SOURCES:
            fail("default_ema_source", f"one of {EMA_SOURCES}")
        if not 0.0 <= self.default_ema_beta < 1.0:
            fail("default_ema_beta", "a number in [0, 1)")
        for field in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "attention_dropout"):
            if getattr(self, field) < 0:
                fail(field, "a non-negative number")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            fail("clip_qkv", "None or a positive number")
        if self.sliding_window is not None and self.sliding_window < 1:
            fail("sliding_window", "None or a positive integer")
        if not (self.qk_norm is False or self.qk_norm in QK_NORMS[1:]):
            fail("qk_norm", f"one of {QK_NORMS}")
        shared = self.shared_expert_intermediate_size
        if shared is not None and (not isinstance(shared, int) or isinstance(shared, bool) or shared < 1):
            fail("shared_expert_intermediate_size", "None or a positive integer")

        # The per-layer lists: checked, or filled in from their shorthands (num_dense_layers, sliding_window).
        num_layers = self.num_hidden_layers
        if self.dense_layers is None:
            self.dense_layers = list(range(self.num_dense_layers))
        else:
            layers = self.dense_layers
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in layers
            ):
                fail("dense_layers", f"a list of layer indices in [0, num_hidden_layers={num_layers})")
            if len(set(layers)) != len(layers):
                fail("dense_layers", "distinct layer indices")
            if self.num_dense_layers not in (0, len(layers)):
                fail("num_dense_layers", f"0 or len(dense_layers)={len(layers)} (dense_layers says which layers)")
            self.dense_layers = sorted(layers)
            self.num_dense_layers = len(layers)

        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * num_layers
        elif not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != num_layers:
            fail("layer_types", f"a list of num_hidden_layers={num_layers} attention kinds from {LAYER_TYPES}")
        elif any(kind not in LAYER_TYPES for kind in self.layer_types):
            fail("layer_types", f"attention kinds from {LAYER_TYPES}")
        self.layer_types = list(self.layer_types)
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            fail("sliding_window", "a positive integer: layer_types has sliding layers")

        rope = self.rope_parameters or {}
        nested = [key for key in rope if key in LAYER_TYPES]
        if nested and not set(self.layer_types) <= set(nested):
            fail("rope_parameters", f"one entry per attention kind in layer_types ({sorted(set(self.layer_types))})")


__all__ = ["DefaultMoeConfig"]
