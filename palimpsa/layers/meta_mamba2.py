"""Meta-Mamba2: a Mamba2 mixer whose state-space scan is the Palimpsa op (spec section 4.2).

Everything around the scan is exactly Mamba2 (parameter names mirror ``transformers``' ``Mamba2Mixer``)::

    u [B, T, d] --in_proj--> z [B, T, H*P], xBC [B, T, H*P + 2*G*N], dt [B, T, H]
    xBC <- SiLU(causal depthwise conv(xBC));  x, B, C <- split(xBC)     (x [.., H, P]; B, C [.., G, N])
    dt  <- softplus(dt + dt_bias)                                      (clamped to time_step_limit)
    o   <- palimpsa(q=C, k=B (of the head's group), v=dt*x, g=-dt*exp(A_log), beta, scale=1, prior=1)
    y   <- o + D * x;   y <- RMSNorm(y * SiLU(z)) * norm.weight;   out <- out_proj(y)

with the importance gate (the only new parameters), per value channel::

    beta [B, T, H, P] = sigmoid(importance_up_proj(importance_down_proj(u))) * softplus(importance_scale)[h] * dt

Palimpsa's state is (mu, I) [B, H, N, P] (keys = Mamba2's state dimension N, values = the head dimension P).
With beta = 0 the importance stays at the prior 1 and mu is Mamba2's SSM state h: ``metaplasticity=False``
is Mamba2, numerically (tested against ``transformers``' implementation).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from palimpsa.layers.checks import binary_mask, check_has_tokens
from palimpsa.layers.modules import add_scaled_skip, causal_conv_taps, positions_in_sequences
from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa, palimpsa_step
from palimpsa.ops.checks import check_cu_seqlens

MODES = ("chunk", "fused_recurrent", "naive")


class MetaMamba2LayerCache:
    """Decoding state of one Meta-Mamba2 layer, updated in place by :meth:`MetaMamba2.forward`.

    Attributes:
        conv_state: [B, conv_dim, conv_kernel - 1] the last inputs of the causal convolution (None before use).
        ssm_state: (mu, I), each [B, H, N, P] float32 (None before use).
        seen_tokens: number of tokens this cache has absorbed (padding included).
    """

    def __init__(self) -> None:
        self.conv_state: Optional[torch.Tensor] = None
        self.ssm_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.seen_tokens = 0

    @property
    def has_state(self) -> bool:
        return self.ssm_state is not None

    def _apply(self, fn) -> None:
        if self.conv_state is not None:
            self.conv_state = fn(self.conv_state)
        if self.ssm_state is not None:
            self.ssm_state = (fn(self.ssm_state[0]), fn(self.ssm_state[1]))

    def select(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` [B'] (beam search reordering, batch selection)."""
        self._apply(lambda x: x.index_select(0, indices.to(x.device)))

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times ([B, ...] -> [B * repeats, ...])."""
        self._apply(lambda x: x.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.conv_state, self.ssm_state, self.seen_tokens = None, None, 0


class GatedRMSNorm(nn.Module):
    """Mamba2's gated RMSNorm: ``weight * rms_normalise(y * SiLU(z))`` in float32 (float64 for float64 inputs),
    over all D channels or, with ``group_size``, over each group of ``group_size`` channels separately.

    y, z: [..., D] -> [..., D] in the dtype of y.
    - One group (``group_size`` None or D): what ``transformers``' ``MambaRMSNormGated`` does up to 5.22.
    - Groups of D / n_groups channels: what ``mamba_ssm`` and ``transformers`` from 5.23 on do for Mamba2.

    The two agree when n_groups = 1.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None):
        super().__init__()
        group_size = hidden_size if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
                or hidden_size % group_size:
            raise ValueError(f"group_size must be a positive divisor of hidden_size ({hidden_size}), got {group_size!r}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        fdtype = torch.float64 if dtype == torch.float64 else torch.float32
        h = hidden_states.to(fdtype) * F.silu(gate.to(fdtype))
        grouped = h.unflatten(-1, (-1, self.group_size))  # [..., D / group_size, group_size]
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.flatten(-2).to(dtype)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          prefix: Optional[torch.Tensor] = None,
                          cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise 1-D convolution along time, time-major (no activation).

    Args:
        x: [B, T, C] inputs; weight: [C, W]; bias: [C] or None.
        prefix: [B, C, W - 1] inputs preceding x (a decoding cache, Mamba2's layout); zeros when None.
        cu_seqlens: [N + 1] offsets of packed sequences (B == 1): no tap reaches across a boundary.

    Returns:
        y [B, T, C] in the dtype of x, contiguous, and the new prefix [B, C, W - 1] (the last W - 1 inputs).
        Compiled (in a compiled block) or with cu_seqlens it is W shifted multiply-adds in float32
        (:func:`palimpsa.layers.modules.causal_conv_taps`, one fused kernel when compiled); otherwise
        ``F.conv1d`` in the weight's dtype.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    past = x.new_zeros(B, W - 1, C) if prefix is None else prefix.to(x.dtype).transpose(1, 2)
    full = torch.cat([past, x], dim=1)  # [B, W - 1 + T, C]
    if cu_seqlens is not None or torch.compiler.is_compiling():
        offset = None if cu_seqlens is None else positions_in_sequences(cu_seqlens.to(x.device, torch.long), T)
        y = causal_conv_taps(full, weight, bias, offset, None)
    else:
        y = F.conv1d(full.transpose(1, 2).to(weight.dtype), weight.unsqueeze(1), bias, groups=C)
        y = y.transpose(1, 2).to(x.dtype).contiguous()
    return y, full[:, full.shape[1] - (W - 1):].transpose(1, 2)


class MetaMamba2(nn.Module):
    """Meta-Mamba2 token mixer (spec 4.2): Mamba2 with a metaplastic (Palimpsa) state-space scan.

    Args:
        hidden_size: d, the model width.
        state_size: N, the SSM state size (Palimpsa's key size K).
        head_dim: P, the head size (Palimpsa's value size V); H = expand * d / P heads.
        n_groups: G groups sharing B and C (H must be a multiple of G).
        expand: inner width = expand * d.
        conv_kernel: width of the causal depthwise convolution.
        importance_rank: r of the importance gate (default ceil(d / 16)).
        metaplasticity: False gives beta = 0, i.e. exactly Mamba2 (the gate parameters are not created).
        importance_scale_init: initial c_h of the gate factor softplus(c_h).
        importance_groups: G importance gates per head and token, each shared by P / G channels (default P,
            one per channel; G < P is exact and runs as gated linear attention, spec 5.2).
        norm_eps: epsilon of the gated RMSNorm.
        norm_per_group: normalise the gated scan output per group of inner_width / n_groups channels, as
            ``mamba_ssm`` (and ``transformers`` from 5.23) do; False (default) normalises over all channels, as
            ``transformers`` up to 5.22 does.  Same function when n_groups = 1.
        use_bias: biases in in_proj and out_proj; use_conv_bias: bias in the convolution.
        time_step_min, time_step_max, time_step_floor: Mamba2's dt initialisation (log-uniform, floored).
        time_step_limit: (min, max) dt is clamped to (Mamba2's ``time_step_limit``).
        mode: "chunk" (training path), "fused_recurrent" or "naive" (the float64-capable reference).
        layer_idx: index of the layer in its model (for caches).
    """

    def __init__(
        self,
        hidden_size: int,
        state_size: int = 16,
        head_dim: int = 32,
        n_groups: int = 1,
        expand: int = 2,
        conv_kernel: int = 4,
        importance_rank: Optional[int] = None,
        metaplasticity: bool = True,
        importance_scale_init: float = 1.0,
        importance_groups: Optional[int] = None,
        norm_eps: float = 1e-5,
        norm_per_group: bool = False,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_limit: Tuple[float, float] = (0.0, float("inf")),
        mode: str = "chunk",
        layer_idx: Optional[int] = None,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("state_size", state_size), ("head_dim", head_dim),
                            ("n_groups", n_groups), ("expand", expand), ("conv_kernel", conv_kernel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        intermediate_size = expand * hidden_size
        if intermediate_size % head_dim:
            raise ValueError(f"expand * hidden_size ({intermediate_size}) must be a multiple of head_dim ({head_dim})")
        num_heads = intermediate_size // head_dim
        if num_heads % n_groups:
            raise ValueError(f"the number of heads ({num_heads}) must be a multiple of n_groups ({n_groups})")
        if importance_rank is None:
            importance_rank = math.ceil(hidden_size / 16)
        if isinstance(importance_rank, bool) or not isinstance(importance_rank, int) or importance_rank < 1:
            raise ValueError(f"importance_rank must be a positive int or None, got {importance_rank!r}")
        importance_groups = head_dim if importance_groups is None else importance_groups
        if isinstance(importance_groups, bool) or not isinstance(importance_groups, int) or importance_groups < 1 \
                or head_dim % importance_groups:
            raise ValueError(f"importance_groups must be a positive int dividing head_dim ({head_dim}), "
                             f"got {importance_groups!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not (0 < time_step_min <= time_step_max):
            raise ValueError(f"need 0 < time_step_min <= time_step_max, got {time_step_min}, {time_step_max}")

        self.hidden_size = hidden_size
        self.ssm_state_size = state_size
        self.head_dim = head_dim
        self.n_groups = n_groups
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.conv_kernel_size = conv_kernel
        self.conv_dim = intermediate_size + 2 * n_groups * state_size
        self.importance_rank = importance_rank
        self.importance_groups = importance_groups
        self.metaplasticity = metaplasticity
        self.time_step_min, self.time_step_max, self.time_step_floor = time_step_min, time_step_max, time_step_floor
        self.time_step_limit = tuple(float(x) for x in time_step_limit)
        self.mode = mode
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(hidden_size, intermediate_size + self.conv_dim + num_heads, bias=use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=conv_kernel, groups=self.conv_dim,
                                padding=conv_kernel - 1, bias=use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        self.norm_per_group = bool(norm_per_group)
        self.norm = GatedRMSNorm(intermediate_size, eps=norm_eps,
                                 group_size=intermediate_size // n_groups if norm_per_group else None)
        self.out_proj = nn.Linear(intermediate_size, hidden_size, bias=use_bias)
        if metaplasticity:
            self.importance_down_proj = nn.Linear(hidden_size, importance_rank, bias=False)
            self.importance_up_proj = nn.Linear(importance_rank, num_heads * importance_groups, bias=False)
            self.importance_scale = nn.Parameter(torch.full((num_heads,), float(importance_scale_init)))
        self.reset_ssm_parameters(importance_scale_init)

    @torch.no_grad()
    def reset_ssm_parameters(self, importance_scale_init: float = 1.0) -> None:
        """Mamba2's initialisation: A = 1..H, D = 1, dt ~ log-uniform[time_step_min, time_step_max] (floored).

        Also sets the importance gate factor c_h to ``importance_scale_init`` (when metaplastic).
        """
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        log_min, log_max = math.log(self.time_step_min), math.log(self.time_step_max)
        dt = torch.exp(torch.rand(self.num_heads) * (log_max - log_min) + log_min).clamp(min=self.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if self.metaplasticity:
            self.importance_scale.fill_(float(importance_scale_init))

    def new_cache(self) -> MetaMamba2LayerCache:
        """An empty decoding cache for this layer."""
        return MetaMamba2LayerCache()

    def importance_gate(self, u: torch.Tensor, dt: torch.Tensor) -> Optional[torch.Tensor]:
        """beta = sigmoid(W_up W_down u) * softplus(c_h) * dt.

        u: [B, T, d]; dt: [B, T, H] (after softplus).  Returns beta [B, T, H, G] (G = importance_groups) in the
        projection's dtype (bf16 under autocast), or None when metaplasticity is off (the op then runs as gated
        linear attention: Mamba2).
        """
        if not self.metaplasticity:
            return None
        # the sigmoid in the projection's dtype, the per-head factor cast to it: no float32 [B, T, H, G] copy
        gate = torch.sigmoid(self.importance_up_proj(self.importance_down_proj(u)))
        gate = rearrange(gate, "b t (h g) -> b t h g", g=self.importance_groups)
        factor = F.softplus(self.importance_scale.to(dt.dtype)) * dt  # [B, T, H]
        return gate * factor[..., None].to(gate.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[MetaMamba2LayerCache] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        output_variance: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mix tokens.

        Args:
            hidden_states: u [B, T, d].
            attention_mask: [B, T] (1 = token, 0 = padding; left padding), or None.  Padded positions are
                zeroed before in_proj and after the convolution, as in Mamba2, so they leave the state unchanged.
            cache: a :class:`MetaMamba2LayerCache`, read and updated in place (decoding / continuation).
            cu_seqlens: [N + 1] offsets of packed sequences (B == 1); the convolution and the scan restart
                at every boundary.  Not combinable with ``cache`` or ``attention_mask``.
            output_variance: also return the posterior variance of the scan output.

        Returns:
            (out [B, T, d], variance [B, T, H, P] float32 (float64 for float64 inputs) or None).  The variance is that of the
            Palimpsa read-out o (before the D skip, the gated norm and out_proj).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape [B, T, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        check_has_tokens(hidden_states)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            if attention_mask.shape != (batch, seq_len):
                raise ValueError(f"attention_mask must have shape [B, T] = [{batch}, {seq_len}], "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = binary_mask(attention_mask)
        if cu_seqlens is not None and (cache is not None or attention_mask is not None):
            raise ValueError("cu_seqlens cannot be combined with a cache or an attention_mask")
        if cu_seqlens is not None:  # its values here, not in the op; in a compiled block the model has checked them
            check_cu_seqlens(cu_seqlens, seq_len, batch, check_values=not torch.compiler.is_compiling())
        if cache is not None and not isinstance(cache, MetaMamba2LayerCache):
            raise TypeError(f"cache must be a MetaMamba2LayerCache, got {type(cache).__name__}")
        dtype = hidden_states.dtype
        # the scan runs in float32 (as Mamba2's), or float64 for float64 inputs
        fdtype = torch.float64 if dtype == torch.float64 else torch.float32
        mask = None if attention_mask is None else attention_mask[:, :, None].to(dtype)

        u = hidden_states if mask is None else hidden_states * mask
        projected = self.in_proj(u)
        # The op takes q, k, v and beta in the projections' dtype (bf16 under autocast; it computes in float32,
        # as Mamba2's kernels do with their bf16 x, B and C): no float32 copies of [B, T, H, N] and [B, T, H, P]
        # tensors, which the op would keep for its backward (B and C are repeated over every head of a group).
        op_dtype = projected.dtype
        z, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

        prefix = cache.conv_state if cache is not None else None
        xBC, new_prefix = causal_depthwise_conv(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                                prefix=prefix, cu_seqlens=cu_seqlens)
        xBC = F.silu(xBC)
        if mask is not None:
            xBC = xBC * mask
        x, Bmat, Cmat = xBC.split([self.intermediate_size, self.n_groups * self.ssm_state_size,
                                   self.n_groups * self.ssm_state_size], dim=-1)

        dt = F.softplus(dt.to(fdtype) + self.dt_bias.to(fdtype))
        dt = dt.clamp(min=self.time_step_limit[0], max=self.time_step_limit[1])  # [B, T, H]
        x = rearrange(x, "b t (h p) -> b t h p", p=self.head_dim)
        heads_per_group = self.num_heads // self.n_groups
        q = repeat(Cmat.to(op_dtype), "b t (g n) -> b t (g r) n", g=self.n_groups, r=heads_per_group)
        k = repeat(Bmat.to(op_dtype), "b t (g n) -> b t (g r) n", g=self.n_groups, r=heads_per_group)
        v = (x.to(fdtype) * dt[..., None]).to(op_dtype)  # one rounding, of the product
        g = -dt * torch.exp(self.A_log.to(fdtype))  # the log decay stays in float32
        beta = self.importance_gate(u, dt)

        o, variance = self._scan(q, k, v, g, beta, cache, cu_seqlens, output_variance)
        variance = variance.to(fdtype) if variance is not None else None  # the op returns it in its input dtype
        # o + D * x computed in float32 and rounded to the op's dtype, which the gated norm takes up to float32
        # again (as Mamba2's fused kernels hand it their bf16 output)
        y = add_scaled_skip(o, x, self.D, op_dtype)
        y = self.norm(rearrange(y, "b t h p -> b t (h p)"), z)
        out = self.out_proj(y.to(dtype))
        if cache is not None:
            cache.conv_state = new_prefix
            cache.seen_tokens += seq_len
        return out, variance

    def _scan(self, q, k, v, g, beta, cache, cu_seqlens, output_variance):
        """The Palimpsa op (float32 arithmetic and states whatever the inputs' dtype).  q, k [B, T, H, N];
        v [B, T, H, P]; beta [B, T, H, G] or None, all in one dtype; g [B, T, H] float32.

        Returns o [B, T, H, P] and the variance (or None); updates ``cache.ssm_state`` in place.
        """
        initial_state = cache.ssm_state if cache is not None else None
        if (cache is not None and cache.has_state and q.shape[1] == 1 and not torch.is_grad_enabled()):
            result = palimpsa_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0] if beta is not None else None,
                                   cache.ssm_state,
                                   prior=1.0, scale=1.0, output_variance=output_variance,
                                   check_values=False)  # g <= 0, beta >= 0 by construction
            if output_variance:
                return result[0][:, None], result[1][:, None]
            return result[:, None], None
        op = {"chunk": chunk_palimpsa, "fused_recurrent": fused_recurrent_palimpsa, "naive": naive_palimpsa}[self.mode]
        result = op(q, k, v, g, beta, prior=1.0, scale=1.0, initial_state=initial_state,
                    output_final_state=cache is not None, output_variance=output_variance, cu_seqlens=cu_seqlens,
                    check_values=False)  # g <= 0 and beta >= 0 by construction: no device sync
        o, variance, final_state = result if output_variance else (result[0], None, result[1])
        if cache is not None:
            cache.ssm_state = tuple(s.detach() for s in final_state)
        return o, variance

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, state_size={self.ssm_state_size}, "
                f"n_groups={self.n_groups}, importance_rank={self.importance_rank}, "
                f"metaplasticity={self.metaplasticity}, mode={self.mode!r}")
