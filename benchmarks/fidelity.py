"""Router-gradient fidelity (the paper's Figure 4): cosine similarity, per MoE layer, between the router gradient a
layer receives and the "true" dense straight-through router gradient (DESIGN §2), for routing="topk" and "default".

For each K: train a small Default MoE on the built-in corpus (bytes of the standard library's source files) so the
EMA defaults are meaningful, then, on held-out batches and with identical weights, take the router-weight gradient
of the LM loss (eval mode: no router losses, no EMA update, no dropout) under three forwards:
  topk     - defaults off (the standard sparse layer; the router sees only its K selected experts)
  default  - the EMA defaults for the unselected experts
  dense_st - every expert computed, y = sum_{i in A} w_i E_i + sum_{i not in A} p_i E_i(x) for the router gradient
and report cos(grad_variant, grad_dense_st) per layer, averaged over the batches.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.nn import functional as F

from default_moe.modeling_default_moe import DefaultMoeSparseMoeBlock

from .common import (
    build_ours,
    byte_corpus,
    dense_expert_outputs,
    our_config,
    sample_batches,
)


def settings(quick: bool) -> dict:
    if quick:
        return dict(hidden=32, inter=32, layers=2, experts=8, ks=[1, 2], batch=2, seq=32, train_steps=3, eval_batches=1)
    return dict(
        hidden=128,
        inter=256,
        layers=4,
        experts=8,
        ks=[1, 2, 4],
        batch=8,
        seq=256,
        train_steps=200,
        eval_batches=4,
        lr=2e-3,
    )


def _log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _router_grads(model, batch: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    return [layer.mlp.gate.weight.grad.flatten().clone() for layer in model.model.layers if layer.is_moe]


def estimator_forward(self, hidden_states, token_mask=None, return_router_losses=False):
    """The model's own eval forward value, y = sum_A w_i E_i(x) + sum_{not A} p_i D_i (no default term in the value
    with default_term="gradient"), with the router gradient of the estimator in `self.estimator`: "default" (through
    p_i D_i), "topk" (selected experts only: the default term is detached) or "dense" (through p_i E_i(x) for every
    unselected expert, computed densely, straight-through)."""
    batch_size, seq_len, hidden_size = hidden_states.shape
    x_TH = hidden_states.reshape(-1, hidden_size)
    _, probs_TE, top_k_weights_TK, top_k_index_TK = self.gate(x_TH)
    out_TH = torch.einsum("tkh,tk->th", self.experts(x_TH, top_k_index_TK).float(), top_k_weights_TK)
    unselected_probs_TE = probs_TE.scatter(1, top_k_index_TK, 0.0)
    default_TH = unselected_probs_TE @ self.default_outputs.ema
    if self.config.default_term == "gradient":  # the model's forward value has no default term
        default_TH = default_TH - default_TH.detach()
    out_TH = out_TH + (default_TH if self.estimator == "default" else default_TH.detach())
    if self.estimator == "dense":
        all_out_TEH = dense_expert_outputs(self.experts, x_TH).detach().float()
        rest_TH = torch.einsum("teh,te->th", all_out_TEH, unselected_probs_TE)
        out_TH = out_TH + (rest_TH - rest_TH.detach())
    if self.shared_expert is not None:  # always selected: no estimator question, the same as the model's forward
        out_TH = out_TH + F.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)
    out_BSH = out_TH.to(hidden_states.dtype).view(batch_size, seq_len, hidden_size)
    return (out_BSH, torch.zeros(2, device=x_TH.device)) if return_router_losses else out_BSH


class EstimatorBlock(DefaultMoeSparseMoeBlock):
    estimator = "default"
    forward = estimator_forward


def _set_variant(model, variant: str | None) -> None:
    """Switch every MoE block to the given router-gradient estimator, or back to the plain block (None)."""
    for layer in model.model.layers:
        if layer.is_moe:
            layer.mlp.__class__ = DefaultMoeSparseMoeBlock if variant is None else EstimatorBlock
            layer.mlp.estimator = variant


def run(quick: bool = False, log=_log) -> dict:
    s = settings(quick)
    train = byte_corpus(20_000 if quick else 3_000_000, "train")
    valid = byte_corpus(20_000 if quick else 400_000, "validation")
    out = {"settings": s, "by_k": {}}
    for k in s["ks"]:
        config = our_config(
            hidden=s["hidden"],
            inter=s["inter"],
            layers=s["layers"],
            experts=s["experts"],
            top_k=k,
            vocab=256,
            heads=4,
            norm_topk_prob=False,
            routing="default",
            max_pos=s["seq"],
        )
        model = build_ours(config, seed=k)
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.get("lr", 1e-3), weight_decay=0.0)
        model.train()
        losses = []
        for batch in sample_batches(train, s["batch"], s["seq"], s["train_steps"], seed=100 + k):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
        cos = {"topk": [], "default": []}
        for batch in sample_batches(valid, s["batch"], s["seq"], s["eval_batches"], seed=7):
            grads = {}
            for variant in ("dense", "topk", "default"):
                _set_variant(model, variant)
                grads[variant] = _router_grads(model, batch)
            for variant in ("topk", "default"):
                cos[variant].append(
                    [float(F.cosine_similarity(g, d, dim=0)) for g, d in zip(grads[variant], grads["dense"])]
                )
        _set_variant(model, None)
        res = {"final_train_loss": sum(losses[-10:]) / len(losses[-10:])}
        for variant, rows in cos.items():
            per_layer = torch.tensor(rows)  # (batches, layers)
            res[variant] = {
                "mean_per_layer": per_layer.mean(0).tolist(),
                "min_per_layer": per_layer.min(0).values.tolist(),
            }
        out["by_k"][str(k)] = res
        log(
            f"K={k}: cos topk {[round(c, 3) for c in res['topk']['mean_per_layer']]}, "
            f"default {[round(c, 3) for c in res['default']['mean_per_layer']]}"
        )
    return out
