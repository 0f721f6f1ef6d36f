"""Training Default MoE models: built-in corpus and tokenizer, Trainer runs, router monitoring, kill-safe resuming.

`DefaultMoeCallback` is the public piece for users' own `transformers.Trainer` runs, with `last_complete_checkpoint`
(the newest checkpoint a killed run left complete) and `PreemptionCallback` (a checkpoint at the next step on
SIGTERM); `default_moe.training.trl` (which needs `trl`) has TRL's SFT and DPO trainers with Default MoE's router
losses; the `default-moe train`, `compare` and `demo` commands are built from the modules of this package.
"""

from .callback import DefaultMoeCallback
from .checkpoints import PreemptionCallback, checkpoint_problems, last_complete_checkpoint

__all__ = ["DefaultMoeCallback", "PreemptionCallback", "checkpoint_problems", "last_complete_checkpoint"]
