"""TRL's `SFTTrainer` and `DPOTrainer` with Default MoE's own router losses (docs/trl.md).

TRL computes these trainers' losses itself: its fused LM head (`trl.trainer.utils.add_fused_lm_head`) calls the
backbone, `DefaultMoeModel`, directly, so `DefaultMoeForCausalLM`'s loss never runs, and for a model whose config has
`output_router_logits` it adds `router_aux_loss_coef` times transformers' Mixtral load-balancing loss of the router
logits: all layers pooled (K times ours for a balanced router), no z-loss, counts from the local batch only.
`SFTTrainer` also writes `output_router_logits=True` into the model config, which `save_pretrained` then keeps.

The two classes here are those trainers with three changes, and nothing else:

- TRL's own router term is off, and `output_router_logits` keeps the value it had before the trainer was built.
- The router losses of each training forward, which the backbone returns (`router_losses`: the per-layer
  load-balancing and z-losses averaged over MoE layers, with global-batch counts), are added to the loss as
  `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`. `router_aux_loss_coef` is TRL's: the trainer
  argument when given, else the model config's. They are logged as `aux_loss` and `z_loss`.
- They are weighted like the loss they join. SFT: by the micro-batch's share of `num_items_in_batch`, exactly as
  `DefaultMoeForCausalLM` weights them under `transformers.Trainer` (so an SFT step has the gradient of the same step
  with `Trainer`). DPO: by 1 per micro-batch, like DPO's per-sequence mean (which has no token counts).

Forwards without gradients (evaluation, DPO's reference pass) add nothing, as in `DefaultMoeForCausalLM` in eval.
"""

from __future__ import annotations

import torch
import trl


class _DefaultMoeRouterLosses:
    """Mixin for a TRL trainer whose loss comes from TRL's fused LM head (see the module docstring)."""

    def __init__(self, model, *args, **kwargs):
        if not isinstance(model, str):
            self._check_default_moe(model)
            output_router_logits = model.config.output_router_logits
        super().__init__(model, *args, **kwargs)
        causal_lm = self._default_moe_causal_lm()
        if isinstance(model, str):  # TRL loaded the model: the value its checkpoint has
            self._check_default_moe(causal_lm)
            revision = (self.args.model_init_kwargs or {}).get("revision")
            output_router_logits = type(causal_lm.config).from_pretrained(model, revision=revision).output_router_logits
        causal_lm.config.output_router_logits = output_router_logits  # which SFTTrainer has set to True
        self.aux_loss_enabled = False  # TRL's own router term: transformers' Mixtral loss of the router logits

    def _check_default_moe(self, model) -> None:
        if getattr(model.config, "model_type", None) != "default_moe":
            raise ValueError(f"{type(self).__name__} expects a Default MoE model, got {type(model).__name__}")

    def _default_moe_causal_lm(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        causal_lm = self._default_moe_causal_lm()
        trained = []  # router losses of the forwards that train (not DPO's no-grad reference pass)

        def keep_router_losses(module, args, output):
            if torch.is_grad_enabled() and module.training and output.router_losses is not None:
                trained.append(output.router_losses)

        hook = causal_lm.base_model.register_forward_hook(keep_router_losses)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        if not trained:
            return result
        loss, outputs = result if return_outputs else (result, None)
        aux_loss, z_loss = torch.stack(trained).sum(0).unbind()
        router_loss = self.router_aux_loss_coef * aux_loss + causal_lm.config.router_z_loss_coef * z_loss
        loss = loss + router_loss.to(loss.dtype) * self._router_loss_weight(causal_lm, inputs, num_items_in_batch)
        metrics = self._metrics["train"]
        for name, value in (("aux_loss", aux_loss), ("z_loss", z_loss)):
            metrics[name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss


class SFTTrainer(_DefaultMoeRouterLosses, trl.SFTTrainer):
    """`trl.SFTTrainer` whose router losses are Default MoE's, weighted as under `transformers.Trainer`."""

    def _router_loss_weight(self, causal_lm, inputs, num_items_in_batch):
        # The SFT loss is a token sum over num_items_in_batch, scaled by the world size like Trainer's.
        share = causal_lm._router_loss_share(inputs["labels"], {"num_items_in_batch": num_items_in_batch})
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            share = share * (self.accelerator.num_processes // self.get_tp_size())
        return share


class DPOTrainer(_DefaultMoeRouterLosses, trl.DPOTrainer):
    """`trl.DPOTrainer` whose router losses are Default MoE's, weighted 1 per micro-batch like the DPO loss."""

    def _router_loss_weight(self, causal_lm, inputs, num_items_in_batch):
        return 1.0


__all__ = ["DPOTrainer", "SFTTrainer"]
