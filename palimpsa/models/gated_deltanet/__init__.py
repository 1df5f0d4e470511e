"""Gated DeltaNet causal language model (the training baseline), registered with transformers' Auto classes on
import."""

from transformers import AutoConfig, AutoModelForCausalLM

from palimpsa.models.gated_deltanet.configuration_gated_deltanet import GatedDeltaNetLMConfig
from palimpsa.models.gated_deltanet.modeling_gated_deltanet import GatedDeltaNetForCausalLM, run_per_sequence

AutoConfig.register(GatedDeltaNetLMConfig.model_type, GatedDeltaNetLMConfig, exist_ok=True)
AutoModelForCausalLM.register(GatedDeltaNetLMConfig, GatedDeltaNetForCausalLM, exist_ok=True)

__all__ = ["GatedDeltaNetForCausalLM", "GatedDeltaNetLMConfig", "run_per_sequence"]
