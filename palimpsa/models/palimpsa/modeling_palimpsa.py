"""Palimpsa causal language model with the Hugging Face contract (from_pretrained, generate with a cache).

    tokens -> embeddings -> N x [ h += Palimpsa(RMSNorm(h));  h += SwiGLU(RMSNorm(h)) ] -> RMSNorm -> lm_head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from palimpsa.models._compat import cache_output_kwargs, output_cache, resolve_cache_kwarg
from palimpsa.models.checks import check_input_ids
from palimpsa.ops.checks import check_cu_seqlens

from palimpsa.layers.checks import binary_mask
from palimpsa.layers.modules import RecurrentLayerCache, RMSNorm, SwiGLUMLP, compiled_block_forward
from palimpsa.layers.palimpsa import Palimpsa, sample_A_log, sample_dt_bias
from palimpsa.models.lm_head import causal_lm_head
from palimpsa.models.palimpsa.configuration_palimpsa import PalimpsaConfig


class PalimpsaCache(Cache):
    """Decoding cache for ``generate()``: one :class:`RecurrentLayerCache` per layer (conv inputs and (mu, I)).

    Its memory does not grow with the sequence: per layer [B, H, K, V] x 2 floats plus the last conv inputs.
    """

    def __init__(self, config: Optional[PalimpsaConfig] = None, num_layers: Optional[int] = None):
        if (config is None) == (num_layers is None):
            raise ValueError("PalimpsaCache needs exactly one of config or num_layers")
        num_layers = config.num_hidden_layers if config is not None else num_layers
        super().__init__(layers=[RecurrentLayerCache() for _ in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions absorbed so far (padding included)."""
        return self.layers[layer_idx].seen_tokens if layer_idx < len(self.layers) else 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1  # no limit

    def has_previous_state(self, layer_idx: Optional[int] = None, state_idx: Optional[int] = None) -> bool:
        return self.layers[-1 if layer_idx is None else layer_idx].has_previous_state

    def update(self, *args, **kwargs):
        raise NotImplementedError("PalimpsaCache holds recurrent states; attention key/value updates do not apply")


@dataclass
class PalimpsaModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus ``variances``: one [B, T, H, V] tensor per layer when requested.

    The cache field is transformers' own (``past_key_values`` in 5.17, ``cache`` later); see
    :mod:`palimpsa.models._compat`."""

    variances: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class PalimpsaCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``variances``: one [B, T, H, V] tensor per layer when requested."""

    variances: Optional[Tuple[torch.Tensor, ...]] = None


class PalimpsaBlock(GradientCheckpointingLayer):
    """Pre-norm Palimpsa mixer with a residual, then (optionally) a pre-norm SwiGLU MLP with a residual."""

    def __init__(self, config: PalimpsaConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = Palimpsa(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            head_k_dim=config.head_dim,
            head_v_dim=config.head_v_dim,
            importance_rank=config.importance_rank,
            importance_groups=getattr(config, "importance_groups", None),
            conv_size=config.conv_size,
            metaplasticity=config.metaplasticity,
            importance_scale_init=config.importance_scale_init,
            norm_eps=config.norm_eps,
            layer_idx=layer_idx,
        )
        if config.has_mlp:
            self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
            self.mlp = SwiGLUMLP(config.hidden_size, config.hidden_ratio or 4, config.intermediate_size)
        else:
            self.mlp_norm = self.mlp = None

    @compiled_block_forward
    def forward(self, hidden_states, attention_mask=None, cache=None, cu_seqlens=None, output_variance=False):
        """hidden_states [B, T, d] -> ([B, T, d], variance [B, T, H, V] or None); see :class:`Palimpsa`."""
        mixed, variance = self.mixer(self.mixer_norm(hidden_states), attention_mask=attention_mask, cache=cache,
                                     cu_seqlens=cu_seqlens, output_variance=output_variance)
        hidden_states = hidden_states + mixed
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, variance


class PalimpsaPreTrainedModel(PreTrainedModel):
    config_class = PalimpsaConfig
    config: PalimpsaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PalimpsaBlock"]
    _is_stateful = True  # a recurrent state cannot be rolled back (no assisted decoding)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own PalimpsaCache on the first call with use_cache

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Projections and embeddings ~ N(0, initializer_range), norms = 1; Palimpsa's own parameters per spec 4.1.

        Uses ``transformers.initialization`` so that weights loaded by ``from_pretrained`` are never overwritten.
        """
        super()._init_weights(module)
        if isinstance(module, Palimpsa):
            init.copy_(module.A_log, sample_A_log(module.num_heads, device=module.A_log.device))
            init.copy_(module.dt_bias, sample_dt_bias(module.num_heads, device=module.dt_bias.device))
            init.ones_(module.D)
            init.ones_(module.prior)
            if module.metaplasticity:
                init.constant_(module.importance_scale, module.importance_scale_init)
                bound = module.importance_rank ** -0.5  # as the reference code
                init.uniform_(module.importance_up_proj.weight, -bound, bound)


class PalimpsaModel(PalimpsaPreTrainedModel):
    """Embeddings and Palimpsa blocks; returns the final normalised hidden states."""

    def __init__(self, config: PalimpsaConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([PalimpsaBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[PalimpsaCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        output_variance: bool = False,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[PalimpsaCache] = None,
        **kwargs,
    ) -> Union[PalimpsaModelOutput, tuple]:
        """Run the blocks.

        Args:
            input_ids: [B, T] tokens (or inputs_embeds [B, T, d]).
            attention_mask: [B, T] (or the mask of the whole sequence so far, [B, T' >= T]); 1 = token,
                0 = padding (left padding gives the unpadded results).
            past_key_values: a :class:`PalimpsaCache`, read and updated in place (``cache`` is another name for
                it: the one newer ``transformers`` releases use).
            use_cache: make a cache when none is given (default: config.use_cache in eval mode, and never
                with cu_seqlens).
            cu_seqlens: [N + 1] offsets of packed sequences (B == 1); nothing crosses a boundary.
            output_variance: also return each layer's posterior output variance [B, T, H, V].
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, d]")
        check_input_ids(input_ids)
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        past_key_values = resolve_cache_kwarg(cache, past_key_values)
        if past_key_values is not None and not isinstance(past_key_values, PalimpsaCache):
            raise TypeError(f"past_key_values must be a PalimpsaCache, got {type(past_key_values).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and cu_seqlens is None
        if use_cache and cu_seqlens is not None:
            raise ValueError("use_cache cannot be combined with cu_seqlens (packed sequences)")
        if self.gradient_checkpointing and self.training and past_key_values is not None:
            raise ValueError("a cache cannot be used with gradient checkpointing (its states would update twice)")
        if use_cache and past_key_values is None:
            past_key_values = PalimpsaCache(self.config)
        output_hidden_states = output_hidden_states if output_hidden_states is not None \
            else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if cu_seqlens is not None:  # once here (one device sync); compiled blocks do not read them again
            cu_seqlens = check_cu_seqlens(cu_seqlens, hidden_states.shape[1], hidden_states.shape[0])
        if isinstance(attention_mask, torch.Tensor):
            attention_mask = binary_mask(attention_mask)  # checked once here, not in every layer
        all_hidden_states = () if output_hidden_states else None
        variances = () if output_variance else None
        for i, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_cache = past_key_values.layers[i] if past_key_values is not None else None
            hidden_states, variance = block(hidden_states, attention_mask=attention_mask, cache=layer_cache,
                                            cu_seqlens=cu_seqlens, output_variance=output_variance)
            if output_variance:
                variances += (variance,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = PalimpsaModelOutput(last_hidden_state=hidden_states, **cache_output_kwargs(past_key_values),
                                     hidden_states=all_hidden_states, variances=variances)
        return output if return_dict else output.to_tuple()


class PalimpsaForCausalLM(PalimpsaPreTrainedModel, GenerationMixin):
    """Palimpsa language model: :class:`PalimpsaModel` and a (tied) output projection."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: PalimpsaConfig):
        super().__init__(config)
        self.model = PalimpsaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        past_key_values: Optional[PalimpsaCache] = None,
        use_cache: Optional[bool] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        output_variance: bool = False,
        return_dict: Optional[bool] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        cache: Optional[PalimpsaCache] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        skip_logits: Optional[bool] = None,
        **kwargs,
    ) -> Union[PalimpsaCausalLMOutput, tuple]:
        """Logits [B, T, vocab] (the last ``logits_to_keep`` positions when > 0) and, with labels [B, T], the
        next-token cross-entropy (labels are shifted inside; -100 is ignored).  ``shift_labels`` [B, T] are
        targets already shifted (instead of labels); ``num_items_in_batch`` makes the loss a sum divided by it.

        ``skip_logits`` (default: training with labels): compute the loss from the hidden states and the output
        weight a chunk of tokens at a time, and return no logits, so that no [B, T, vocab] float32 logits are
        ever stored (:func:`palimpsa.layers.modules.causal_lm_loss`).  Other arguments: see
        :meth:`PalimpsaModel.forward`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = resolve_cache_kwarg(cache, past_key_values)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                             output_variance=output_variance, output_hidden_states=output_hidden_states,
                             return_dict=True)
        hidden_states = outputs.last_hidden_state
        loss, logits = causal_lm_head(self, hidden_states, labels, shift_labels, skip_logits, logits_to_keep,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        output = PalimpsaCausalLMOutput(loss=loss, logits=logits, **cache_output_kwargs(output_cache(outputs)),
                                        hidden_states=outputs.hidden_states, variances=outputs.variances)
        return output if return_dict else output.to_tuple()
