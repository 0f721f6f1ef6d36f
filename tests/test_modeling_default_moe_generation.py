"""generate() and the transformers output conventions, on every transformers release in our range (CI runs this file
on the floor and the newest release). The reference for each decoding mode is the same mode without a KV cache,
whose every step recomputes the whole prefix: so a cache that is dropped, misplaced or misread shows as a
different sequence. The defaults are warm (non-zero), so the default term is part of every step."""

import logging

import pytest
import torch
from transformers.utils import logging as hf_logging

from default_moe.modeling_default_moe import CACHE_NAME, DefaultMoeSparseMoeBlock
from tiny_models import QWEN_STYLE, random_ids, tiny_model

# qwen-style: sliding and full layers (16 positions against a window of 4), a RoPE per kind, a shared expert.
CONFIGS = [dict(), dict(num_hidden_layers=3, num_dense_layers=1, qk_norm=True), dict(sliding_window=4), QWEN_STYLE]
CONFIG_IDS = ["plain", "dense-qknorm", "sliding", "qwen-style"]


def warm_model(**overrides):
    model = tiny_model(**overrides).eval()
    for layer in model.model.layers:
        if isinstance(layer.mlp, DefaultMoeSparseMoeBlock):
            torch.nn.init.normal_(layer.mlp.default_outputs.ema, std=0.5)
    return model


def left_padded_prompt():
    prompt = random_ids(batch=2, seq=6)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    return prompt, mask


@pytest.fixture
def transformers_warnings(caplog):
    """Everything transformers logs at WARNING or above during the test (deprecations included)."""
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            yield caplog
    finally:
        hf_logging.disable_propagation()


@pytest.mark.parametrize("overrides", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(
    "mode",
    [
        dict(do_sample=False),
        dict(do_sample=False, cache_implementation="static"),
        dict(do_sample=False, num_beams=3),
        dict(do_sample=False, num_beams=2, num_return_sequences=2),
    ],
    ids=["greedy", "static-greedy", "beam3", "beam2x2"],
)
def test_cached_generation_equals_uncached_with_left_padding(overrides, mode, transformers_warnings):
    model = warm_model(**overrides)
    prompt, mask = left_padded_prompt()
    uncached = model.generate(prompt, attention_mask=mask, max_new_tokens=10, use_cache=False, **mode)
    cached = model.generate(prompt, attention_mask=mask, max_new_tokens=10, **mode)
    assert torch.equal(cached, uncached)
    assert not [r.getMessage() for r in transformers_warnings.records if "deprecated" in r.getMessage()]


def test_assisted_decoding_equals_greedy():
    model, assistant = warm_model(), warm_model(seed=1)
    prompt = random_ids(batch=1, seq=6)
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assisted = model.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, greedy)


def test_generation_continues_from_a_returned_cache():
    model = warm_model(num_hidden_layers=3, num_dense_layers=1)
    prompt = random_ids(batch=1, seq=6)
    whole = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    first = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, CACHE_NAME)
    assert cache is not None and cache.get_seq_length() == prompt.shape[1] + 3  # the last token is not yet cached
    rest = model.generate(first.sequences, max_new_tokens=6, do_sample=False, **{CACHE_NAME: cache})
    assert torch.equal(rest, whole)


def test_generation_from_inputs_embeds_equals_from_input_ids():
    model = warm_model()
    prompt = random_ids(batch=2, seq=6)
    from_ids = model.generate(prompt, max_new_tokens=8, do_sample=False)
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, prompt.shape[1] :])  # only the new tokens come back


def test_forward_returns_and_reads_the_cache_under_the_running_release_name():
    model = warm_model()
    ids = random_ids(batch=1, seq=8)
    full = model(ids).logits
    prefix = model(ids[:, :5], use_cache=True)
    cache = getattr(prefix, CACHE_NAME)
    assert cache.get_seq_length() == 5
    step = model(ids[:, 5:], **{CACHE_NAME: cache})
    torch.testing.assert_close(step.logits, full[:, 5:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("how", ["argument", "config"])
def test_tuple_outputs_put_the_logits_first_without_labels(training, how):
    """As for transformers' own models: `return_dict=False` (or `config.return_dict=False`) gives tuples, and
    `outputs[0]` is the logits whenever no labels are given (with gradients on, the aux loss comes later)."""
    model = warm_model().train(training)
    ids = random_ids()
    kwargs = {"return_dict": False} if how == "argument" else {}
    if how == "config":
        model.config.return_dict = False
    reference = warm_model().train(training)
    expected = reference(ids, labels=ids)
    outputs = model(ids, **kwargs)
    assert isinstance(outputs, tuple)
    torch.testing.assert_close(outputs[0], expected.logits)
    labelled = model(ids, labels=ids, **kwargs)
    torch.testing.assert_close(labelled[0], expected.loss)
    torch.testing.assert_close(labelled[1], expected.logits)
    assert model.model(ids, **kwargs)[0].shape == (*ids.shape, model.config.hidden_size)
    with_dict = model(ids, return_dict=True)
    torch.testing.assert_close(with_dict[0], with_dict.logits)
