"""Palimpsa causal language model, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from palimpsa.models.palimpsa.configuration_palimpsa import PalimpsaConfig
from palimpsa.models.palimpsa.modeling_palimpsa import (
    PalimpsaCache,
    PalimpsaCausalLMOutput,
    PalimpsaForCausalLM,
    PalimpsaModel,
    PalimpsaPreTrainedModel,
)

AutoConfig.register(PalimpsaConfig.model_type, PalimpsaConfig, exist_ok=True)
AutoModel.register(PalimpsaConfig, PalimpsaModel, exist_ok=True)
AutoModelForCausalLM.register(PalimpsaConfig, PalimpsaForCausalLM, exist_ok=True)

__all__ = ["PalimpsaCache", "PalimpsaCausalLMOutput", "PalimpsaConfig", "PalimpsaForCausalLM", "PalimpsaModel",
           "PalimpsaPreTrainedModel"]
