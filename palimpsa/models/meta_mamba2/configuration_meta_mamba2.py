"""Configuration of Meta-Mamba2 causal language models (Hugging Face ``PretrainedConfig``)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from transformers import PretrainedConfig

from palimpsa.models.auto_module import SavesAutoMap


class MetaMamba2Config(SavesAutoMap, PretrainedConfig):
    """A ``transformers`` ``Mamba2Config`` plus the importance gate of Meta-Mamba2.

    Every field of ``Mamba2Config`` is accepted with the same name and meaning, so a Mamba2 ``config.json``
    loads unchanged (``from_mamba2_config`` does it from an instance).  New fields:

    Args:
        metaplasticity: False makes every layer exactly Mamba2 (beta = 0, no gate parameters).
        importance_rank: rank r of the importance gate W_up W_down (default ceil(hidden_size / 16)).
        importance_groups: G gates per head and token, each shared by head_dim / G channels (None: head_dim).
        importance_scale_init: initial c_h of the gate factor softplus(c_h).
        norm_per_group: normalise the gated scan output per group of channels, as ``mamba_ssm`` and
            ``transformers`` >= 5.23 do for Mamba2; False (default) normalises over all channels, as
            ``transformers`` <= 5.22 does.  The same function when n_groups = 1.

    ``chunk_size`` and ``time_step_rank`` are kept for compatibility with Mamba2 configs; they do not change
    the computation (the Palimpsa op picks its own chunk size; Mamba2 does not use ``time_step_rank``).
    """

    model_type = "meta_mamba2"
    auto_classes = {"AutoConfig": "MetaMamba2Config", "AutoModel": "MetaMamba2Model",
                    "AutoModelForCausalLM": "MetaMamba2ForCausalLM"}

    def __init__(
        self,
        num_heads: int = 128,
        head_dim: int = 64,
        vocab_size: int = 32768,
        hidden_size: int = 4096,
        state_size: int = 128,
        num_hidden_layers: int = 64,
        layer_norm_epsilon: float = 1e-5,
        pad_token_id: Optional[int] = 1,
        bos_token_id: Optional[int] = 0,
        eos_token_id: Optional[Union[int, Sequence[int]]] = 2,
        expand: int = 2,
        conv_kernel: int = 4,
        n_groups: int = 8,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        hidden_act: str = "silu",
        initializer_range: float = 0.1,
        residual_in_fp32: bool = True,
        time_step_rank: Union[str, int] = "auto",
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_limit: Sequence[float] = (0.0, float("inf")),
        rescale_prenorm_residual: bool = False,
        use_cache: bool = True,
        chunk_size: int = 256,
        tie_word_embeddings: bool = False,
        metaplasticity: bool = True,
        importance_rank: Optional[int] = None,
        importance_scale_init: float = 1.0,
        importance_groups: Optional[int] = None,
        norm_per_group: bool = False,
        **kwargs,
    ):
        if hidden_size * expand != num_heads * head_dim:
            raise ValueError(f"hidden_size * expand ({hidden_size * expand}) must equal num_heads * head_dim "
                             f"({num_heads * head_dim})")
        if num_heads % n_groups:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of n_groups ({n_groups})")
        if not isinstance(norm_per_group, bool):
            raise ValueError(f"norm_per_group must be a bool, got {norm_per_group!r}")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the only activation Mamba2 mixers use), got {hidden_act!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_norm_epsilon = layer_norm_epsilon
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.n_groups = n_groups
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.residual_in_fp32 = residual_in_fp32
        self.time_step_rank = math.ceil(hidden_size / 16) if time_step_rank == "auto" else time_step_rank
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.time_step_limit = [float(x) for x in time_step_limit]
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.use_cache = use_cache
        self.chunk_size = chunk_size
        self.metaplasticity = metaplasticity
        self.importance_rank = math.ceil(hidden_size / 16) if importance_rank is None else importance_rank
        self.importance_scale_init = importance_scale_init
        if importance_groups is not None and (isinstance(importance_groups, bool)
                                              or not isinstance(importance_groups, int)
                                              or importance_groups < 1 or head_dim % importance_groups):
            raise ValueError(f"importance_groups must be a positive int dividing head_dim ({head_dim}), "
                             f"got {importance_groups!r}")
        self.importance_groups = importance_groups
        self.norm_per_group = norm_per_group
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_mamba2_config(cls, config, **overrides) -> "MetaMamba2Config":
        """Build a Meta-Mamba2 config from a ``transformers`` ``Mamba2Config`` (or its dict), plus ``overrides``."""
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            values.pop(key, None)
        values.update(overrides)
        return cls(**values)
