"""The experts call goes through the functions transformers registers as "grouped_mm" and "batched_mm" (so a patched
or improved kernel under that name is what runs), and any expert width works in float32, bfloat16 and float16:
"grouped_mm" falls back to "batched_mm" where torch's grouped GEMM cannot run. Each width is checked in training
(loss, gradients, EMA), eval and `generate` against the same model whose experts are a token-by-token loop in float64.

Tolerances (absolute and relative, against the float64 loop): float32 1e-5, bfloat16 1.6e-2, float16 2e-3, about 5
times the largest difference measured over widths 37, 38, 40 and both kernels (1.2e-7, 3.2e-3 and 3.4e-4, in the
logits, gradients and EMA): the kernels round the experts' output to the dtype once more than the loop does, and that
goes through the rest of the model and its backward in that dtype. One MoE layer, so both route alike."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from default_moe.modeling_default_moe import DefaultMoeExperts, DefaultMoeSparseMoeBlock, _grouped_mm_usable
from tiny_models import random_ids, tiny_config, tiny_model

TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
DTYPES = list(TOLERANCE)
IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


class LoopExperts(nn.Module):
    """The reference: sum_k w_k E_k(x_t) token by token, expert by expert, in float64, returned in the input dtype."""

    def __init__(self, experts: DefaultMoeExperts):
        super().__init__()
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj

    def forward(self, hidden_states_TH, top_k_index_TK, top_k_weights_TK):
        outputs = []
        for x_H, experts_K, weights_K in zip(hidden_states_TH.double(), top_k_index_TK, top_k_weights_TK.double()):
            y_H = torch.zeros_like(x_H)
            for i, weight in zip(experts_K.tolist(), weights_K):
                gate, up = (self.gate_up_proj[i].double() @ x_H).chunk(2)
                y_H = y_H + weight * (self.down_proj[i].double() @ (F.silu(gate) * up))
            outputs.append(y_H)
        return torch.stack(outputs).to(hidden_states_TH.dtype)


def moe_blocks(model):
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, DefaultMoeSparseMoeBlock)]


def model_and_reference(intermediate_size, dtype, implementation):
    """One MoE layer (its router sees the same input in both), the given expert width and dtype."""
    models = []
    for _ in range(2):
        model = tiny_model(num_hidden_layers=1, intermediate_size=intermediate_size).to(dtype)
        model.set_experts_implementation(implementation)
        for block in moe_blocks(model):  # experts' outputs as large as the residual stream, warm defaults
            generator = torch.Generator().manual_seed(3)
            for tensor in (block.experts.gate_up_proj, block.experts.down_proj, block.default_outputs.ema):
                torch.nn.init.normal_(tensor, std=0.3, generator=generator)
        models.append(model)
    for block in moe_blocks(models[1]):
        block.experts = LoopExperts(block.experts)
    return models


@pytest.fixture
def registry_calls(monkeypatch):
    """Counts the calls of transformers' registered "grouped_mm" and "batched_mm" functions, patched in its registry
    as `ExpertsInterface.register` does."""
    calls = {}
    for name in ("grouped_mm", "batched_mm"):
        calls[name] = 0
        registered = ALL_EXPERTS_FUNCTIONS[name]

        def counted(*args, name=name, registered=registered, **kwargs):
            calls[name] += 1
            return registered(*args, **kwargs)

        monkeypatch.setitem(ExpertsInterface._global_mapping, name, counted)
    return calls


def grouped_mm_runs(hidden_size, intermediate_size, dtype) -> bool:
    """The rule: torch's grouped GEMM needs the rows of every operand (tokens, weights, gated activations) to be a
    multiple of 16 bytes long."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return (hidden_size * element_size) % 16 == 0 and (intermediate_size * element_size) % 16 == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_mm_usable_is_exactly_where_transformers_grouped_mm_runs(dtype):
    """`_grouped_mm_usable` against transformers' own "grouped_mm" function, forward and backward, over widths
    around the 16-byte boundaries: it holds exactly where that function does not raise."""
    for hidden_size, intermediate_size in itertools.product((16, 20, 24, 36, 40), (8, 12, 18, 36, 37, 38, 40)):
        config = tiny_config(hidden_size=hidden_size, intermediate_size=intermediate_size, num_attention_heads=2)
        config._experts_implementation = "grouped_mm"
        experts = DefaultMoeExperts(config).to(dtype)
        for parameter in experts.parameters():
            torch.nn.init.normal_(parameter, std=0.3)
        x = torch.randn(7, hidden_size, dtype=dtype, requires_grad=True)
        top_k_index = torch.randint(0, config.num_experts, (7, 2), generator=torch.Generator().manual_seed(0))
        try:
            ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, x, top_k_index, torch.rand(7, 2)).float().sum().backward()
            runs = True
        except RuntimeError as error:
            assert "strides should be multiple of 16 bytes" in str(error)
            runs = False
        assert _grouped_mm_usable(experts) == runs == grouped_mm_runs(hidden_size, intermediate_size, dtype), (
            hidden_size,
            intermediate_size,
        )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("intermediate_size", [37, 38, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_expert_width_trains_evaluates_and_generates(dtype, intermediate_size, implementation, registry_calls):
    model, reference = model_and_reference(intermediate_size, dtype, implementation)
    tolerance = TOLERANCE[dtype]
    ids = random_ids()

    losses = [m.train()(ids, labels=ids).loss for m in (model, reference)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], **tolerance)
    for (name, parameter), reference_parameter in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, reference_parameter.grad, **tolerance, msg=name)
    for block, reference_block in zip(moe_blocks(model), moe_blocks(reference), strict=True):
        torch.testing.assert_close(block.default_outputs.ema, reference_block.default_outputs.ema, **tolerance)

    with torch.no_grad():
        logits = [m.eval()(ids).logits for m in (model, reference)]
    torch.testing.assert_close(logits[0], logits[1], **tolerance)

    # The reference decodes our tokens (greedy picks can differ where two logits tie to within the tolerance).
    prompt = random_ids(seq=5, seed=2)
    decoding = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    generated = model.generate(prompt, do_sample=False, **decoding)
    ours = generated.sequences
    expected = reference.generate(prompt, prefix_allowed_tokens_fn=lambda b, ids: [ours[b, len(ids)]], **decoding)
    assert torch.equal(expected.sequences, ours)
    torch.testing.assert_close(torch.stack(generated.logits), torch.stack(expected.logits), **tolerance)

    # Which of transformers' functions served our model: "grouped_mm" wherever torch's grouped GEMM runs (on CPU; off
    # CPU transformers' generate decodes with "batched_mm").
    grouped = implementation != "batched_mm" and grouped_mm_runs(32, intermediate_size, dtype)
    assert registry_calls["grouped_mm" if grouped else "batched_mm"] > 0
    assert registry_calls["batched_mm" if grouped else "grouped_mm"] == 0


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_a_function_patched_into_transformers_registry_is_what_runs(monkeypatch, implementation):
    """Patched on the `ALL_EXPERTS_FUNCTIONS` instance (its class-wide registry is covered above): the patch serves
    the standard experts call in eval and the per-pair outputs of training."""
    calls = []
    registered = ALL_EXPERTS_FUNCTIONS[implementation]

    def patched(experts, hidden_states, top_k_index, top_k_weights):
        calls.append(top_k_index.shape)
        return registered(experts, hidden_states, top_k_index, top_k_weights)

    local_mapping = {**ALL_EXPERTS_FUNCTIONS._local_mapping, implementation: patched}
    monkeypatch.setattr(ALL_EXPERTS_FUNCTIONS, "_local_mapping", local_mapping)
    model = tiny_model(num_hidden_layers=2)
    model.set_experts_implementation(implementation)
    ids = random_ids()
    with torch.no_grad():
        model.eval()(ids)
    assert calls == [(ids.numel(), 2)] * 2  # one standard call per MoE layer
    calls.clear()
    model.train()(ids, labels=ids).loss.backward()
    assert calls == [(ids.numel() * 2, 1)] * 2  # each (token, expert) pair as a top-1 route


def test_an_experts_function_registered_under_a_new_name_trains_and_evaluates(monkeypatch):
    """A kernel registered under its own name (as kernel libraries do) and selected serves training and eval, and
    computes what "grouped_mm" computes."""
    calls = []

    def counted_grouped_mm(*args):
        calls.append(1)
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](*args)

    monkeypatch.setitem(ExpertsInterface._global_mapping, "counted_grouped_mm", counted_grouped_mm)
    model, expected = tiny_model(), tiny_model()
    model.set_experts_implementation("counted_grouped_mm")
    ids = random_ids()
    for candidate in (model, expected):
        candidate.train()(ids, labels=ids).loss.backward()
    assert len(calls) == 2
    for (name, parameter), expected_parameter in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected_parameter.grad, atol=0, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, expected.eval()(ids).logits, atol=0, rtol=0)
    assert len(calls) == 4
