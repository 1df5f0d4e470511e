"""Configuration of the Gated DeltaNet causal LM (``model_type`` "gated_deltanet_lm")."""

from __future__ import annotations

from transformers import PretrainedConfig

from palimpsa.models.auto_module import SavesAutoMap


class GatedDeltaNetLMConfig(SavesAutoMap, PretrainedConfig):
    """Sizes of the Gated DeltaNet LM (V = head_dim * expand_v per head; MLP ratio ``hidden_ratio``)."""

    model_type = "gated_deltanet_lm"
    auto_classes = {"AutoConfig": "GatedDeltaNetLMConfig", "AutoModelForCausalLM": "GatedDeltaNetForCausalLM"}

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_heads: int = 12, head_dim: int = 64, expand_v: int = 1, conv_size: int = 4,
                 hidden_ratio: float = 4, norm_eps: float = 1e-6, initializer_range: float = 0.02,
                 tie_word_embeddings: bool = True, **kwargs):
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("expand_v", expand_v), ("conv_size", conv_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GatedDeltaNetLMConfig.{name} must be a positive int, got {value!r}")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_heads, self.head_dim, self.expand_v, self.conv_size = num_heads, head_dim, expand_v, conv_size
        self.hidden_ratio, self.norm_eps, self.initializer_range = hidden_ratio, norm_eps, initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
