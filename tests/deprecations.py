"""What counts as a deprecation from the libraries we build on, and the few we accept, each with its reason: one list
for the tests' own process (conftest.py adds each as a pytest `filterwarnings` "ignore" entry) and for the processes
the tests start (their stderr, `deprecations_in`)."""

import re

LIBRARIES = ("transformers", "torch", "peft", "accelerate", "trl")
DEPRECATION = re.compile(r"deprecat|will be removed|removal in v\d", re.IGNORECASE)

# Accepted deprecations: a regular expression matched at the start of the message (no ':', pytest's separator) and
# why we cannot or need not act on it yet.
ACCEPTED = {
    r"`broadcast_buffers` is deprecated\. Use `forward_sync_buffers` instead": (
        "torch 2.13's DistributedDataParallel. Ours (`default-moe train` sets TrainingArguments.ddp_broadcast_buffers="
        "False; the DDP tests compare both settings) must never overwrite a rank's EMA buffers with rank 0's, and "
        "torch has no replacement yet: its own message says to keep `broadcast_buffers=False` until "
        "`init_sync_buffers` is available (`forward_sync_buffers=False` still syncs at init)."
    ),
    r"`is_gradient_checkpointing` is deprecated and will be removed in v6": (
        "transformers 5.25 renamed it `is_activation_checkpointing`; peft 0.21.2 (the newest) still reads the old "
        "property when it wraps a model (peft_model.py, `get_peft_model`). Inside peft; our code uses neither name."
    ),
    r"`torch\.jit\.script_method` is deprecated": (
        "raised inside torch 2.13 itself when a module is imported: torch/utils/mkldnn.py defines MkldnnLinear with "
        "`@torch.jit.script_method`, and torch.fx.experimental.optimization imports it, which inductor's "
        "pre-grad passes import on the first `torch.compile(backend='inductor')` and vLLM 0.32 imports with "
        "`vllm.LLM`. Our code uses no torch.jit."
    ),
    r"`gradient_checkpointing` is deprecated and will be removed in v6": (
        "raised by transformers 5.25's TrainingArguments when TRL 1.16's configs are built as their users build them: "
        "TRL's own base config (trl/trainer/base_config.py) defaults the old `gradient_checkpointing` field to True. "
        "Inside TRL's defaults; our code passes the running release's name (tests/tiny_models.checkpointing_argument)."
    ),
    r"`gradient_checkpointing_(enable|disable)` is deprecated and will be removed in v6": (
        "called inside TRL 1.16: DPOTrainer's reference pass turns checkpointing off and on again with the old "
        "method names (trl/models/utils.py, `disable_gradient_checkpointing`)."
    ),
    r"Passing `generation_config` together with generation-related arguments": (
        "logged by transformers 5.20's assisted decoding: its candidate generator calls the assistant's `generate` "
        "with both (candidate_generator.py); our test passes only `max_new_tokens`, `do_sample` and "
        "`assistant_model`."
    ),
}


def accepted(message: str) -> bool:
    return any(re.match(pattern, message) for pattern in ACCEPTED)


def deprecations_in(stderr: str) -> list[str]:
    """Lines of a process's stderr that are a Python FutureWarning/DeprecationWarning as printed
    ("file:line: FutureWarning: message") or a deprecation that transformers logged ("[transformers] message"),
    except the accepted ones."""
    found = []
    for line in stderr.splitlines():
        warned = re.search(r": (?:Future|Deprecation|PendingDeprecation)Warning: (.*)", line)
        logged = re.match(r"\[transformers\] (.*)", line)
        message = warned.group(1) if warned else logged.group(1) if logged and DEPRECATION.search(line) else None
        if message is not None and not accepted(message):
            found.append(line)
    return found
