"""Default MoE: a sparse top-K Mixture-of-Experts decoder whose router gets a dense gradient.

Panda, Baherwani et al., "Dense Backpropagation Improves Training for Sparse Mixture-of-Experts"
(arXiv 2504.12463, NeurIPS 2025). Every expert i keeps a default vector D_i, an exponential moving average of its
outputs. A token's MoE output is

    y = sum_{i in topK} w_i E_i(x) + sum_{i not in topK} p_i D_i

so the forward pass stays sparse while dL/dp_i = <dL/dy, D_i> reaches the router for every expert.

This file is copied next to every checkpoint: it imports only torch, transformers and its sibling config.

Shape legend: B batch, S sequence, T = B*S tokens, H hidden, E experts, K experts per token, I expert width,
N = T*K (token, expert) pairs. Suffixes name the shapes, e.g. `probs_TE`.
"""

import copy
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_default_moe import DefaultMoeConfig

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache` (the old name is
# deprecated, announced for removal in 5.40); 5.20-5.23 know only `past_key_values`. Forwards accept both names and
# hand the cache on, and return it, under the name the running release uses.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


_TRANSFORMERS_VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


class DefaultMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DefaultMoeRotaryEmbedding(nn.Module):
    """RoPE cos/sin. With `layer_type`, the RoPE of that attention kind when `rope_parameters` has one per kind
    (OLMo-3): `self.config` is then a view of the config holding that entry alone, so that transformers' RoPE functions
    (and its re-initialisation of `inv_freq`) read it as the only one."""

    def __init__(self, config: DefaultMoeConfig, layer_type: str | None = None):
        super().__init__()
        if layer_type is not None:
            config = copy.copy(config)
            config.rope_parameters = config.rope_parameters[layer_type]
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DefaultMoeConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, S, D) -> (B, kv_heads * n_rep, S, D)"""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DefaultMoeAttention(nn.Module):
    """Grouped-query attention with RoPE, full or sliding-window (`config.layer_types[layer_idx]`); optional q/k RMSNorm
    over the whole projection (OLMoE) or per head (Qwen3), and clip_qkv."""

    def __init__(self, config: DefaultMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_bias)
        if config.qk_norm:  # "projection": over the whole q/k projection; "head": over head_dim, shared by the heads
            per_head = config.qk_norm == "head"
            self.q_norm = DefaultMoeRMSNorm(self.head_dim if per_head else q_width, eps=config.rms_norm_eps)
            self.k_norm = DefaultMoeRMSNorm(self.head_dim if per_head else kv_width, eps=config.rms_norm_eps)
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states)
        key_states = self.k_proj(hidden_states)
        value_states = self.v_proj(hidden_states)
        if self.config.qk_norm == "projection":
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        if self.config.clip_qkv is not None:
            clip = self.config.clip_qkv
            query_states = query_states.clamp(-clip, clip)
            key_states = key_states.clamp(-clip, clip)
            value_states = value_states.clamp(-clip, clip)

        query_states = query_states.view(hidden_shape)
        key_states = key_states.view(hidden_shape)
        if self.config.qk_norm == "head":
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = value_states.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


class DefaultMoeMLP(nn.Module):
    """Dense SwiGLU MLP: the MLP of the layers in `config.dense_layers`, and the shared expert (of its own `width`)."""

    def __init__(self, config: DefaultMoeConfig, width: int | None = None):
        super().__init__()
        width = config.dense_intermediate_size if width is None else width
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DefaultMoeTopKRouter(nn.Module):
    """Linear router: logits (in the input dtype), float32 softmax over *all* experts, top-K (DESIGN §2 steps 1-2)."""

    def __init__(self, config: DefaultMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states_TH: torch.Tensor):
        """Returns (router_logits_TE, probs_TE float32, top_k_weights_TK float32, top_k_index_TK)."""
        router_logits_TE = F.linear(hidden_states_TH, self.weight)
        probs_TE = F.softmax(router_logits_TE.float(), dim=-1)
        top_k_probs_TK, top_k_index_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        top_k_weights_TK = top_k_probs_TK
        if self.norm_topk_prob:
            top_k_weights_TK = top_k_probs_TK / top_k_probs_TK.sum(dim=-1, keepdim=True)
        return router_logits_TE, probs_TE, top_k_weights_TK, top_k_index_TK


_TORCH_BEFORE_2_11 = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 11)


def _grouped_mm_usable(experts) -> bool:
    """Whether torch's grouped GEMM runs on these experts' weights, forward and backward.

    torch checks each operand of `F.grouped_mm` (ATen GroupedMMUtils.h): of its last two dims one has stride 1 and
    the other a stride that is a multiple of 16 bytes; off CPU (and on CPU before torch 2.11) its data pointer must
    be 16-byte aligned too. The operands here are the tokens (N, H), the transposed weights, the gated activations
    (N, I) and their gradients, so H and I times the element size must be multiples of 16 bytes: multiples of 4
    elements in float32, of 8 in bfloat16 and float16. The other rules are transformers' `_can_use_grouped_mm`
    (integrations/moe.py): while compiling, bf16 only (torch's fake kernel is bf16-only); on CUDA, compute
    capability 8.0 or higher.
    """
    weights = (experts.gate_up_proj, experts.down_proj)
    hidden_size, intermediate_size = experts.down_proj.shape[-2:]
    row_bytes = experts.down_proj.element_size()
    if (hidden_size * row_bytes) % 16 or (intermediate_size * row_bytes) % 16:
        return False
    device = experts.down_proj.device
    if torch.compiler.is_compiling():  # data pointers are unknown while tracing
        return experts.down_proj.dtype == torch.bfloat16 and not (device.type == "cpu" and _TORCH_BEFORE_2_11)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return False
    if device.type != "cpu" or _TORCH_BEFORE_2_11:  # e.g. memory-mapped safetensors need not be aligned
        return all(weight.data_ptr() % 16 == 0 for weight in weights)
    return True


def _experts_forward(experts, hidden_states_TH, top_k_index_TK, top_k_weights_TK) -> torch.Tensor:
    """transformers' experts call, (T, H), (T, K), (T, K) -> (T, H) = sum_k w_k E_k(x), run by the function transformers
    registers as "grouped_mm" ("eager" is that too) or "batched_mm", looked up at call time, so a fix, a faster kernel
    or a patch under that name is what runs. Where torch's grouped GEMM cannot run (`_grouped_mm_usable`: any width
    works, whichever is selected), transformers' "batched_mm": one batched matmul per projection over each pair's own
    expert weights, any dtype, device or compiler, at N x 2I x H gathered weights."""
    batched = experts.config._experts_implementation == "batched_mm" or not _grouped_mm_usable(experts)
    experts_function = ALL_EXPERTS_FUNCTIONS["batched_mm" if batched else "grouped_mm"]
    return experts_function(experts, hidden_states_TH, top_k_index_TK, top_k_weights_TK)


# `experts_implementation=` / `set_experts_implementation` choose among transformers' registered experts functions as
# for its own MoEs; "grouped_mm" and "batched_mm" go through `_experts_forward`, which falls back from the first to the
# second where grouped GEMMs cannot run. Expert parallelism's routes to other ranks' experts are handled by those
# functions (`_is_expert_parallel`).
DEFAULT_MOE_EXPERTS_FUNCTIONS = ExpertsInterface()
for _name in ("grouped_mm", "batched_mm"):
    DEFAULT_MOE_EXPERTS_FUNCTIONS[_name] = _experts_forward


@use_experts_implementation(experts_interface=DEFAULT_MOE_EXPERTS_FUNCTIONS)
class DefaultMoeExperts(nn.Module):
    """E SwiGLU experts as fused 3-D weights: `gate_up_proj` (E, 2I, H), gate half first, and `down_proj` (E, H, I),
    no biases: the layout transformers' experts functions read (the decorator sets `has_gate=True`, `has_bias=False`,
    `is_transposed=False` and `_apply_gate`, act(gate) * up).

    `experts(hidden_states, top_k_index, top_k_weights)` is transformers' experts interface, the call serving engines
    replace with their fused kernels. Training gets each pair's unweighted output for the EMA through the same call
    (`DefaultMoeSparseMoeBlock._pair_outputs`).
    """

    def __init__(self, config: DefaultMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(config.num_experts, 2 * config.intermediate_size, config.hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, config.intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states_TH, top_k_index_TK, top_k_weights_TK) -> torch.Tensor:
        return _experts_forward(self, hidden_states_TH, top_k_index_TK, top_k_weights_TK)


class DefaultMoeDefaults(nn.Module):
    """Buffer-only module holding the EMA default vectors D (E, H), always float32.

    It is its own submodule so PEFT can keep it trainable-state via `modules_to_save=["default_outputs"]`.
    `_apply` keeps `ema` in float32 through `model.to(torch.bfloat16)` / `.half()` (device moves still apply).
    `non_finite_updates` counts expert updates skipped because the expert's outputs were not finite (read by
    `DefaultMoeCallback`, which warns; counting it needs no host sync in the forward).
    """

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.ema = nn.Buffer(torch.zeros(num_experts, hidden_size, dtype=torch.float32), persistent=True)
        self.non_finite_updates = nn.Buffer(torch.zeros((), dtype=torch.long), persistent=False)

    def _apply(self, fn, recurse=True):
        ema_fp32 = self.ema
        super()._apply(fn, recurse)
        if self.ema.dtype != torch.float32:
            self.ema = ema_fp32.to(device=self.ema.device)
        return self


class DefaultMoeSparseMoeBlock(nn.Module):
    """Top-K MoE with EMA default vectors for the unselected experts (DESIGN §2), and optionally Qwen2-MoE's gated
    shared expert, which every token goes through: it is always selected, so it has no default vector and stays
    out of the EMA statistics."""

    def __init__(self, config: DefaultMoeConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = DefaultMoeTopKRouter(config)
        self.experts = DefaultMoeExperts(config)
        self.default_outputs = DefaultMoeDefaults(config.num_experts, config.hidden_size)
        self.shared_expert = None
        if config.shared_expert_intermediate_size is not None:
            self.shared_expert = DefaultMoeMLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, return_router_losses=False):
        """(B, S, H) -> (B, S, H). `token_mask` (B*S,) bool excludes padding from the EMA and the router losses.

        With `return_router_losses=True` also returns a float32 tensor [load_balancing_loss, z_loss] for this layer.
        """
        batch_size, seq_len, hidden_size = hidden_states.shape
        config = self.config
        if self.training and config.router_jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(
                1.0 - config.router_jitter_noise, 1.0 + config.router_jitter_noise
            )
            hidden_states = hidden_states * noise
        x_TH = hidden_states.reshape(-1, hidden_size)
        router_logits_TE, probs_TE, top_k_weights_TK, top_k_index_TK = self.gate(x_TH)
        gradient_only = config.default_term == "gradient"

        if self.training:  # the EMA statistics need every pair's unweighted output
            expert_out_TKH = self._pair_outputs(x_TH, top_k_index_TK)
            # sum_k w_k E_k(x): the standard sparse top-K output.
            out_TH = torch.einsum("tkh,tk->th", expert_out_TKH.float(), top_k_weights_TK)
            defaults_EH, counts_E, ema_update = self._training_statistics(
                x_TH, probs_TE, top_k_index_TK, expert_out_TKH, token_mask
            )
            if ema_update is not None:
                self._commit_when_trained(ema_update, anchors=(probs_TE, expert_out_TKH))
        else:  # no EMA update; the counts only feed the router losses
            out_TH = self.experts(x_TH, top_k_index_TK, top_k_weights_TK).float()
            use_defaults = config.routing == "default" and (config.default_in_inference or gradient_only)
            defaults_EH = self.default_outputs.ema if use_defaults else None
            counts_E = self._routed_counts(top_k_index_TK, token_mask)[:, 0] if return_router_losses else None

        if defaults_EH is not None and (torch.is_grad_enabled() or not gradient_only):
            # sum_{i not in topK} p_i D_i (Eq. 7): raw probabilities with the selected experts zeroed, times D.
            # D is a constant: the gradient flows only to the router, dL/dp_i = <dL/dy, D_i>.
            unselected_probs_TE = probs_TE.scatter(1, top_k_index_TK, 0.0)
            default_TH = unselected_probs_TE @ defaults_EH
            if gradient_only:  # value exactly 0, gradient that of the default term: the forward stays top-K
                default_TH = default_TH - default_TH.detach()
            out_TH = out_TH + default_TH
        out_BSH = out_TH.to(hidden_states.dtype).view(batch_size, seq_len, hidden_size)
        if self.shared_expert is not None:  # + sigmoid(x . g) S(x), added to the routed (+ default) output
            shared_TH = F.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)
            out_BSH = out_BSH + shared_TH.view(batch_size, seq_len, hidden_size)
        if not return_router_losses:
            return out_BSH
        return out_BSH, self._router_losses(router_logits_TE, probs_TE, counts_E, token_mask)

    def _pair_outputs(self, x_TH: torch.Tensor, top_k_index_TK: torch.Tensor) -> torch.Tensor:
        """(T, H), (T, K) -> (T, K, H): every selected pair's unweighted expert output, from the standard experts call
        with each pair sent as its own top-1 route of unit weight. So whatever serves that call computes it too: the
        selected registered kernel, PEFT's wrapped weights, expert parallelism's token exchange."""
        num_tokens, top_k = top_k_index_TK.shape
        ones_N1 = torch.ones(num_tokens * top_k, 1, dtype=x_TH.dtype, device=x_TH.device)
        pairs_NH = self.experts(x_TH.repeat_interleave(top_k, dim=0), top_k_index_TK.reshape(-1, 1), ones_N1)
        return pairs_NH.view(num_tokens, top_k, -1)

    def _routed_counts(self, top_k_index_TK, token_mask) -> torch.Tensor:
        """(E, 1) number of non-padding (token, expert) pairs routed to each expert."""
        valid_N1 = torch.ones(top_k_index_TK.numel(), 1, device=top_k_index_TK.device)
        if token_mask is not None:  # padding counts for nothing
            valid_N1 = token_mask.view(-1, 1).expand_as(top_k_index_TK).reshape(-1, 1).float()
        return torch.zeros(self.num_experts, 1, device=valid_N1.device).index_add_(0, top_k_index_TK.view(-1), valid_N1)

    @torch.no_grad()
    def _training_statistics(self, x_TH, probs_TE, top_k_index_TK, expert_out_TKH, token_mask):
        """Per-expert routed-token counts and, with routing="default", this forward's EMA update (Eq. 10).

        m_i = sum_t s_ti E_i(x_t) / sum_t s_ti over the tokens routed to i (s = 1, or s = p_ti with
        default_ema_weighting="router_prob"; over the probed tokens *not* routed to i with
        default_ema_source="unrouted"), then D_i <- beta D_i + (1 - beta) m_i for experts that got tokens.
        Counts and sums are all-reduced across data-parallel ranks (one collective), so every rank keeps the same D.
        An expert whose sum is not finite (an overflowing expert) keeps its D this time: skipping it takes no host
        sync, where dropping single tokens would. Returns (the defaults this forward uses, or None for
        routing="topk"; the counts (E,); the update for `_commit_ema`, or None).
        """
        config = self.config
        counts_E1 = self._routed_counts(top_k_index_TK, token_mask)
        stats = [counts_E1]
        if config.routing == "default" and config.default_ema_source == "unrouted":
            expert_ids_N, out_NH, scores_N1 = self._unrouted_probe(x_TH, probs_TE, top_k_index_TK, token_mask)
            unweighted = False
        elif config.routing == "default":
            expert_ids_N = top_k_index_TK.reshape(-1)
            out_NH = expert_out_TKH.reshape(expert_ids_N.numel(), -1).float()  # no copy in float32
            scores_N1 = torch.ones_like(out_NH[:, :1])
            if token_mask is not None:
                scores_N1 = token_mask.view(-1, 1).expand_as(top_k_index_TK).reshape(-1, 1).float()
            if config.default_ema_weighting == "router_prob":
                scores_N1 = scores_N1 * probs_TE.gather(1, top_k_index_TK).reshape(-1, 1)
            unweighted = token_mask is None and config.default_ema_weighting == "mean"  # no multiply by ones
        if config.routing == "default":
            weighted_sums_EH = torch.zeros_like(self.default_outputs.ema).index_add_(
                0, expert_ids_N, out_NH if unweighted else out_NH * scores_N1
            )
            stats += [torch.zeros_like(counts_E1).index_add_(0, expert_ids_N, scores_N1), weighted_sums_EH]
        stats_E = torch.cat(stats, dim=1)
        if config.all_reduce_router_stats and _distributed_world_size() > 1:
            torch.distributed.all_reduce(stats_E)
        counts_E = stats_E[:, 0]
        if config.routing == "topk":
            return None, counts_E, None

        score_sums_E1, weighted_sums_EH = stats_E[:, 1:2], stats_E[:, 2:]
        routed_E1 = score_sums_E1 > 0
        finite_E1 = torch.isfinite(weighted_sums_EH).all(dim=-1, keepdim=True)
        batch_mean_EH = weighted_sums_EH / score_sums_E1.clamp_min(torch.finfo(torch.float32).tiny)
        ema_update = (routed_E1 & finite_E1, batch_mean_EH, routed_E1 & ~finite_E1)
        if config.default_ema_update == "after_use":
            # The graph keeps its own tensor: the update of the buffer in place must not touch what backward needs.
            return self.default_outputs.ema.clone(), counts_E, ema_update
        return self._ema_after(*ema_update[:2]), counts_E, ema_update

    def _unrouted_probe(self, x_TH, probs_TE, top_k_index_TK, token_mask):
        """The EMA statistics of default_ema_source="unrouted": every expert's output on one token in
        `default_probe_stride`, each (token, expert) pair scored 0 where the token picked the expert, else 1 (or the
        router probability). The probed tokens are evenly spaced from an offset that changes with the routing, so
        they cover every position over training, and a checkpointing recompute of this forward probes the same ones.
        Returns (expert ids (N,), outputs (N, H) float32, scores (N, 1)) over the N = probes x E pairs."""
        num_tokens, stride = x_TH.shape[0], self.config.default_probe_stride
        offset = top_k_index_TK.sum() % stride  # a tensor: no host sync
        probe_P = (torch.arange(max(1, num_tokens // stride), device=x_TH.device) * stride + offset) % num_tokens
        experts_PE = torch.arange(self.num_experts, device=x_TH.device).expand(probe_P.numel(), -1)
        out_NH = self._pair_outputs(x_TH[probe_P], experts_PE).reshape(experts_PE.numel(), -1).float()
        scores_PE = torch.ones_like(probs_TE[probe_P]).scatter_(1, top_k_index_TK[probe_P], 0.0)
        if self.config.default_ema_weighting == "router_prob":
            scores_PE = scores_PE * probs_TE[probe_P]
        if token_mask is not None:
            scores_PE = scores_PE * token_mask[probe_P].unsqueeze(-1)
        return experts_PE.reshape(-1), out_NH, scores_PE.reshape(-1, 1)

    def _ema_after(self, update_E1: torch.Tensor, batch_mean_EH: torch.Tensor) -> torch.Tensor:
        """D <- beta D + (1 - beta) m for the experts in `update_E1`, as a new tensor."""
        ema_EH, beta = self.default_outputs.ema, self.config.default_ema_beta
        return torch.where(update_E1, beta * ema_EH + (1.0 - beta) * batch_mean_EH, ema_EH)

    @torch.no_grad()
    def _commit_ema(self, update_E1, batch_mean_EH, non_finite_E1) -> None:
        self.default_outputs.ema.copy_(self._ema_after(update_E1, batch_mean_EH))
        self.default_outputs.non_finite_updates.add_(non_finite_E1.sum())

    def _commit_when_trained(self, ema_update: tuple, anchors: tuple[torch.Tensor, ...]) -> None:
        """Commit this forward's EMA update only if the forward trains (DESIGN §3).

        A training-mode forward under `no_grad` / `inference_mode` (a reference or rollout pass, the first pass of
        reentrant checkpointing) commits nothing. Otherwise the update is committed when the router probabilities or
        the expert outputs receive their gradient. Those gradients come out of nodes that read this block's saved
        tensors, so a non-reentrant checkpointing recompute has already run, on the D this forward saw; a reentrant
        one recomputes with gradients and commits then. So each trained forward commits exactly once, whatever the
        checkpointing, and no forward's state has to be stashed. A block in which nothing requires grad (frozen,
        with frozen inputs) and a compiled graph commit at once: neither can be recomputed by a checkpoint.
        """
        if not torch.is_grad_enabled():
            return
        anchors = [tensor for tensor in anchors if tensor.requires_grad]
        if anchors and not torch.compiler.is_compiling():
            torch.autograd.graph.register_multi_grad_hook(
                anchors, lambda grad: self._commit_ema(*ema_update), mode="any"
            )
        else:
            self._commit_ema(*ema_update)

    def _router_losses(self, router_logits_TE, probs_TE, counts_E, token_mask) -> torch.Tensor:
        """[Switch load-balancing loss, router z-loss] of this layer, over the non-padding tokens.

        balance = E * sum_i f_i P_i with f_i the share of routed (token, expert) pairs that went to expert i (from
        the all-reduced counts, so it is over the global batch in data parallel) and P_i the mean router
        probability; it is 1 for a perfectly balanced router. z = mean_t logsumexp(logits_t)^2.
        """
        weights_T = torch.ones(probs_TE.shape[0], device=probs_TE.device) if token_mask is None else token_mask.float()
        num_valid = weights_T.sum().clamp_min(1.0)
        fraction_E = counts_E / counts_E.sum().clamp_min(1.0)
        mean_probs_E = (probs_TE * weights_T.unsqueeze(-1)).sum(0) / num_valid
        balance = self.num_experts * (fraction_E * mean_probs_E).sum()
        z = (torch.logsumexp(router_logits_TE.float(), dim=-1).pow(2) * weights_T).sum() / num_valid
        return torch.stack([balance, z])


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class DefaultMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DefaultMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DefaultMoeAttention(config, layer_idx)
        self.is_moe = layer_idx not in config.dense_layers
        self.mlp = DefaultMoeSparseMoeBlock(config) if self.is_moe else DefaultMoeMLP(config)
        # The norms keep the names of the models each placement comes from, so checkpoints map one to one:
        # pre (Llama): input_layernorm before attention, post_attention_layernorm before the MLP;
        # post (OLMo-2): post_attention_layernorm after attention, post_feedforward_layernorm after the MLP.
        self.pre_norm = config.norm_placement == "pre"
        if self.pre_norm:
            self.input_layernorm = DefaultMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DefaultMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not self.pre_norm:
            self.post_feedforward_layernorm = DefaultMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (hidden_states, router_losses or None). The router losses are *returned* (not stashed on the
        module) so that reentrant activation checkpointing keeps their graph (DESIGN §3)."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states) if self.pre_norm else hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + (hidden_states if self.pre_norm else self.post_attention_layernorm(hidden_states))
        residual = hidden_states
        if self.pre_norm:
            hidden_states = self.post_attention_layernorm(hidden_states)
        router_losses = None
        # Router losses cost ~25% of a CPU decode step: no-grad inference skips them unless router outputs are wanted.
        if self.is_moe and (self.training or torch.is_grad_enabled() or kwargs.get("output_router_logits")):
            hidden_states, router_losses = self.mlp(hidden_states, token_mask=token_mask, return_router_losses=True)
        elif self.is_moe:
            hidden_states = self.mlp(hidden_states, token_mask=token_mask)
        else:
            hidden_states = self.mlp(hidden_states)
        if not self.pre_norm:
            hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + hidden_states, router_losses


class DefaultMoePreTrainedModel(PreTrainedModel):
    config: DefaultMoeConfig
    config_class = DefaultMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DefaultMoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _keep_in_fp32_modules_strict = ["default_outputs"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # tested: eval and training forwards, static-cache decoding (fullgraph=True)
    _can_record_outputs = {
        "router_logits": OutputRecorder(DefaultMoeTopKRouter, index=0),
        "hidden_states": OutputRecorder(DefaultMoeDecoderLayer, index=0),
        "attentions": OutputRecorder(DefaultMoeAttention, index=1),
    }

    @classmethod
    def from_pretrained(cls, *args, distributed_config=None, **kwargs):
        ep_size, fsdp_size = (getattr(distributed_config, name, None) or 1 for name in ("ep_size", "fsdp_size"))
        if ep_size > 1 and fsdp_size > 1 and _TRANSFORMERS_VERSION < (5, 23):
            raise ValueError(
                f"Expert parallelism with fsdp_size > 1 needs transformers >= 5.23 (this is {transformers.__version__},"
                " whose FSDP halves the expert gradients): upgrade, or keep ep_size == tp_size without fsdp_size."
            )
        return super().from_pretrained(*args, distributed_config=distributed_config, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DefaultMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DefaultMoeTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DefaultMoeDefaults):
            init.zeros_(module.ema)  # skipped when the checkpoint provides it; never uninitialised memory
            init.zeros_(module.non_finite_updates)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "peft_config":  # PEFT sets it once it has wrapped this model (get_peft_model, from_pretrained)
            self._warn_if_peft_drops_defaults()

    def _warn_if_peft_drops_defaults(self) -> None:
        """Warn when a PEFT adapter keeps no copy of the EMA defaults (`default_outputs` not in `modules_to_save`)."""
        blocks = [module for module in self.modules() if isinstance(module, DefaultMoeSparseMoeBlock)]
        if self.config.routing == "default" and any(isinstance(b.default_outputs, DefaultMoeDefaults) for b in blocks):
            warnings.warn(
                "This PEFT adapter keeps no copy of the Default MoE EMA defaults (`default_outputs` is not in "
                "`modules_to_save`): training forwards update them in the frozen base model, so disabling the adapter "
                "no longer gives the base model back, and the adapter does not save them, so a reloaded adapter runs "
                "with other defaults than the trained one. Build the LoRA config with "
                "`default_moe.peft.lora_config(...)`, which keeps them (and also adapts the router and the experts, "
                "which `target_modules` such as 'all-linear' cannot reach), or add 'default_outputs' to "
                "`modules_to_save`.",
                UserWarning,
                stacklevel=3,
            )


class DefaultMoeModel(DefaultMoePreTrainedModel):
    def __init__(self, config: DefaultMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DefaultMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DefaultMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        rope_kinds = [kind for kind in dict.fromkeys(config.layer_types) if kind in (config.rope_parameters or {})]
        if rope_kinds:  # one RoPE per attention kind (OLMo-3)
            self.rotary_emb = nn.ModuleDict({kind: DefaultMoeRotaryEmbedding(config, kind) for kind in rope_kinds})
        else:
            self.rotary_emb = DefaultMoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> "DefaultMoeModelOutputWithPast":
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = _one_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # One mask per attention kind in use (`config.layer_types`), shared by every layer of that kind; generate()
        # with a static cache passes them ready-made, as such a dict.
        mask_functions = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks = attention_mask
        if not isinstance(masks, dict):
            masks = {
                kind: mask_functions[kind](
                    config=self.config,
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    **{_MASK_CACHE_NAME: cache},
                )
                for kind in dict.fromkeys(self.config.layer_types)
            }
        # Padding tokens (2-D attention mask, last S columns) stay out of the EMA and the router losses.
        token_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1] :].reshape(-1).bool()

        hidden_states = inputs_embeds
        if isinstance(self.rotary_emb, nn.ModuleDict):
            position_embeddings = {kind: rope(hidden_states, position_ids) for kind, rope in self.rotary_emb.items()}
        else:
            position_embeddings = dict.fromkeys(masks, self.rotary_emb(hidden_states, position_ids=position_ids))
        layer_losses = []
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            kind = self.config.layer_types[i]
            hidden_states, router_losses = decoder_layer(
                hidden_states,
                attention_mask=masks[kind],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings[kind],
                token_mask=token_mask,
                **kwargs,
            )
            if router_losses is not None:
                layer_losses.append(router_losses)
        hidden_states = self.norm(hidden_states)
        # Mean over MoE layers of [load balancing, z-loss].
        router_losses = torch.stack(layer_losses).mean(0) if layer_losses else None
        return DefaultMoeModelOutputWithPast(
            last_hidden_state=hidden_states, router_losses=router_losses, **{CACHE_NAME: cache}
        )


@dataclass
class DefaultMoeModelOutputWithPast(MoeModelOutputWithPast):
    router_losses: torch.Tensor | None = None


@dataclass
class DefaultMoeCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Fields in the order loss, logits, cache, hidden_states, attentions, aux_loss, router_logits, lm_loss, z_loss
    (the causal-LM order first, so `outputs[0]` is the logits whenever no labels are given, also as a tuple).

    `loss` = lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss (the router terms in training
    only, weighted by this micro-batch's share of `num_items_in_batch` when Trainer passes it); `aux_loss` and
    `z_loss` are the unscaled means over MoE layers (None in no-grad inference without `output_router_logits`).
    With `num_items_in_batch`, `lm_loss` is this micro-batch's summed token loss divided by that global count (as
    transformers' causal-LM loss computes it), not a mean."""

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class DefaultMoeForCausalLM(DefaultMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: DefaultMoeConfig):
        super().__init__(config)
        self.model = DefaultMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.add_model_tags(["default-moe", "moe"])  # tags for push_to_hub's generated card

    @staticmethod
    def add_backbone_to_auto_map(config: DefaultMoeConfig) -> None:
        """`save_pretrained` writes `auto_map` entries for the config and the saved class only; the backbone lives
        in the same copied file, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` can load it too."""
        config.auto_map = {
            "AutoModel": "modeling_default_moe.DefaultMoeModel",
            **(getattr(config, "auto_map", None) or {}),
        }

    def save_pretrained(self, *args, **kwargs):
        if getattr(type(self), "_auto_class", None) is not None:  # registered for remote code
            self.add_backbone_to_auto_map(self.config)
        return super().save_pretrained(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DefaultMoeCausalLMOutputWithPast:
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: DefaultMoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        aux_loss = z_loss = None
        if outputs.router_losses is not None:
            aux_loss, z_loss = outputs.router_losses.unbind()
        lm_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            loss = lm_loss
            if self.training and aux_loss is not None:
                router_loss = self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
                loss = lm_loss + router_loss.to(lm_loss.dtype) * self._router_loss_share(labels, kwargs)

        return DefaultMoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
            lm_loss=lm_loss,
            z_loss=z_loss,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    @staticmethod
    def _router_loss_share(labels: torch.Tensor, kwargs: dict) -> torch.Tensor | float:
        """Weight of this micro-batch's router losses so that they add up like the LM loss under Trainer.

        When Trainer passes `num_items_in_batch` (label tokens over all accumulation steps, and over all ranks with
        `average_tokens_across_devices`), the LM loss is a sum over this micro-batch divided by that count, Trainer
        stops dividing by the accumulation steps and scales by the world size, and DDP averages. Weighting the router
        losses by (this micro-batch's label tokens) / num_items_in_batch makes them add up to their token-weighted
        mean over the global batch in exactly the same way (transformers issue #48690).
        """
        num_items_in_batch = kwargs.get("num_items_in_batch")
        if num_items_in_batch is None:
            return 1.0
        num_items = labels[..., 1:].ne(-100).sum()
        return num_items / torch.as_tensor(num_items_in_batch, device=num_items.device)


__all__ = ["DefaultMoeForCausalLM", "DefaultMoeModel", "DefaultMoePreTrainedModel"]
