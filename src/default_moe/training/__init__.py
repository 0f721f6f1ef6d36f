"""Training Default MoE models: built-in corpus and tokenizer, Trainer runs, router monitoring.

`DefaultMoeCallback` is the public piece for users' own `transformers.Trainer` runs, and `default_moe.training.trl`
(which needs `trl`) has TRL's SFT and DPO trainers with Default MoE's router losses; the `default-moe train`,
`compare` and `demo` commands are built from the modules of this package.
"""

from .callback import DefaultMoeCallback

__all__ = ["DefaultMoeCallback"]
