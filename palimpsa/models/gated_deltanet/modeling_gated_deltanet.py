"""A Gated DeltaNet language model: the baseline the training comparisons run against Palimpsa.

Same skeleton as the Palimpsa LM (embeddings -> N x [pre-RMSNorm token mixer + residual, pre-RMSNorm SwiGLU +
residual] -> RMSNorm -> tied head), with :class:`palimpsa.layers.gated_deltanet.GatedDeltaNet` as the mixer.
Registered with the Auto classes as ``gated_deltanet_lm`` (on ``import palimpsa.models``), so
``palimpsa train --model gated-deltanet-small`` and ``save_pretrained`` / ``from_pretrained`` work.  Training and
evaluation only: no decoding cache.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput

from palimpsa.layers.gated_deltanet import GatedDeltaNet, fla_available
from palimpsa.layers.modules import RMSNorm, SwiGLUMLP, compiled_block_forward
from palimpsa.models.gated_deltanet.configuration_gated_deltanet import GatedDeltaNetLMConfig
from palimpsa.models.lm_head import causal_lm_head


def run_per_sequence(mixer: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Apply a causal token mixer to each packed sequence separately, exactly, by right padding.

    hidden_states: [1, T, d] packed; cu_seqlens: [N + 1] offsets.  The sequences become a [N, max_len, d]
    batch padded at the end (padding after a token cannot change a causal mixer's output at that token).
    Returns [1, T, d].
    """
    offsets = cu_seqlens.long()
    lengths = offsets[1:] - offsets[:-1]
    total = hidden_states.shape[1]
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=hidden_states.device), lengths,
                                       output_size=total)
    position = torch.arange(total, device=hidden_states.device) - offsets[sequence]
    padded = hidden_states.new_zeros(len(lengths), int(lengths.max()), hidden_states.shape[-1])
    padded[sequence, position] = hidden_states[0]
    out = mixer(padded)[0]
    return out[sequence, position][None]


class GatedDeltaNetBlock(nn.Module):
    def __init__(self, config: GatedDeltaNetLMConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = GatedDeltaNet(config.hidden_size, num_heads=config.num_heads, head_k_dim=config.head_dim,
                                   head_v_dim=config.head_dim * config.expand_v, conv_size=config.conv_size,
                                   norm_eps=config.norm_eps, layer_idx=layer_idx)
        self.mixer_takes_cu_seqlens = "cu_seqlens" in inspect.signature(self.mixer.forward).parameters
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.hidden_ratio)

    @compiled_block_forward
    def forward(self, hidden_states: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T, d] -> [B, T, d]; with cu_seqlens (B == 1) nothing crosses a sequence boundary."""
        normed = self.mixer_norm(hidden_states)
        if cu_seqlens is None:
            mixed = self.mixer(normed)[0]
        elif self.mixer_takes_cu_seqlens and normed.is_cuda and fla_available():
            mixed = self.mixer(normed, cu_seqlens=cu_seqlens)[0]  # fla's variable-length kernel
        else:
            # the PyTorch delta rule walks chunks in sequence: all sequences side by side (padded) take as
            # many chunk steps as the longest one, instead of one sequence after another
            mixed = run_per_sequence(self.mixer, normed, cu_seqlens)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class GatedDeltaNetForCausalLM(PreTrainedModel):
    """Gated DeltaNet LM: forward(input_ids [B, T], cu_seqlens=None, labels=None) -> logits [B, T, vocab]."""

    config_class = GatedDeltaNetLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["GatedDeltaNetBlock"]
    _tied_weights_keys = {"lm_head.weight": "embeddings.weight"}

    def __init__(self, config: GatedDeltaNetLMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GatedDeltaNetBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Linear and embedding weights ~ N(0, initializer_range); the mixer keeps its own gate init.

        ``transformers.initialization`` leaves weights loaded by ``from_pretrained`` alone."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, 0.0, self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                shift_labels: Optional[torch.LongTensor] = None, skip_logits: Optional[bool] = None,
                num_items_in_batch=None, **unused) -> CausalLMOutput:
        """Logits [B, T, vocab]; with labels [B, T] also the mean next-token loss (shifted inside, -100 ignored).

        ``shift_labels`` [B, T]: targets already shifted (instead of labels); ``num_items_in_batch``: the loss
        is the sum divided by it.  ``skip_logits`` (default: training with labels): the loss is computed a chunk
        of tokens at a time from the hidden states and no logits are returned
        (:func:`palimpsa.layers.modules.causal_lm_loss`).
        attention_mask: only right padding (all ones, or ones then zeros) is accepted: a causal model then
        gives the unpadded result at every real token.
        """
        if attention_mask is not None:
            mask = attention_mask.bool()
            if (mask[:, 1:] & ~mask[:, :-1]).any():
                raise ValueError("GatedDeltaNetForCausalLM accepts only right padding in attention_mask")
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs input_ids of batch size 1, got {tuple(input_ids.shape)}")
        hidden_states = self.embeddings(input_ids)
        for block in self.layers:
            hidden_states = block(hidden_states, cu_seqlens)
        hidden_states = self.norm(hidden_states)
        loss, logits = causal_lm_head(self, hidden_states, labels, shift_labels, skip_logits,
                                      num_items_in_batch=num_items_in_batch)
        return CausalLMOutput(loss=loss, logits=logits)
