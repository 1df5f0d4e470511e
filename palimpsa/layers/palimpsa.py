"""The Palimpsa token mixer (spec section 4.1), a drop-in for a Gated DeltaNet layer.

For an input u [B, T, d] and H heads of key size K and value size V::

    q, k  = l2norm_per_head(silu(conv(W_q u))), l2norm_per_head(silu(conv(W_k u)))      [B, T, H, K]
    x     = silu(conv(W_x u))                                                          [B, T, H, V]
    s     = sigmoid(W_s u)                          input gate, one per head            [B, T, H]
    v     = s * x
    dt    = softplus(W_dt u + dt_bias);  g = -dt * exp(A_log)                           [B, T, H]
    beta  = sigmoid(W_up W_down u) * softplus(c) * s    importance gate (0 without metaplasticity)
    o     = palimpsa(q, k, v, g, beta, prior=I0 = 1)                                    [B, T, H, V]
    out   = W_o gated_rmsnorm(o + D * x, gate=W_gate u)

``metaplasticity=False`` is the ablation "NotPalimpsa": beta = 0, so the importance stays at the prior and the
layer is a simple gated linear attention (divided by the prior, 1).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from palimpsa.layers.checks import binary_mask, check_has_tokens
from palimpsa.layers.modules import (
    GatedRMSNorm,
    RecurrentLayerCache,
    ShortConvolution,
    add_scaled_skip,
    l2_normalize,
    recomputed_in_backward,
)
from palimpsa.ops import chunk_palimpsa, palimpsa_step
from palimpsa.ops.checks import check_cu_seqlens

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
A_MAX = 16.0


def sample_A_log(num_heads: int, device=None) -> torch.Tensor:
    """log of the decay rates, A ~ U(0, 16): [H] float32."""
    A = torch.empty(num_heads, dtype=torch.float32, device=device).uniform_(0, A_MAX)
    return torch.log(A)


def sample_dt_bias(num_heads: int, device=None) -> torch.Tensor:
    """Inverse softplus of dt ~ log-uniform[1e-3, 0.1] (floored at 1e-4): [H] float32."""
    u = torch.rand(num_heads, dtype=torch.float32, device=device)
    dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Palimpsa(nn.Module):
    """Palimpsa token mixer.

    Args:
        hidden_size: d, the model width.
        num_heads: H.
        head_k_dim: K (default d // H).
        head_v_dim: V (default K).
        importance_rank: r, rank of the importance gate (default ceil(d / 16)).
        importance_groups: G, importance gates per head and token, each shared by V / G consecutive value
            channels (default V: one per channel, the paper's model).  G < V is exact and runs as gated linear
            attention on tensor cores (spec 5.2).
        conv_size: kernel of the causal depthwise convolutions on q, k and x.
        metaplasticity: False gives beta = 0 ("NotPalimpsa"); the gate parameters are then not created.
        importance_scale_init: initial value of c (the gate factor is softplus(c)).
        norm_eps: epsilon of the gated output RMSNorm.
        layer_idx: index of the layer in its model.

    Parameters named ``A_log`` [H] and ``dt_bias`` [H] hold the forgetting rates; ``D`` [H] the skip; the buffer
    ``prior`` [H] the prior precision I0 (1, not trained).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        head_k_dim: Optional[int] = None,
        head_v_dim: Optional[int] = None,
        importance_rank: Optional[int] = None,
        importance_groups: Optional[int] = None,
        conv_size: int = 4,
        metaplasticity: bool = True,
        importance_scale_init: float = 1.0,
        norm_eps: float = 1e-5,
        layer_idx: Optional[int] = None,
    ):
        super().__init__()
        _positive_int("hidden_size", hidden_size)
        _positive_int("num_heads", num_heads)
        if head_k_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}) "
                                 "when head_k_dim is not given")
            head_k_dim = hidden_size // num_heads
        _positive_int("head_k_dim", head_k_dim)
        head_v_dim = _positive_int("head_v_dim", head_k_dim if head_v_dim is None else head_v_dim)
        importance_rank = math.ceil(hidden_size / 16) if importance_rank is None else importance_rank
        _positive_int("importance_rank", importance_rank)
        importance_groups = head_v_dim if importance_groups is None else importance_groups
        _positive_int("importance_groups", importance_groups)
        if head_v_dim % importance_groups:
            raise ValueError(f"importance_groups ({importance_groups}) must divide head_v_dim ({head_v_dim})")
        _positive_int("conv_size", conv_size)
        if not isinstance(metaplasticity, bool):
            raise TypeError(f"metaplasticity must be a bool, got {type(metaplasticity).__name__}")
        if not math.isfinite(float(importance_scale_init)):
            raise ValueError(f"importance_scale_init must be finite, got {importance_scale_init!r}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_k_dim = head_k_dim
        self.head_v_dim = head_v_dim
        self.importance_rank = importance_rank
        self.importance_groups = importance_groups
        self.conv_size = conv_size
        self.metaplasticity = metaplasticity
        self.importance_scale_init = float(importance_scale_init)
        self.layer_idx = layer_idx
        key_dim, value_dim = num_heads * head_k_dim, num_heads * head_v_dim

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.q_conv1d = ShortConvolution(key_dim, conv_size, activation="silu")
        self.k_conv1d = ShortConvolution(key_dim, conv_size, activation="silu")
        self.v_conv1d = ShortConvolution(value_dim, conv_size, activation="silu")

        self.input_gate_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.dt_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True

        if metaplasticity:
            self.importance_down_proj = nn.Linear(hidden_size, importance_rank, bias=False)
            self.importance_up_proj = nn.Linear(importance_rank, num_heads * importance_groups, bias=False)
            self.importance_scale = nn.Parameter(torch.empty(num_heads))
            self.importance_scale._no_weight_decay = True
        else:
            self.importance_down_proj = self.importance_up_proj = self.importance_scale = None
        # prior precision I0 = exp(0) = 1, a buffer: saved with the weights, never trained
        self.register_buffer("prior", torch.ones(num_heads))

        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps, norm_before_gate=True)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.reset_palimpsa_parameters()

    @torch.no_grad()
    def reset_palimpsa_parameters(self) -> None:
        """Initialise the parameters that are not plain projections (spec 4.1)."""
        if self.A_log.device.type == "meta":
            return
        self.A_log.copy_(sample_A_log(self.num_heads))
        self.dt_bias.copy_(sample_dt_bias(self.num_heads))
        self.D.fill_(1.0)
        if self.metaplasticity:
            self.importance_scale.fill_(self.importance_scale_init)
            bound = self.importance_rank ** -0.5  # as the reference code: uniform(+-r^-1/2)
            self.importance_up_proj.weight.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_k_dim={self.head_k_dim}, "
                f"head_v_dim={self.head_v_dim}, importance_rank={self.importance_rank}, "
                f"importance_groups={self.importance_groups}, "
                f"metaplasticity={self.metaplasticity}, layer_idx={self.layer_idx}")

    def _query_or_key(self, conv: ShortConvolution, projected: torch.Tensor, state: Optional[torch.Tensor],
                      keep: bool, cu_seqlens: Optional[torch.Tensor]):
        """Short convolution, SiLU and per-head L2 normalisation of a projected query or key [B, T, H*K]:
        ([B, T, H, K] in the projection's dtype, the convolution's state for the next call or None)."""
        y, new_state = conv(projected, state, keep, cu_seqlens)
        return l2_normalize(rearrange(y, "b t (h k) -> b t h k", h=self.num_heads), projected.dtype), new_state

    def _value(self, projected: torch.Tensor, state: Optional[torch.Tensor], keep: bool,
               cu_seqlens: Optional[torch.Tensor]):
        """Short convolution and SiLU of the projected values [B, T, H*V]: ([B, T, H, V], the state or None)."""
        y, new_state = self.v_conv1d(projected, state, keep, cu_seqlens)
        return rearrange(y, "b t (h v) -> b t h v", h=self.num_heads), new_state

    def _check_inputs(self, hidden_states, attention_mask, cache, cu_seqlens) -> Optional[torch.Tensor]:
        """Validate the forward arguments; return the padding mask [B, T] in the input dtype, or None."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 \
                or hidden_states.shape[-1] != self.hidden_size:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"hidden_states must have shape [B, T, hidden_size={self.hidden_size}], got {shape}")
        check_has_tokens(hidden_states)
        B, T, _ = hidden_states.shape
        if cache is not None and not isinstance(cache, RecurrentLayerCache):
            raise TypeError(f"cache must be a RecurrentLayerCache, got {type(cache).__name__}")
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={B}")
            if cache is not None or attention_mask is not None:
                raise ValueError("cu_seqlens cannot be combined with a cache or an attention_mask")
            # its values here, not in the op (a device sync); in a compiled block the model has checked them
            check_cu_seqlens(cu_seqlens, T, check_values=not torch.compiler.is_compiling())
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must have shape [B, T] = [{B}, {T}] (1 = token, 0 = padding), "
                             f"got {shape}")
        # generate() passes the mask of the whole sequence so far: the last T columns are this call's tokens
        return binary_mask(attention_mask[:, -T:]).to(hidden_states.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[RecurrentLayerCache] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        output_variance: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mix tokens.

        Args:
            hidden_states: u [B, T, d].
            attention_mask: [B, T] (or [B, T' >= T], of which the last T columns count), 1 = token,
                0 = padding.  Padded tokens leave the state and the convolutions untouched, so a left-padded
                row gives the outputs of the unpadded sequence.
            cache: per-layer decoding state, read and updated in place (conv inputs and (mu, I)).
            cu_seqlens: [N + 1] offsets of packed sequences (B == 1); nothing crosses a boundary.
            output_variance: also return the posterior variance of the op's output.

        Returns:
            (output [B, T, d], variance [B, T, H, V] float or None).
        """
        mask = self._check_inputs(hidden_states, attention_mask, cache, cu_seqlens)
        u = hidden_states
        B, T, _ = u.shape
        H = self.num_heads

        q_in, k_in, x_in = self.q_proj(u), self.k_proj(u), self.v_proj(u)
        if mask is not None:  # the convolutions must not see padded tokens
            q_in, k_in, x_in = (t * mask[..., None] for t in (q_in, k_in, x_in))
        conv_states = cache.conv_states if cache is not None else {}
        keep = cache is not None
        # The op takes q, k, v, beta in one dtype: that of the projections (bf16 under autocast, where
        # F.normalize would otherwise hand back float32 while the values stay bf16).
        op_dtype = x_in.dtype
        # in a compiled block (training), the backward recomputes these instead of keeping their float32 parts
        q, q_state = recomputed_in_backward(self._query_or_key, self.q_conv1d, q_in, conv_states.get("q"), keep,
                                            cu_seqlens)
        k, k_state = recomputed_in_backward(self._query_or_key, self.k_conv1d, k_in, conv_states.get("k"), keep,
                                            cu_seqlens)
        x, x_state = recomputed_in_backward(self._value, x_in, conv_states.get("v"), keep, cu_seqlens)

        # gates in float32 (float64 for float64 inputs), whatever the input dtype
        fp = torch.promote_types(u.dtype, torch.float32)
        input_gate = torch.sigmoid(self.input_gate_proj(u).to(fp))  # s [B, T, H]
        # [B, T, H, V] products in the projections' dtype (no float32 copies of them): per-head factors are cast
        v = (x * input_gate[..., None].to(x.dtype)).to(op_dtype)
        dt = F.softplus(self.dt_proj(u).to(fp) + self.dt_bias.to(fp))
        g = -dt * torch.exp(self.A_log.to(fp))  # log decay [B, T, H]
        if self.metaplasticity:
            gate = torch.sigmoid(self.importance_up_proj(self.importance_down_proj(u)))
            gate = rearrange(gate, "b t (h g) -> b t h g", h=H)  # [B, T, H, G]
            factor = F.softplus(self.importance_scale.to(fp)) * input_gate  # [B, T, H]
            beta = (gate * factor[..., None].to(gate.dtype)).to(op_dtype)
        else:
            beta = None  # NotPalimpsa: the op runs as gated linear attention over the prior
        prior = self.prior
        if beta is None and cache is None and not output_variance:
            # NotPalimpsa in training: q / I0 here (fused with q's normalisation in a compiled block) and the
            # op told that its prior is 1, so that its rescaled query is q itself (no copy, no extra kernels)
            q = (q.to(fp) * (1.0 / self.prior.to(fp))[:, None]).to(op_dtype)
            prior = 1.0
        if mask is not None:  # padded tokens: alpha = 1, nothing written, importance unchanged
            g = g * mask[..., None].to(fp)
            k, v = k * mask[..., None, None], v * mask[..., None, None]
            beta = beta * mask[..., None, None] if beta is not None else None

        variance = None
        if cache is not None and T == 1:
            o, variance = self._decode_step(q, k, v, g, beta, cache, output_variance)
        else:
            initial = cache.recurrent_state if cache is not None else None
            outputs = chunk_palimpsa(q, k, v, g, beta, prior=prior, initial_state=initial,
                                     output_final_state=cache is not None, output_variance=output_variance,
                                     cu_seqlens=cu_seqlens, check_values=False)  # valid by construction
            o, variance, final = outputs if output_variance else (outputs[0], None, outputs[1])
            if cache is not None:
                cache.recurrent_state = final
        if cache is not None:
            cache.conv_states = {"q": q_state, "k": k_state, "v": x_state}
            cache.seen_tokens += T

        o = add_scaled_skip(o, x, self.D, u.dtype)  # o + D * x, in float32
        o = self.o_norm(o, rearrange(self.g_proj(u), "b t (h v) -> b t h v", h=H))
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)")), variance

    def _decode_step(self, q, k, v, g, beta, cache: RecurrentLayerCache, output_variance: bool):
        """One token with the in-place step op.  q, k [B, 1, H, K]; v [B, 1, H, V]; beta [B, 1, H, G] or None;
        g [B, 1, H]."""
        B, _, H, K = q.shape
        if cache.recurrent_state is None:
            state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            mu = torch.zeros(B, H, K, self.head_v_dim, device=q.device, dtype=state_dtype)
            imp = self.prior.to(state_dtype)[None, :, None, None].expand_as(mu).clone()
            cache.recurrent_state = (mu, imp)
        elif cache.recurrent_state[0].requires_grad or cache.recurrent_state[1].requires_grad:
            # the step op updates the state in place: never on tensors an autograd graph still needs
            cache.recurrent_state = tuple(s.detach().clone() for s in cache.recurrent_state)
        out = palimpsa_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0] if beta is not None else None,
                            cache.recurrent_state,
                            prior=self.prior, output_variance=output_variance,
                            check_values=False)  # g <= 0, beta >= 0 by construction: no device sync
        if output_variance:
            return out[0][:, None], out[1][:, None]
        return out[:, None], None
