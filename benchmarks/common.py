"""Shared helpers: model builders (ours, Mixtral, OLMoE, dense straight-through), timing, the byte-level corpus."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from torch.nn import functional as F

from default_moe import DefaultMoeConfig, DefaultMoeForCausalLM
from default_moe.modeling_default_moe import DefaultMoeSparseMoeBlock

# ----------------------------------------------------------------------------------------------------------------
# Models


def our_config(
    *,
    hidden=256,
    inter=512,
    layers=2,
    experts=8,
    top_k=2,
    vocab=1024,
    heads=4,
    routing="default",
    norm_topk_prob=True,
    qk_norm=False,
    max_pos=2048,
    **extra,
) -> DefaultMoeConfig:
    return DefaultMoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob,
        qk_norm=qk_norm,
        routing=routing,
        **extra,
    )


def build_ours(config: DefaultMoeConfig, seed: int = 0, attn: str = "sdpa") -> DefaultMoeForCausalLM:
    torch.manual_seed(seed)
    config._attn_implementation = attn
    return DefaultMoeForCausalLM(config)


def peer_config(kind: str, ours: DefaultMoeConfig):
    """Transformers' Mixtral / OLMoE config with exactly our shapes (state dicts copy 1:1)."""
    common = dict(
        vocab_size=ours.vocab_size,
        hidden_size=ours.hidden_size,
        intermediate_size=ours.intermediate_size,
        num_hidden_layers=ours.num_hidden_layers,
        num_attention_heads=ours.num_attention_heads,
        num_key_value_heads=ours.num_key_value_heads,
        max_position_embeddings=ours.max_position_embeddings,
        num_experts_per_tok=ours.num_experts_per_tok,
        rms_norm_eps=ours.rms_norm_eps,
        router_aux_loss_coef=ours.router_aux_loss_coef,
        output_router_logits=True,  # ours always computes its load-balancing loss in training; make theirs too
        tie_word_embeddings=False,
    )
    if kind == "mixtral":
        return transformers.MixtralConfig(num_local_experts=ours.num_experts, sliding_window=None, **common)
    if kind == "olmoe":
        return transformers.OlmoeConfig(
            num_experts=ours.num_experts,
            norm_topk_prob=ours.norm_topk_prob,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
            **common,
        )
    raise ValueError(kind)


def build_peer(kind: str, ours_model: DefaultMoeForCausalLM, experts_impl: str, attn: str = "sdpa"):
    """A transformers Mixtral/OLMoE with our model's weights (strict load; only our EMA buffers are left over)."""
    config = peer_config(kind, ours_model.config)
    config._attn_implementation = attn
    cls = transformers.MixtralForCausalLM if kind == "mixtral" else transformers.OlmoeForCausalLM
    model = cls(config)
    state = {k: v for k, v in ours_model.state_dict().items() if not k.endswith("default_outputs.ema")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{kind}: state dict mismatch, missing={missing} unexpected={unexpected}")
    model.set_experts_implementation(experts_impl)
    return model.to(next(ours_model.parameters()).dtype)


# ----------------------------------------------------------------------------------------------------------------
# The dense straight-through variant (DenseMixer-style): every expert runs on every token, the forward value stays
# the sparse top-K output, and the router gets the gradient of sum_{i in A} w_i E_i + sum_{i not in A} p_i E_i(x).


def dense_expert_outputs(experts, x_TH: torch.Tensor) -> torch.Tensor:
    """(T, H) -> (T, E, H): every expert's unweighted output for every token (one batched GEMM per projection)."""
    w = experts.gate_up_proj.dtype
    x = x_TH.to(w)
    gate_up_ETI = torch.matmul(x.unsqueeze(0), experts.gate_up_proj.transpose(-2, -1))  # (E, T, 2I)
    gate, up = gate_up_ETI.chunk(2, dim=-1)
    out_ETH = torch.matmul(experts.act_fn(gate) * up, experts.down_proj.transpose(-2, -1))
    return out_ETH.transpose(0, 1)


def dense_st_block_forward(self: DefaultMoeSparseMoeBlock, hidden_states, token_mask=None, return_router_losses=False):
    """Forward of a MoE block with the dense straight-through router gradient.

    Value: sum_{i in A} w_i E_i(x) (the sparse top-K output, with the block's top-K weights). Gradient to the router:
    through y_dense = sum_{i in A} w_i E_i + sum_{i not in A} p_i E_i(x), i.e. y = y_sparse + (y_rest - y_rest.detach())
    where y_rest = sum_{i not in A} p_i E_i(x) with E_i(x) detached (the experts get only their sparse gradient).
    """
    batch_size, seq_len, hidden_size = hidden_states.shape
    x_TH = hidden_states.reshape(-1, hidden_size)
    router_logits_TE, probs_TE, top_k_weights_TK, top_k_index_TK = self.gate(x_TH)
    all_out_TEH = dense_expert_outputs(self.experts, x_TH)
    selected_TKH = all_out_TEH.gather(1, top_k_index_TK.unsqueeze(-1).expand(-1, -1, hidden_size))
    out_TH = torch.einsum("tkh,tk->th", selected_TKH.float(), top_k_weights_TK)
    unselected_probs_TE = probs_TE.scatter(1, top_k_index_TK, 0.0)
    rest_TH = torch.einsum("teh,te->th", all_out_TEH.detach().float(), unselected_probs_TE)
    out_TH = out_TH + (rest_TH - rest_TH.detach())
    out_BSH = out_TH.to(hidden_states.dtype).view(batch_size, seq_len, hidden_size)
    if not return_router_losses:
        return out_BSH
    counts_E = torch.zeros(self.num_experts, device=x_TH.device).index_add_(
        0, top_k_index_TK.reshape(-1), torch.ones(top_k_index_TK.numel(), device=x_TH.device)
    )
    return out_BSH, self._router_losses(router_logits_TE, probs_TE, counts_E, token_mask)


class DenseStraightThroughBlock(DefaultMoeSparseMoeBlock):
    forward = dense_st_block_forward


def make_dense_st(model: DefaultMoeForCausalLM) -> DefaultMoeForCausalLM:
    """Turn (in place) every MoE block of `model` into the dense straight-through variant."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, DefaultMoeSparseMoeBlock):
            layer.mlp.__class__ = DenseStraightThroughBlock
    return model


# ----------------------------------------------------------------------------------------------------------------
# Timing


def train_step_fn(model, batch: torch.Tensor, lr: float = 1e-4) -> Callable[[], float]:
    """A closure that runs one training step (forward, backward, AdamW step) and returns the loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    cpu_times: dict | None = None,
    device: torch.device | None = None,
    peak_memory: dict | None = None,
) -> dict[str, list[float]]:
    """Run the functions round-robin (A B C A B C ...) `reps` times after `warmup` rounds; wall times in seconds.

    The order inside a round alternates (ABC, CBA, ...) so no variant always follows the same one. If `cpu_times`
    is a dict it receives the process CPU times (time.process_time) of the same runs: with one torch thread these
    leave out the time the process waited for a core on a shared machine. On a CUDA `device` each run is timed with
    CUDA events after a synchronisation (so queued work from before does not count), and `peak_memory`, if a dict,
    receives each run's peak of `torch.cuda.max_memory_allocated` above the memory allocated before it."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in names})
    if peak_memory is not None:
        peak_memory.update({name: [] for name in names})
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            if peak_memory is not None:
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            cpu_start = time.process_time()
            times[name].append(timed_call(fns[name], device))
            if cpu_times is not None:
                cpu_times[name].append(time.process_time() - cpu_start)
            if peak_memory is not None:
                peak_memory[name].append(torch.cuda.max_memory_allocated(device) - resident)
    return times


def timed_call(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds `fn()` takes: wall clock on the CPU; on CUDA, CUDA events around it, all queued work finished."""
    if device is None or device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def drop_out_of_memory(fns: dict[str, Callable[[], object]], models: dict, device: torch.device) -> dict[str, str]:
    """On CUDA, run each function once and drop (freeing its model) those that run out of GPU memory.

    transformers' `batched_mm` gathers one weight matrix per (token, expert) pair, which at long sequences does not
    fit any GPU; measuring the fastest implementation has to survive that. Returns {name: the error's first line}.
    On the CPU an allocation failure ends the process instead, so nothing is tried there."""
    dropped: dict[str, str] = {}
    if device.type != "cuda":
        return dropped
    for name in list(fns):
        try:
            fns[name]()
        except torch.OutOfMemoryError as error:
            dropped[name] = str(error).strip().splitlines()[0]
        if name in dropped:
            del fns[name], models[name]
            gc.collect()
            torch.cuda.empty_cache()
    return dropped


def median(values) -> float:
    return float(statistics.median(values))


def ratio_of_medians(times: dict[str, list[float]], a: str, b: str) -> float:
    return median(times[a]) / median(times[b])


@functools.cache
def code_version() -> str:
    """A short hash of what decides a training run's numbers: the model's two files, the benchmarks' training code
    and the torch and transformers versions. A resumable study keys runs by their settings only, so a results file
    can outlive the code that wrote it; reports compare this field to tell when it holds more than one version."""
    import hashlib
    from pathlib import Path

    import default_moe

    here, package = Path(__file__).resolve().parent, Path(default_moe.__file__).resolve().parent
    files = [package / "modeling_default_moe.py", package / "configuration_default_moe.py"]
    files += [here / name for name in ("common.py", "method.py", "quality.py", "fidelity.py")]
    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(device: str = "cpu") -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory, cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# ----------------------------------------------------------------------------------------------------------------
# Corpus: the standard library's source files as bytes (vocabulary 256), train/validation split by file hash


@functools.lru_cache(maxsize=8)
def byte_corpus(max_bytes: int, split: str = "train") -> torch.Tensor:
    """A 1-D uint8->long tensor of at most `max_bytes` bytes of the built-in corpus (training engineer's split).
    Cached (do not modify it): a parent process that reads it once shares it with the runs it forks."""
    try:
        from default_moe.training.data import builtin_corpus

        texts = builtin_corpus(split, max_chars=max_bytes)
    except ImportError:  # pragma: no cover - the training package is part of the repo
        import sysconfig
        from pathlib import Path

        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        texts = texts[::20] if split == "validation" else [t for i, t in enumerate(texts) if i % 20]
    data = "\n".join(texts).encode("utf-8", errors="replace")[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def sample_batches(data: torch.Tensor, batch: int, seq: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq) random windows of `data`, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=gen)
    return data[starts.unsqueeze(-1) + torch.arange(seq)]


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
