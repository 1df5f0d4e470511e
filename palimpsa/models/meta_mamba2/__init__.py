"""Meta-Mamba2 (a Mamba2 made metaplastic) with the Hugging Face contract; registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from palimpsa.models.meta_mamba2.configuration_meta_mamba2 import MetaMamba2Config
from palimpsa.models.meta_mamba2.modeling_meta_mamba2 import (
    MetaMamba2Cache,
    MetaMamba2ForCausalLM,
    MetaMamba2Model,
    MetaMamba2PreTrainedModel,
)

AutoConfig.register(MetaMamba2Config.model_type, MetaMamba2Config, exist_ok=True)
AutoModel.register(MetaMamba2Config, MetaMamba2Model, exist_ok=True)
AutoModelForCausalLM.register(MetaMamba2Config, MetaMamba2ForCausalLM, exist_ok=True)

__all__ = ["MetaMamba2Config", "MetaMamba2Cache", "MetaMamba2Model", "MetaMamba2ForCausalLM",
           "MetaMamba2PreTrainedModel"]
