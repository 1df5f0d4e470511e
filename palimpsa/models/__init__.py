"""Hugging Face causal language models built on the Palimpsa layers (registered with the Auto classes)."""

from palimpsa.models.gated_deltanet import GatedDeltaNetForCausalLM, GatedDeltaNetLMConfig  # noqa: F401
from palimpsa.models.meta_mamba2 import MetaMamba2Cache, MetaMamba2Config, MetaMamba2ForCausalLM, MetaMamba2Model  # noqa: F401
from palimpsa.models.palimpsa import PalimpsaCache, PalimpsaConfig, PalimpsaForCausalLM, PalimpsaModel  # noqa: F401
