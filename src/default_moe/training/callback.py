"""`DefaultMoeCallback`: watch the routers of a Default MoE model while `transformers.Trainer` trains it.

Add it to any Trainer: `Trainer(..., callbacks=[DefaultMoeCallback()])`. At every logging step it adds to the logs

    moe/lm_loss, moe/aux_loss, moe/z_loss           token-weighted means over the training forwards (all ranks)
                                                    since the last log; aux and z are the unscaled layer means
    moe/layer{L}/load_min, load_max                 smallest/largest expert share x num_experts (1.0 = balanced)
    moe/layer{L}/expert{E}                          each expert's share of the routed (token, expert) pairs
    moe/layer{L}/router_entropy                     mean entropy (nats) of the router's softmax over all experts
    moe/layer{L}/ema_norm                           mean L2 norm of the layer's EMA default vectors
    moe/layer{L}/shared_gate                        mean sigmoid gate of the layer's shared expert (Qwen2-MoE style;
                                                    only for layers that have one)

(per-expert shares only when the model has at most `max_logged_experts` experts). `L` is the layer's index in the
model, so dense layers (`dense_layers`, anywhere in the stack) simply have no entries. At the end of training it writes
`moe_loss_curves.png` and `moe_expert_load.png` (layers x experts heatmap of the load over the whole run) to the
output folder, and it warns (once per expert) when an expert's share stays below `collapse_threshold` times the
uniform share for `collapse_patience` logging windows in a row: the router has collapsed onto fewer experts. It also
warns, once, when a layer's `default_outputs.non_finite_updates` counter has grown: an expert's outputs were not
finite, so its default skipped that update (the model counts this on the device, without a host sync).

How it measures: forward hooks on each MoE layer's router (which returns `(logits, probs, weights, index)`) and on
the model (whose output carries `lm_loss`, `aux_loss`, `z_loss`). The hooks add to a few tensors with whole-tensor
operations (a `bincount` and a sum per layer, no Python loop over experts), only for training-mode forwards and not
for the forwards that activation checkpointing re-runs during backward. Under DDP/FSDP the statistics are summed
over ranks at logging time (one `all_reduce`), so every rank logs and decides the same.

To let reporting integrations (TensorBoard, W&B, ...) see the values, the callback has to run before them: use
`DefaultMoeCallback().install(trainer)` rather than `callbacks=[...]`. The values always go to
`trainer.state.log_history`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

logger = logging.getLogger(__name__)


def _in_backward_recompute() -> bool:
    return torch._C._current_graph_task_id() != -1


def moe_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, MoE block) for every Default MoE block in `model` (wrapped or not), in layer order."""
    blocks = []
    for name, module in model.named_modules():
        if hasattr(module, "gate") and hasattr(module, "default_outputs") and hasattr(module, "experts"):
            parts = name.split(".")
            layer = next((int(p) for p in reversed(parts) if p.isdigit()), len(blocks))
            blocks.append((layer, module))
    return blocks


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes when `torch.distributed` is initialised (else as is), on the CPU."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(tensor)
    return tensor.cpu()


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module | None:
    for module in model.modules():
        if type(module).__name__.endswith("ForCausalLM") and hasattr(module, "config"):
            return module
    return None


class DefaultMoeCallback(TrainerCallback):
    """Logs Default MoE router statistics and losses, plots them at the end, warns on router collapse.

    Args:
        output_dir: where the PNGs go (default: the Trainer's `output_dir`); `plots=False` writes none.
        collapse_threshold: an expert is starved in a window when its share < collapse_threshold / num_experts.
        collapse_patience: number of consecutive starved logging windows before the warning.
        max_logged_experts: log per-expert shares only up to this many experts per layer (min/max always).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        plots: bool = True,
        collapse_threshold: float = 0.1,
        collapse_patience: int = 3,
        max_logged_experts: int = 16,
    ):
        if not 0 < collapse_threshold < 1:
            raise ValueError(f"collapse_threshold={collapse_threshold} must be in (0, 1)")
        if collapse_patience < 1:
            raise ValueError(f"collapse_patience={collapse_patience} must be at least 1")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.plots = plots
        self.collapse_threshold = collapse_threshold
        self.collapse_patience = collapse_patience
        self.max_logged_experts = max_logged_experts
        self.history: list[dict] = []  # one entry per logging window: step, losses, shares (L, E)
        self.collapse_warnings: list[tuple[int, int, int]] = []  # (step, layer, expert) when each warning fired
        self.plot_files: list[Path] = []
        self._handles = []
        self._layers: list[int] = []
        self._blocks: list[torch.nn.Module] = []
        self._pending: dict | None = None  # the closed window waiting for the next on_log

    # ------------------------------------------------------------------------------------------------ set-up
    def install(self, trainer) -> DefaultMoeCallback:
        """Add this callback to `trainer` right after its flow callback, so reporting integrations see the values."""
        callbacks = trainer.callback_handler.callbacks
        position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(position, self)
        return self

    def _attach(self, model: torch.nn.Module) -> None:
        self._detach()
        found = moe_blocks(model)
        if not found:
            raise ValueError("DefaultMoeCallback: the model has no Default MoE layers to monitor")
        self._layers = [layer for layer, _ in found]
        self._blocks = [block for _, block in found]
        num_experts = {block.gate.weight.shape[0] for block in self._blocks}
        if len(num_experts) != 1:
            raise ValueError(f"DefaultMoeCallback: MoE layers disagree on the number of experts: {num_experts}")
        self.num_experts = num_experts.pop()
        device = self._blocks[0].gate.weight.device
        num_layers = len(self._blocks)
        self._counts = torch.zeros(num_layers, self.num_experts, device=device, dtype=torch.float64)
        self._entropy = torch.zeros(num_layers, device=device, dtype=torch.float64)  # sum over tokens
        self._tokens = torch.zeros(num_layers, device=device, dtype=torch.float64)
        self._shared_gate = torch.zeros(num_layers, device=device, dtype=torch.float64)  # sum over tokens
        self._has_shared = [getattr(block, "shared_expert", None) is not None for block in self._blocks]
        self._losses = torch.zeros(4, device=device, dtype=torch.float64)  # token-weighted lm, aux, z sums; tokens
        self._run_counts = torch.zeros(num_layers, self.num_experts, dtype=torch.float64)
        self._starved_windows = torch.zeros(num_layers, self.num_experts, dtype=torch.long)
        self._warned = torch.zeros(num_layers, self.num_experts, dtype=torch.bool)
        self.warned_non_finite = False

        for index, block in enumerate(self._blocks):
            self._handles.append(block.gate.register_forward_hook(self._router_hook(index)))
            if self._has_shared[index]:
                self._handles.append(block.shared_expert_gate.register_forward_hook(self._shared_gate_hook(index)))
        lm = _causal_lm(model)
        if lm is not None:
            self._handles.append(lm.register_forward_hook(self._loss_hook, with_kwargs=True))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _router_hook(self, index: int):
        def hook(module, inputs, output):
            if not module.training or _in_backward_recompute():
                return
            with torch.no_grad():
                probs_TE, top_k_index_TK = output[1], output[3]
                self._counts[index] += torch.bincount(top_k_index_TK.reshape(-1), minlength=self.num_experts).to(
                    self._counts
                )
                entropy_T = -(probs_TE * probs_TE.clamp_min(torch.finfo(probs_TE.dtype).tiny).log()).sum(-1)
                self._entropy[index] += entropy_T.sum().double()
                self._tokens[index] += probs_TE.shape[0]

        return hook

    def _shared_gate_hook(self, index: int):
        def hook(module, inputs, output):
            if not module.training or _in_backward_recompute():
                return
            with torch.no_grad():
                self._shared_gate[index] += torch.sigmoid(output.float()).sum().double()

        return hook

    def _loss_hook(self, module, args, kwargs, output):
        if not module.training or _in_backward_recompute():
            return
        lm_loss = getattr(output, "lm_loss", None)
        if lm_loss is None:  # no labels: nothing to log
            return
        with torch.no_grad():
            # Weight each forward by its label tokens. Under Trainer's `num_items_in_batch` (the label tokens of the
            # whole optimizer step, over accumulation steps and ranks), the model's LM loss is this micro-batch's
            # token sum divided by that count; turn it back into the micro-batch's mean first.
            labels = kwargs.get("labels")
            tokens = (
                labels[..., 1:].ne(-100).sum().double()
                if labels is not None
                else lm_loss.new_ones((), dtype=torch.float64)
            )
            lm_mean = lm_loss.detach().double()
            num_items_in_batch = kwargs.get("num_items_in_batch")
            if num_items_in_batch is not None and labels is not None:
                lm_mean = (
                    lm_mean * torch.as_tensor(num_items_in_batch, device=lm_mean.device).double() / tokens.clamp_min(1)
                )
            self._losses[0] += lm_mean * tokens
            for slot, name in ((1, "aux_loss"), (2, "z_loss")):
                value = getattr(output, name, None)
                if value is not None:
                    self._losses[slot] += value.detach().double() * tokens
            self._losses[3] += tokens

    # ---------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("DefaultMoeCallback needs the Trainer to pass the model to its callbacks")
        self._attach(model)
        if self.output_dir is None:
            self.output_dir = Path(args.output_dir)

    def on_step_end(self, args, state, control, **kwargs):
        # The window is closed (and summed over ranks) here rather than in on_log: every rank reaches the logging
        # steps together, whereas user code may call `trainer.log` on one rank only. The flow callback, which runs
        # before this one, has already decided whether this step logs.
        if self._blocks and control.should_log:
            self._close_window(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._blocks and control.should_log:  # logging_strategy="epoch"
            self._close_window(state)

    def _close_window(self, state) -> None:
        window = self._collect()
        if window is not None:
            window["step"] = state.global_step
            self._pending = window

    def on_log(self, args, state, control, logs=None, **kwargs):
        window, self._pending = self._pending, None
        if window is None or logs is None:
            return
        self.history.append(window)
        values = self._log_values(window)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        self._check_collapse(window, state)
        self._check_non_finite(state)

    def on_train_end(self, args, state, control, **kwargs):
        # Steps after the last logging step still count for the load heatmap (and the curves' last point).
        if self._blocks:
            window = self._collect()
            if window is not None:
                window["step"] = state.global_step
                self.history.append(window)
        self._detach()
        if self.plots and state.is_world_process_zero and self.history:
            self.plot_files = self.write_plots(self.output_dir)

    # ----------------------------------------------------------------------------------------------- logic
    def _collect(self) -> dict | None:
        """The statistics of the window since the last log, summed over ranks; None if no training forward ran."""
        tensors = (self._losses, self._counts, self._entropy, self._tokens, self._shared_gate)
        flat = sum_over_ranks(torch.cat([tensor.flatten() for tensor in tensors]))
        for tensor in tensors:
            tensor.zero_()
        losses, rest = flat[:4], flat[4:]
        num_layers = len(self._blocks)
        counts = rest[: num_layers * self.num_experts].view(num_layers, self.num_experts)
        entropy, tokens, shared_gate = rest[num_layers * self.num_experts :].split(num_layers)
        if tokens.sum() == 0:
            return None
        self._run_counts += counts
        weight = max(losses[3].item(), 1.0)
        window = {
            "shares": (counts / counts.sum(-1, keepdim=True).clamp_min(1.0)).tolist(),
            "entropy": (entropy / tokens.clamp_min(1.0)).tolist(),
            "ema_norm": [block.default_outputs.ema.float().norm(dim=-1).mean().item() for block in self._blocks],
            "shared_gate": [
                (gate / count).item() if has else None
                for gate, count, has in zip(shared_gate, tokens.clamp_min(1.0), self._has_shared, strict=True)
            ],
        }
        if losses[3] > 0:
            window.update(
                lm_loss=losses[0].item() / weight,
                aux_loss=losses[1].item() / weight,
                z_loss=losses[2].item() / weight,
            )
        return window

    def _log_values(self, window: dict) -> dict[str, float]:
        values = {f"moe/{name}": window[name] for name in ("lm_loss", "aux_loss", "z_loss") if name in window}
        for layer, shares, entropy, ema_norm, shared_gate in zip(
            self._layers, window["shares"], window["entropy"], window["ema_norm"], window["shared_gate"], strict=True
        ):
            prefix = f"moe/layer{layer}"
            if shared_gate is not None:
                values[f"{prefix}/shared_gate"] = shared_gate
            values[f"{prefix}/load_min"] = min(shares) * self.num_experts
            values[f"{prefix}/load_max"] = max(shares) * self.num_experts
            values[f"{prefix}/router_entropy"] = entropy
            values[f"{prefix}/ema_norm"] = ema_norm
            if self.num_experts <= self.max_logged_experts:
                for expert, share in enumerate(shares):
                    values[f"{prefix}/expert{expert}"] = share
        return values

    def _check_collapse(self, window: dict, state) -> None:
        shares = torch.tensor(window["shares"], dtype=torch.float64)
        starved = shares < self.collapse_threshold / self.num_experts
        self._starved_windows = torch.where(starved, self._starved_windows + 1, 0)
        fire = (self._starved_windows >= self.collapse_patience) & ~self._warned
        self._warned |= fire
        for index, expert in fire.nonzero().tolist():
            layer = self._layers[index]
            self.collapse_warnings.append((state.global_step, layer, expert))
            if state.is_world_process_zero:
                logger.warning(
                    "Router collapse: layer %d expert %d got %.2f%% of the routed tokens (uniform share %.2f%%) "
                    "for %d logging windows in a row (step %d).",
                    layer,
                    expert,
                    100 * shares[index, expert].item(),
                    100 / self.num_experts,
                    self._starved_windows[index, expert].item(),
                    state.global_step,
                )

    def _check_non_finite(self, state) -> None:
        skipped = [int(block.default_outputs.non_finite_updates) for block in self._blocks]
        if self.warned_non_finite or not any(skipped):
            return
        self.warned_non_finite = True
        if state.is_world_process_zero:
            logger.warning(
                "Non-finite expert outputs: EMA default updates were skipped (per MoE layer %s: %s) by step %d.",
                self._layers,
                skipped,
                state.global_step,
            )

    # ----------------------------------------------------------------------------------------------- plots
    def expert_load(self) -> torch.Tensor:
        """(MoE layers, experts) share of the routed pairs over the whole run, times num_experts (1.0 = balanced)."""
        return self._run_counts / self._run_counts.sum(-1, keepdim=True).clamp_min(1.0) * self.num_experts

    def write_plots(self, output_dir: str | os.PathLike) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        written = []

        steps = [w["step"] for w in self.history if "lm_loss" in w]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for axis, name, title in zip(
            axes, ("lm_loss", "aux_loss", "z_loss"), ("LM loss", "load-balancing loss", "z-loss"), strict=True
        ):
            axis.plot(steps, [w[name] for w in self.history if "lm_loss" in w], marker=".")
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        fig.tight_layout()
        written.append(save_png(fig, output_dir / "moe_loss_curves.png"))

        load = self.expert_load().numpy()
        fig, axis = plt.subplots(
            figsize=(max(4.0, 0.45 * self.num_experts + 2), max(2.5, 0.4 * len(self._layers) + 1.5))
        )
        image = axis.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(load.max())))
        axis.set_xlabel("expert")
        axis.set_ylabel("layer")
        axis.set_yticks(range(len(self._layers)), [str(layer) for layer in self._layers])
        if self.num_experts <= 32:
            axis.set_xticks(range(self.num_experts))
        axis.set_title("expert load (share x num_experts; 1 = balanced)")
        fig.colorbar(image, ax=axis)
        fig.tight_layout()
        written.append(save_png(fig, output_dir / "moe_expert_load.png"))
        return written


def save_png(fig, path: Path) -> Path:
    """Save and close a matplotlib figure, atomically: a kill leaves the old file or none, never half a PNG."""
    import matplotlib.pyplot as plt

    from default_moe.conversion.io import atomic_output_file

    with atomic_output_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


__all__ = ["DefaultMoeCallback", "moe_blocks"]
