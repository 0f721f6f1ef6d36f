"""torch.compile and torch.export (CPU, float32 and bf16): compiled graphs with fullgraph=True (so no graph break,
which a host sync would be) give what eager gives. Most cases compile with the aot_eager backend (dynamo tracing,
fake tensors and AOT autograd: where the fp32 failures of grouped_mm show up) and one with inductor."""

import pytest
import torch
from transformers import CompileConfig

from default_moe.modeling_default_moe import DefaultMoeSparseMoeBlock
from tiny_models import random_ids, tiny_model

DTYPES = [torch.float32, torch.bfloat16]
CONFIGS = [dict(), dict(num_hidden_layers=3, num_dense_layers=1, qk_norm=True, default_ema_update="after_use")]
# bf16 eager and compiled graphs round differently (fused vs separate casts); float32 agrees to reduction order.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def warm_model(dtype, **overrides):
    model = tiny_model(**overrides).to(dtype)
    for layer in model.model.layers:
        if isinstance(layer.mlp, DefaultMoeSparseMoeBlock):
            torch.nn.init.normal_(layer.mlp.default_outputs.ema, std=0.5)
    return model


def emas(model):
    return [layer.mlp.default_outputs.ema.clone() for layer in model.model.layers if layer.is_moe]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("overrides", CONFIGS, ids=["plain", "dense-qknorm-after_use"])
def test_compiled_eval_forward_equals_eager(dtype, overrides):
    model = warm_model(dtype, **overrides).eval()
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected, actual = model(ids, attention_mask=mask).logits, compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def test_inductor_compiled_eval_forward_equals_eager():
    model = warm_model(torch.float32).eval()
    ids = random_ids()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("overrides", CONFIGS, ids=["plain", "dense-qknorm-after_use"])
def test_compiled_training_step_gives_eager_loss_ema_and_gradients(dtype, overrides):
    eager, compiled_model = warm_model(dtype, **overrides).train(), warm_model(dtype, **overrides).train()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        ids = random_ids(seed=step)
        runs = []
        for model, forward in ((eager, eager), (compiled_model, compiled)):
            model.zero_grad()
            loss = forward(ids, labels=ids).loss
            loss.backward()
            runs.append((loss.detach(), emas(model), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (loss, ema, grads), (ref_loss, ref_ema, ref_grads) = runs[1], runs[0]
        torch.testing.assert_close(loss, ref_loss, **TOLERANCE[dtype])
        for a, b in zip(ema, ref_ema):
            torch.testing.assert_close(a, b, **TOLERANCE[dtype])
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **TOLERANCE[dtype], msg=name)
    assert not torch.equal(emas(eager)[0], warm_model(dtype, **overrides).model.layers[-1].mlp.default_outputs.ema)


def test_compiled_static_cache_decoding_equals_eager_greedy():
    model = warm_model(torch.float32, num_hidden_layers=3, num_dense_layers=1).eval()
    prompt = random_ids(batch=2, seq=5)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    expected = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True  # generate compiles on accelerators only unless told
    actual = model.generate(
        prompt,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        cache_implementation="static",
        compile_config=compile_config,
    )
    assert torch.equal(actual, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # generate really compiled the decode step


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_export_of_the_eval_forward_equals_eager(dtype):
    model = warm_model(dtype).eval()
    ids = random_ids()
    exported = torch.export.export(model, args=(ids,), kwargs={"use_cache": False})
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        actual = exported.module()(ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
