"""Meta-Mamba2 causal language model with the Hugging Face contract.

The module tree and parameter names are those of ``transformers``' ``Mamba2ForCausalLM``
(``backbone.embeddings``, ``backbone.layers.{i}.norm``, ``backbone.layers.{i}.mixer.*``, ``backbone.norm_f``,
``lm_head``), so a Mamba2 checkpoint loads into a Meta-Mamba2 with only the importance gate added
(see :mod:`palimpsa.convert`).  Decoding keeps a :class:`MetaMamba2Cache`: per layer the convolution's last
inputs and the Palimpsa state (mu, I), O(1) in the sequence length; ``generate()`` feeds one token per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from palimpsa.layers.checks import binary_mask
from palimpsa.layers.meta_mamba2 import MetaMamba2, MetaMamba2LayerCache
from palimpsa.layers.modules import compiled_block_forward
from palimpsa.models.lm_head import causal_lm_head
from palimpsa.models._compat import cache_output_kwargs, output_cache, resolve_cache_kwarg
from palimpsa.models.checks import check_input_ids
from palimpsa.ops.checks import check_cu_seqlens
from palimpsa.models.meta_mamba2.configuration_meta_mamba2 import MetaMamba2Config


class MetaMamba2Cache(Cache):
    """Decoding cache of a Meta-Mamba2 model: one :class:`MetaMamba2LayerCache` per layer.

    Each layer cache holds conv_state [B, conv_dim, conv_kernel - 1] and ssm_state (mu, I), each
    [B, H, state_size, head_dim] float32; the layers update them in place.  Memory does not grow with the
    number of tokens.  Rolling back (``crop``) is impossible for a recurrent state and raises.
    """

    is_compileable = False

    def __init__(self, config: Optional[MetaMamba2Config] = None, num_layers: Optional[int] = None):
        if num_layers is None:
            if config is None:
                raise ValueError("MetaMamba2Cache needs a config or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[MetaMamba2LayerCache() for _ in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens absorbed so far (padding included)."""
        return self.layers[layer_idx].seen_tokens if layer_idx < len(self.layers) else 0

    def has_previous_state(self, layer_idx: Optional[int] = None, state_idx: Optional[int] = None) -> bool:
        layer = self.layers[-1 if layer_idx is None else layer_idx]
        return layer.has_state

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1  # no sequence dimension

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> Tuple[int, int]:
        return query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.repeat_interleave(repeats)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a Meta-Mamba2 cache holds a recurrent state and cannot be rolled back (crop)")

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return all(layer.has_state for layer in self.layers)

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.has_state:
                return layer.ssm_state[0].shape[0]
        return -1

    @property
    def is_sliding(self) -> list:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list:
        return [True] * len(self.layers)


@dataclass
class MetaMamba2Output(BaseModelOutputWithPast):
    """last_hidden_state [B, T, d]; the cache (a :class:`MetaMamba2Cache`); hidden_states: per layer [B, T, d];
    variances: per layer [B, T, H, head_dim] (with ``output_variance``).

    The cache field is transformers' own (``past_key_values`` in 5.17, ``cache`` later; see
    :mod:`palimpsa.models._compat`); ``attentions`` is always None."""

    variances: Optional[Tuple[torch.FloatTensor, ...]] = None


@dataclass
class MetaMamba2CausalLMOutput(CausalLMOutputWithPast):
    """loss (scalar, with labels); logits [B, T, vocab]; the cache; hidden_states; variances (as
    :class:`MetaMamba2Output`)."""

    variances: Optional[Tuple[torch.FloatTensor, ...]] = None


class MetaMamba2RMSNorm(nn.Module):
    """RMSNorm computed in float32: x [..., d] -> weight * x / rms(x) in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float64 if dtype == torch.float64 else torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class MetaMamba2Block(GradientCheckpointingLayer):
    """Pre-RMSNorm Meta-Mamba2 mixer with a residual connection (kept in float32 when residual_in_fp32)."""

    def __init__(self, config: MetaMamba2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MetaMamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MetaMamba2(
            hidden_size=config.hidden_size,
            state_size=config.state_size,
            head_dim=config.head_dim,
            n_groups=config.n_groups,
            expand=config.expand,
            conv_kernel=config.conv_kernel,
            importance_rank=config.importance_rank,
            importance_groups=getattr(config, "importance_groups", None),
            metaplasticity=config.metaplasticity,
            importance_scale_init=config.importance_scale_init,
            norm_eps=config.layer_norm_epsilon,
            norm_per_group=getattr(config, "norm_per_group", False),
            use_bias=config.use_bias,
            use_conv_bias=config.use_conv_bias,
            time_step_min=config.time_step_min,
            time_step_max=config.time_step_max,
            time_step_floor=config.time_step_floor,
            time_step_limit=tuple(config.time_step_limit),
            layer_idx=layer_idx,
        )

    @compiled_block_forward
    def forward(self, hidden_states, attention_mask=None, cache=None, cu_seqlens=None, output_variance=False):
        """hidden_states [B, T, d] -> ([B, T, d], variance [B, T, H, P] or None)."""
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32 and residual.dtype != torch.float64:
            residual = residual.to(torch.float32)
        out, variance = self.mixer(hidden_states, attention_mask=attention_mask, cache=cache,
                                   cu_seqlens=cu_seqlens, output_variance=output_variance)
        return residual + out, variance


class MetaMamba2PreTrainedModel(PreTrainedModel):
    config_class = MetaMamba2Config
    config: MetaMamba2Config
    base_model_prefix = "backbone"
    _no_split_modules = ["MetaMamba2Block"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Mamba2's initialisation (as ``transformers``' ``Mamba2PreTrainedModel``) plus the importance gate."""
        super()._init_weights(module)
        if isinstance(module, MetaMamba2):
            heads = module.num_heads
            init.copy_(module.A_log, torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            log_min, log_max = math.log(module.time_step_min), math.log(module.time_step_max)
            dt = torch.exp(torch.rand(heads) * (log_max - log_min) + log_min).clamp(min=module.time_step_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            if module.metaplasticity:
                init.constant_(module.importance_scale, float(self.config.importance_scale_init))
            if self.config.rescale_prenorm_residual and not getattr(module.out_proj.weight, "_is_hf_initialized", False):
                module.out_proj.weight /= math.sqrt(self.config.num_hidden_layers)


class MetaMamba2Model(MetaMamba2PreTrainedModel):
    """Embeddings, ``num_hidden_layers`` Meta-Mamba2 blocks and a final RMSNorm."""

    def __init__(self, config: MetaMamba2Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MetaMamba2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = MetaMamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[MetaMamba2Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        output_variance: bool = False,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_params: Optional[MetaMamba2Cache] = None,
        cache: Optional[MetaMamba2Cache] = None,
        **kwargs,
    ) -> Union[Tuple, MetaMamba2Output]:
        """Run the backbone.

        Args:
            input_ids: [B, T] token ids (or ``inputs_embeds`` [B, T, d]).
            attention_mask: [B, T'] with T' >= T (1 = token, 0 = padding; left padding); its last T columns
                mask this call's tokens.
            past_key_values: a :class:`MetaMamba2Cache` to continue from and update in place
                (``cache``, the name of newer ``transformers`` releases, and ``cache_params`` are accepted as
                other names for it).
            use_cache: create a cache when none is given and return it (default: config.use_cache when not
                training).
            cu_seqlens: [N + 1] offsets of packed sequences (B == 1).
            output_variance: also return each layer's scan variance [B, T, H, head_dim].
        """
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = resolve_cache_kwarg(cache, past_key_values, cache_params)
        if use_cache is None:
            use_cache = past_key_values is not None or (self.config.use_cache and not self.training)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, d]")
        if inputs_embeds is None:
            check_input_ids(input_ids)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
            inputs_embeds = self.embeddings(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        if past_key_values is not None and not isinstance(past_key_values, MetaMamba2Cache):
            raise TypeError(f"past_key_values must be a MetaMamba2Cache, got {type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            past_key_values = MetaMamba2Cache(self.config)
        if not use_cache:
            past_key_values = None
        mask = self._layer_mask(attention_mask, batch, seq_len)
        if cu_seqlens is not None:  # once here (one device sync); compiled blocks do not read them again
            cu_seqlens = check_cu_seqlens(cu_seqlens, seq_len, batch)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        variances = () if output_variance else None
        for i, block in enumerate(self.layers):
            layer_cache = past_key_values.layers[i] if past_key_values is not None else None
            hidden_states, variance = block(hidden_states, attention_mask=mask, cache=layer_cache,
                                            cu_seqlens=cu_seqlens, output_variance=output_variance)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_variance:
                variances += (variance,)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = MetaMamba2Output(last_hidden_state=hidden_states, **cache_output_kwargs(past_key_values),
                                  hidden_states=all_hidden_states, variances=variances)
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _layer_mask(attention_mask, batch, seq_len):
        """The [B, T] padding mask of this call's tokens, or None when nothing is padded."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < seq_len:
            raise ValueError(f"attention_mask must have shape [B, T'] with B = {batch} and T' >= {seq_len}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = binary_mask(attention_mask[:, attention_mask.shape[1] - seq_len:])
        return None if bool(mask.all()) else mask


class MetaMamba2ForCausalLM(MetaMamba2PreTrainedModel, GenerationMixin):
    """Meta-Mamba2 backbone with a language-modelling head (tied to the embeddings when
    ``tie_word_embeddings``)."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: MetaMamba2Config):
        super().__init__(config)
        self.backbone = MetaMamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the model makes its own MetaMamba2Cache (a DynamicCache cannot hold the (mu, I) pair)
        return False

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        past_key_values: Optional[MetaMamba2Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        output_variance: bool = False,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        cache_params: Optional[MetaMamba2Cache] = None,
        cache: Optional[MetaMamba2Cache] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        skip_logits: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple, MetaMamba2CausalLMOutput]:
        """Logits [B, T, vocab] (float32, or float64 for a float64 model) and, with ``labels`` [B, T], the
        next-token cross-entropy (labels are shifted inside; -100 is ignored; ``shift_labels`` [B, T]: targets
        already shifted, instead of labels; ``num_items_in_batch``: the loss is a sum divided by it).  Other
        arguments as :meth:`MetaMamba2Model.forward`; ``logits_to_keep`` = n > 0 computes only the last n
        positions' logits.  ``skip_logits`` (default: training with labels): the loss is computed a chunk of
        tokens at a time from the hidden states and no logits are returned
        (:func:`palimpsa.layers.modules.causal_lm_loss`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = resolve_cache_kwarg(cache, past_key_values, cache_params)
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                                inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                                output_variance=output_variance, output_hidden_states=output_hidden_states,
                                return_dict=True)
        hidden_states = outputs.last_hidden_state
        loss, logits = causal_lm_head(self, hidden_states, labels, shift_labels, skip_logits, logits_to_keep,
                                      **kwargs)
        if logits is not None and logits.dtype != torch.float64:
            logits = logits.float()  # as transformers' Mamba2
        output = MetaMamba2CausalLMOutput(loss=loss, logits=logits, **cache_output_kwargs(output_cache(outputs)),
                                          hidden_states=outputs.hidden_states, variances=outputs.variances)
        return output if return_dict else output.to_tuple()
