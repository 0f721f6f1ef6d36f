"""Prototype of ema_fast_path.diff as a benchmark-local subclass, so the benchmarks can time the fix side by side.

`installed()` tells whether the installed modeling file already has the fast path (then this variant is skipped).
"""

import inspect

import torch

from default_moe import modeling_default_moe
from default_moe.modeling_default_moe import DefaultMoeSparseMoeBlock, _distributed_world_size, logger


@torch.no_grad()
def _defaults_and_counts(self, probs_TE, top_k_index_TK, expert_out_TKH, token_mask):
    config = self.config
    num_tokens, top_k = top_k_index_TK.shape
    expert_ids_N = top_k_index_TK.reshape(-1)
    valid_N = None if token_mask is None else token_mask.view(num_tokens, 1).expand(num_tokens, top_k).reshape(-1)
    update_ema = self.training and config.routing == "default"

    stats = [torch.zeros(self.num_experts, 1, device=probs_TE.device)]  # [:, 0] routed-token counts
    if update_ema:
        scores_N = None  # per-pair EMA weight; None means all ones
        if config.default_ema_weighting == "router_prob":
            scores_N = probs_TE.gather(1, top_k_index_TK).reshape(-1)
        if valid_N is not None:
            scores_N = valid_N.float() if scores_N is None else scores_N * valid_N
        out_NH = expert_out_TKH.reshape(num_tokens * top_k, -1).float()  # no copy in fp32
        rows_NH = out_NH if scores_N is None else out_NH * scores_N.unsqueeze(-1)
        weighted_sums_EH = torch.zeros_like(self.default_outputs.ema).index_add_(0, expert_ids_N, rows_NH)
        if scores_N is None:
            scores_N = torch.ones(num_tokens * top_k, device=probs_TE.device)
        # Fast path: one pass over the (token, expert) outputs. Only if a sum came out non-finite, redo it
        # leaving out the non-finite pairs (same result as filtering them up front).
        if not bool(torch.isfinite(weighted_sums_EH).all()):
            finite_N = torch.isfinite(out_NH).all(dim=-1)
            if not bool(finite_N.all()) and not DefaultMoeSparseMoeBlock._warned_non_finite:
                DefaultMoeSparseMoeBlock._warned_non_finite = True
                logger.warning("Non-finite expert outputs were left out of the Default MoE EMA update.")
            scores_N = scores_N * finite_N
            rows_NH = torch.where(finite_N.unsqueeze(-1), out_NH, 0.0) * scores_N.unsqueeze(-1)
            weighted_sums_EH = torch.zeros_like(self.default_outputs.ema).index_add_(0, expert_ids_N, rows_NH)
        score_sums_E1 = torch.zeros(self.num_experts, 1, device=probs_TE.device).index_add_(
            0, expert_ids_N, scores_N.view(-1, 1)
        )
        stats += [score_sums_E1, weighted_sums_EH]
    if valid_N is None:
        stats[0].index_add_(0, expert_ids_N, torch.ones(expert_ids_N.numel(), 1, device=probs_TE.device))
    else:
        stats[0].index_add_(0, expert_ids_N, valid_N.view(-1, 1).float())
    stats_E = torch.cat(stats, dim=1)
    if self.training and config.all_reduce_router_stats and _distributed_world_size() > 1:
        torch.distributed.all_reduce(stats_E)
    counts_E = stats_E[:, 0]

    if config.routing == "topk" or not (self.training or config.default_in_inference):
        return None, counts_E
    ema_EH = self.default_outputs.ema
    if not update_ema:
        return ema_EH, counts_E
    score_sums_E, weighted_sums_EH = stats_E[:, 1], stats_E[:, 2:]
    has_tokens_E1 = (score_sums_E > 0).unsqueeze(-1)
    batch_mean_EH = weighted_sums_EH / score_sums_E.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    beta = config.default_ema_beta
    new_ema_EH = torch.where(has_tokens_E1, beta * ema_EH + (1.0 - beta) * batch_mean_EH, ema_EH)
    used_EH = new_ema_EH if config.default_ema_update == "before_use" else ema_EH.clone()
    ema_EH.copy_(new_ema_EH)
    return used_EH, counts_E


class FastEmaBlock(DefaultMoeSparseMoeBlock):
    _defaults_and_counts = _defaults_and_counts


def installed() -> bool:
    return "isfinite(weighted_sums_EH)" in inspect.getsource(modeling_default_moe.DefaultMoeSparseMoeBlock)


def apply(model):
    """Switch (in place) every MoE block of `model` to the fast-path EMA update."""
    for layer in model.model.layers:
        if type(layer.mlp) is DefaultMoeSparseMoeBlock:
            layer.mlp.__class__ = FastEmaBlock
    return model
