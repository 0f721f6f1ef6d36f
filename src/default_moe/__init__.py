"""Default MoE as a Hugging Face Transformers architecture.

Importing this package registers `DefaultMoeConfig` / `DefaultMoeForCausalLM` with the Auto classes, and marks
them for `save_pretrained` to write `auto_map` and copy the two model files next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_default_moe import DefaultMoeConfig
from .modeling_default_moe import DefaultMoeForCausalLM, DefaultMoeModel, DefaultMoePreTrainedModel

AutoConfig.register(DefaultMoeConfig.model_type, DefaultMoeConfig, exist_ok=True)
AutoModel.register(DefaultMoeConfig, DefaultMoeModel, exist_ok=True)
AutoModelForCausalLM.register(DefaultMoeConfig, DefaultMoeForCausalLM, exist_ok=True)
DefaultMoeConfig.register_for_auto_class()
DefaultMoeModel.register_for_auto_class("AutoModel")
DefaultMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = ["DefaultMoeConfig", "DefaultMoeForCausalLM", "DefaultMoeModel", "DefaultMoePreTrainedModel"]
