"""Configuration of the Palimpsa causal language model."""

from __future__ import annotations

import math
from typing import Optional

from transformers import PretrainedConfig

from palimpsa.models.auto_module import SavesAutoMap


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PalimpsaConfig.{name} must be a positive int, got {value!r}")


def _check_positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"PalimpsaConfig.{name} must be a finite number > 0, got {value!r}")


class PalimpsaConfig(SavesAutoMap, PretrainedConfig):
    """Sizes and switches of a Palimpsa language model (blocks of a Palimpsa mixer and a SwiGLU MLP).

    The defaults are the paper's 170M model (d = 768, 19 layers, 16 heads, K = V = 48, r = 48).

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: d, the model width.
        num_hidden_layers: number of blocks.
        num_heads: H heads per Palimpsa layer.
        head_dim: K, the key size of a head.
        expand_v: V = head_dim * expand_v, the value size of a head (must be a whole number).
        importance_rank: r, rank of the importance gate (default ceil(hidden_size / 16)).
        importance_groups: G, importance gates per head and token, each shared by V / G value channels
            (None: one per value channel, G = V, the paper's model; G < V runs as gated linear attention).
        metaplasticity: False gives "NotPalimpsa" (importance gate beta = 0).
        importance_scale_init: initial c of the importance gate factor softplus(c).
        conv_size: kernel of the short causal convolutions on q, k and x.
        hidden_ratio: MLP width ratio (SwiGLU of width 2/3 * ratio * d rounded up to 256); 0 or None: no MLP.
        intermediate_size: explicit MLP width (overrides hidden_ratio).
        norm_eps: epsilon of every RMSNorm.
        initializer_range: std of the normal initialisation of projections and embeddings.
        use_cache: return a decoding cache by default (inference).
        tie_word_embeddings: share the input embedding and the output projection.
    """

    model_type = "palimpsa"
    auto_classes = {"AutoConfig": "PalimpsaConfig", "AutoModel": "PalimpsaModel",
                    "AutoModelForCausalLM": "PalimpsaForCausalLM"}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 19,
        num_heads: int = 16,
        head_dim: int = 48,
        expand_v: float = 1,
        importance_rank: Optional[int] = None,
        importance_groups: Optional[int] = None,
        metaplasticity: bool = True,
        importance_scale_init: float = 1.0,
        conv_size: int = 4,
        hidden_ratio: Optional[float] = 4,
        intermediate_size: Optional[int] = None,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = 1,
        eos_token_id: Optional[int] = 2,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("conv_size", conv_size)):
            _check_positive_int(name, value)
        _check_positive_number("expand_v", expand_v)
        head_v_dim = head_dim * expand_v
        if abs(head_v_dim - round(head_v_dim)) > 1e-9:
            raise ValueError(f"PalimpsaConfig: head_dim * expand_v must be a whole number, got "
                             f"{head_dim} * {expand_v} = {head_v_dim}")
        if importance_rank is None:
            importance_rank = math.ceil(hidden_size / 16)
        _check_positive_int("importance_rank", importance_rank)
        if importance_groups is not None:
            _check_positive_int("importance_groups", importance_groups)
            if round(head_v_dim) % importance_groups:
                raise ValueError(f"PalimpsaConfig.importance_groups must divide the value head size "
                                 f"head_dim * expand_v = {round(head_v_dim)}, got {importance_groups}")
        if not isinstance(metaplasticity, bool):
            raise ValueError(f"PalimpsaConfig.metaplasticity must be true or false, got {metaplasticity!r}")
        if isinstance(importance_scale_init, bool) or not isinstance(importance_scale_init, (int, float)) \
                or not math.isfinite(importance_scale_init):
            raise ValueError(f"PalimpsaConfig.importance_scale_init must be a finite number, got "
                             f"{importance_scale_init!r}")
        if hidden_ratio not in (None, 0):
            _check_positive_number("hidden_ratio", hidden_ratio)
        if intermediate_size is not None:
            _check_positive_int("intermediate_size", intermediate_size)
        _check_positive_number("norm_eps", norm_eps)
        _check_positive_number("initializer_range", initializer_range)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.expand_v = expand_v
        self.importance_rank = importance_rank
        self.importance_groups = importance_groups
        self.metaplasticity = metaplasticity
        self.importance_scale_init = importance_scale_init
        self.conv_size = conv_size
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_v_dim(self) -> int:
        """V, the value size of a head."""
        return int(round(self.head_dim * self.expand_v))

    @property
    def has_mlp(self) -> bool:
        return self.intermediate_size is not None or self.hidden_ratio not in (None, 0)
