"""The Default MoE block against a plain loop-based reference of DESIGN.md §2, and against transformers' own
Mixtral/OLMoE/Qwen3-MoE/Qwen2-MoE blocks when the defaults are zero. Tolerance: 1e-5 absolute plus 1e-5 relative in
float32 (the implementations sum the same terms in a different order)."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralSparseMoeBlock
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from default_moe.modeling_default_moe import DefaultMoeSparseMoeBlock
from tiny_models import random_ids, tiny_config, tiny_model

ATOL = 1e-5
RTOL = 1e-5


def make_block(seed=0, **overrides) -> DefaultMoeSparseMoeBlock:
    torch.manual_seed(seed)
    block = DefaultMoeSparseMoeBlock(tiny_config(**overrides))
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return block


def reference_block(block, x_TH, ema_EH, training):
    """Token-by-token, expert-by-expert Default MoE (DESIGN.md §2), plus the gated shared expert when the block has
    one: always selected, so it has no default and is no part of the EMA statistics. Returns (y, new_ema)."""
    config = block.config
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    w_router = block.gate.weight
    w_gate_up, w_down = block.experts.gate_up_proj, block.experts.down_proj

    def expert(i, x_H):
        gate, up = (w_gate_up[i] @ x_H).chunk(2)
        return w_down[i] @ (F.silu(gate) * up)

    def score(t, i):
        return probs[t, i].detach() if config.default_ema_weighting == "router_prob" else 1.0

    probs = torch.softmax((x_TH @ w_router.T).float(), dim=-1)
    selections, outputs = [], []
    sums = torch.zeros(num_experts, x_TH.shape[1])
    score_sums = torch.zeros(num_experts)
    for t in range(x_TH.shape[0]):
        selected = torch.topk(probs[t], top_k).indices.tolist()
        selections.append(selected)
        outputs.append({i: expert(i, x_TH[t]) for i in selected})
        for i in selected:
            if config.default_ema_source == "routed":
                sums[i] += score(t, i) * outputs[t][i].detach()
                score_sums[i] += score(t, i)
    if config.default_ema_source == "unrouted":
        # One token in `default_probe_stride`, evenly spaced from an offset of (sum of the selected ids) mod stride;
        # each probed token's output from every expert it did *not* select.
        num_tokens, stride = x_TH.shape[0], config.default_probe_stride
        offset = sum(map(sum, selections)) % stride
        for t in [(p * stride + offset) % num_tokens for p in range(max(1, num_tokens // stride))]:
            for i in set(range(num_experts)) - set(selections[t]):
                sums[i] += score(t, i) * expert(i, x_TH[t]).detach()
                score_sums[i] += score(t, i)

    new_ema = ema_EH.clone()
    if training and config.routing == "default":
        for i in range(num_experts):
            if score_sums[i] > 0:
                new_ema[i] = (
                    config.default_ema_beta * ema_EH[i] + (1 - config.default_ema_beta) * sums[i] / score_sums[i]
                )
    if config.routing == "topk" or not (training or config.default_in_inference):
        used = torch.zeros_like(ema_EH)
    elif training and config.default_ema_update == "before_use":
        used = new_ema
    else:
        used = ema_EH

    ys = []
    for t, selected in enumerate(selections):
        weights = probs[t, selected]
        if config.norm_topk_prob:
            weights = weights / weights.sum()
        y = sum(w * outputs[t][i] for w, i in zip(weights, selected))
        default = sum(probs[t, i] * used[i] for i in range(num_experts) if i not in selected)
        if config.default_term == "gradient":  # in the router gradient only
            default = default - default.detach()
        y = y + default
        if block.shared_expert is not None:
            shared = block.shared_expert
            x_H = x_TH[t]
            s_H = shared.down_proj.weight @ (F.silu(shared.gate_proj.weight @ x_H) * (shared.up_proj.weight @ x_H))
            y = y + torch.sigmoid(block.shared_expert_gate.weight @ x_H) * s_H
        ys.append(y)
    return torch.stack(ys), new_ema


LAYER_CONFIGS = [
    dict(num_experts=4, num_experts_per_tok=1),
    dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    dict(num_experts=6, num_experts_per_tok=3, default_ema_weighting="router_prob"),
    dict(num_experts=4, num_experts_per_tok=2, default_ema_update="after_use", default_ema_beta=0.5),
    dict(num_experts=8, num_experts_per_tok=2, default_ema_beta=0.0),
    dict(num_experts=4, num_experts_per_tok=2, routing="topk"),
    dict(num_experts=4, num_experts_per_tok=2, default_in_inference=False),
    dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=20),
    dict(num_experts=4, num_experts_per_tok=1, shared_expert_intermediate_size=8, default_ema_weighting="router_prob"),
    dict(num_experts=4, num_experts_per_tok=1, default_term="gradient"),
    dict(num_experts=4, num_experts_per_tok=2, default_term="gradient", default_ema_update="after_use"),
    dict(num_experts=4, num_experts_per_tok=1, default_ema_source="unrouted", default_probe_stride=3),
    dict(num_experts=6, num_experts_per_tok=2, default_ema_source="unrouted", default_ema_weighting="router_prob"),
    dict(
        num_experts=4,
        num_experts_per_tok=2,
        default_term="gradient",
        default_ema_source="unrouted",
        default_probe_stride=4,
    ),
]


def run_against_reference(overrides, training, steps=3):
    block = make_block(**overrides).train(training)
    ref_block = make_block(**overrides).train(training)
    torch.nn.init.normal_(block.default_outputs.ema)
    initial_ema = block.default_outputs.ema.clone()
    ref_ema = initial_ema.clone()
    for step in range(steps):
        x = torch.randn(2, 5, block.config.hidden_size, generator=torch.Generator().manual_seed(step))
        x_ours = x.clone().requires_grad_()
        y = block(x_ours)
        y_ref, ref_ema = reference_block(ref_block, x.view(-1, x.shape[-1]), ref_ema, training)
        torch.testing.assert_close(y.view(-1, x.shape[-1]), y_ref, atol=ATOL, rtol=RTOL)
        # Same upstream gradient through both: router, expert and input gradients must agree.
        upstream = torch.randn_like(y_ref)
        (y.view(-1, x.shape[-1]) * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        # A training forward's EMA update is committed by its backward.
        torch.testing.assert_close(block.default_outputs.ema, ref_ema, atol=ATOL, rtol=RTOL)
        for name, parameter in block.named_parameters():
            ref_parameter = dict(ref_block.named_parameters())[name]
            torch.testing.assert_close(parameter.grad, ref_parameter.grad, atol=ATOL, rtol=1e-4, msg=name)
            parameter.grad = ref_parameter.grad = None
    return block, initial_ema


@pytest.mark.parametrize("overrides", LAYER_CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_matches_loop_reference(overrides, training):
    block, initial_ema = run_against_reference(overrides, training)
    updates = training and block.config.routing == "default"
    assert torch.equal(block.default_outputs.ema, initial_ema) != updates


def test_eval_forward_never_updates_ema():
    block = make_block().eval()
    torch.nn.init.normal_(block.default_outputs.ema)
    before = block.default_outputs.ema.clone()
    block(torch.randn(2, 5, 32)).sum().backward()
    assert torch.equal(block.default_outputs.ema, before)


def no_grad_forward(block, x):
    with torch.no_grad():
        block(x)


def inference_mode_forward(block, x):
    with torch.inference_mode():
        block(x)


def forward_without_backward(block, x):
    block(x)


def forward_and_backward(block, x):
    block(x).sum().backward()


def frozen_forward(block, x):
    block.requires_grad_(False)
    block(x)


@pytest.mark.parametrize(
    ("run", "updates"),
    [
        (no_grad_forward, False),  # e.g. DPO's reference pass with the adapter disabled, model in training mode
        (inference_mode_forward, False),
        (forward_without_backward, False),  # the graph is never trained
        (forward_and_backward, True),
        (frozen_forward, True),  # nothing can be recomputed: committed at once (calibration does this)
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_only_training_mode_forwards_that_train_move_the_ema(run, updates):
    block = make_block().train()
    before = block.default_outputs.ema.clone()
    run(block, torch.randn(2, 5, 32))
    assert torch.equal(block.default_outputs.ema, before) != updates


def test_router_gets_gradient_from_unselected_experts_only_with_defaults():
    """The point of the method: with non-zero defaults, unselected experts' router rows get gradient at K=1."""
    x = torch.randn(1, 1, 32)
    grads = {}
    for routing in ("topk", "default"):
        block = make_block(num_experts=4, num_experts_per_tok=1, routing=routing).eval()
        torch.nn.init.normal_(block.default_outputs.ema)
        block(x).sum().backward()
        grads[routing] = block.gate.weight.grad
    selected = torch.topk(x.view(1, -1) @ block.gate.weight.detach().T, 1).indices.item()
    unselected = [i for i in range(4) if i != selected]
    # Top-1 with raw weights: the only router gradient is through p_selected (softmax couples all rows), so
    # top-K gives every row *some* gradient; Default MoE's differs on every unselected row.
    assert (grads["default"][unselected] - grads["topk"][unselected]).abs().sum(-1).min() > 1e-6


REFERENCE_BLOCKS = {  # name -> (transformers' block, its config, our overrides)
    "mixtral": (
        MixtralSparseMoeBlock,
        MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
        dict(norm_topk_prob=True),
    ),
    "olmoe": (
        OlmoeSparseMoeBlock,
        OlmoeConfig(hidden_size=32, intermediate_size=24, num_experts=8, num_experts_per_tok=2),
        dict(norm_topk_prob=False),
    ),
    "qwen3_moe": (
        Qwen3MoeSparseMoeBlock,
        Qwen3MoeConfig(
            hidden_size=32, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True
        ),
        dict(norm_topk_prob=True),
    ),
    "qwen2_moe-shared-expert": (
        Qwen2MoeSparseMoeBlock,
        Qwen2MoeConfig(
            hidden_size=32,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
            num_experts=8,
            num_experts_per_tok=2,
        ),
        dict(norm_topk_prob=False, shared_expert_intermediate_size=20),
    ),
}


@pytest.mark.parametrize("reference_name", list(REFERENCE_BLOCKS))
@pytest.mark.parametrize("routing", ["default", "topk"])
def test_zero_defaults_equal_transformers_top_k_block(reference_name, routing):
    """With all defaults zero (fresh or converted), and with routing='topk' whatever the defaults, the layer is
    exactly transformers' standard top-K MoE block (with its shared expert, for Qwen2-MoE), in eval and in training.
    (In training, "before_use" would first fold this batch into the zero defaults, so the zero-defaults case uses the
    causal "after_use" order.)"""
    reference_cls, reference_config, overrides = REFERENCE_BLOCKS[reference_name]
    block = make_block(
        num_experts=8, num_experts_per_tok=2, routing=routing, default_ema_update="after_use", **overrides
    )
    reference = reference_cls(reference_config)
    reference.load_state_dict({k: v for k, v in block.state_dict().items() if "default_outputs" not in k})
    if routing == "topk":
        torch.nn.init.normal_(block.default_outputs.ema)  # ignored by top-K routing
    for training in (False, True):
        block.train(training)
        reference.train(training)
        x = torch.randn(3, 7, 32)
        torch.testing.assert_close(block(x), reference(x), atol=ATOL, rtol=RTOL)


def test_padding_tokens_stay_out_of_the_ema():
    block = make_block(num_experts=4, num_experts_per_tok=2).train()
    x = torch.randn(1, 6, 32)
    padded = torch.cat([x, torch.randn(1, 4, 32) * 50], dim=1)
    mask = torch.tensor([True] * 6 + [False] * 4)
    block(padded, token_mask=mask).sum().backward()
    with_padding = block.default_outputs.ema.clone()
    block.default_outputs.ema.zero_()
    block(x).sum().backward()
    torch.testing.assert_close(with_padding, block.default_outputs.ema, atol=ATOL, rtol=RTOL)


def test_non_finite_expert_outputs_never_enter_the_ema():
    block = make_block(num_experts=4, num_experts_per_tok=4).train()  # every expert sees every token
    with torch.no_grad():
        block.experts.down_proj[2].fill_(float("inf"))
        block.experts.down_proj[3, 0, 0] = float("nan")
    for _ in range(2):
        block(torch.randn(2, 3, 32)).sum().backward()
    ema = block.default_outputs.ema
    assert torch.isfinite(ema).all()
    assert ema[:2].abs().sum(-1).min() > 0  # healthy experts updated
    assert ema[2:].abs().sum() == 0  # broken experts kept their (zero) defaults
    assert block.default_outputs.non_finite_updates.item() == 4  # 2 experts x 2 forwards (DefaultMoeCallback warns)


def test_ema_stays_float32_under_bfloat16():
    block = make_block().to(torch.bfloat16).train()
    assert block.default_outputs.ema.dtype == torch.float32
    assert block.experts.gate_up_proj.dtype == torch.bfloat16
    y = block(torch.randn(2, 4, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert block.default_outputs.ema.dtype == torch.float32 and block.default_outputs.ema.abs().sum() > 0


def test_router_losses_match_switch_definition():
    block = make_block(num_experts=4, num_experts_per_tok=2).eval()
    x = torch.randn(2, 6, 32)
    _, (balance, z) = block(x, return_router_losses=True)
    logits = x.view(-1, 32) @ block.gate.weight.T
    probs = logits.softmax(-1)
    selected = torch.topk(probs, 2).indices
    fraction = torch.stack([(selected == i).float().sum() for i in range(4)]) / selected.numel()
    torch.testing.assert_close(balance, 4 * (fraction * probs.mean(0)).sum())
    torch.testing.assert_close(z, torch.logsumexp(logits, -1).pow(2).mean())


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_experts_follow_the_transformers_experts_interface(implementation):
    """Serving engines replace `mlp.experts` with their own kernel, called as experts(hidden_states, top_k_index,
    top_k_weights) on the packed (E, 2I, H) / (E, H, I) weights. transformers' own Mixtral experts on the same
    weights, in each implementation transformers offers, stand in for such a kernel: eval outputs (defaults
    included) do not change, and each of our implementations gives the same."""
    block = make_block(num_experts=4, num_experts_per_tok=2).eval()
    torch.nn.init.normal_(block.default_outputs.ema)
    x = torch.randn(2, 5, 32)
    expected = block(x)
    for experts_implementation in ("eager", "grouped_mm", "batched_mm"):  # ours
        block.config._experts_implementation = experts_implementation
        torch.testing.assert_close(block(x), expected, atol=ATOL, rtol=RTOL, msg=experts_implementation)
    mixtral_config = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    mixtral_config._experts_implementation = implementation
    engine_experts = MixtralExperts(mixtral_config)
    engine_experts.load_state_dict(block.experts.state_dict())
    block.experts = engine_experts
    torch.testing.assert_close(block(x), expected, atol=ATOL, rtol=RTOL)


def test_gradient_only_defaults_forward_is_exactly_top_k_and_router_gradient_is_not():
    """default_term="gradient": the logits are bit-identical to routing="topk" with the same weights (so the trained
    model exports to Mixtral/OLMoE with no loss), in training and eval; only the router gradients differ."""
    ids = random_ids()
    models = {}
    for routing, term in (("topk", "forward"), ("default", "gradient")):
        models[term] = tiny_model(routing=routing, default_term=term, default_ema_update="after_use")
        for layer in models[term].model.layers:
            torch.nn.init.normal_(layer.mlp.default_outputs.ema, generator=torch.Generator().manual_seed(3))
    for training in (True, False):
        grads = {}
        for term, model in models.items():
            model.train(training).zero_grad()
            out = model(ids, labels=ids)
            out.loss.backward()
            grads[term] = (out.logits, [layer.mlp.gate.weight.grad for layer in model.model.layers])
        assert torch.equal(grads["forward"][0], grads["gradient"][0])
        for topk_grad, gradient_only_grad in zip(grads["forward"][1], grads["gradient"][1], strict=True):
            assert (topk_grad - gradient_only_grad).abs().max() > 1e-4
    with torch.no_grad():
        assert torch.equal(models["forward"](ids).logits, models["gradient"](ids).logits)


def test_unrouted_defaults_come_from_tokens_not_routed_to_the_expert():
    """default_ema_source="unrouted" with every token probed (stride 1), top-1 and beta 0: D_i is the mean of expert i
    over exactly the tokens that did not pick it."""
    block = make_block(num_experts=4, num_experts_per_tok=1, default_ema_beta=0.0, default_ema_source="unrouted")
    block.config.default_probe_stride = 1
    x_TH = torch.randn(12, 32)
    block.train()(x_TH.view(1, 12, 32)).sum().backward()
    with torch.no_grad():
        selected_T = block.gate(x_TH)[3][:, 0]
        for i in range(4):
            others = x_TH[selected_T != i]
            expected = block.experts(others, torch.full((len(others), 1), i), torch.ones(len(others), 1)).mean(0)
            torch.testing.assert_close(block.default_outputs.ema[i], expected, atol=ATOL, rtol=RTOL)
