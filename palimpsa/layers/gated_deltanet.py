"""Gated DeltaNet (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", 2024): the MQAR baseline.

The token mixer of flash-linear-attention's ``fla.layers.GatedDeltaNet`` (same parameter names, so its
state dict loads into either), with the gated delta rule written in PyTorch.  For one head, with a
state S of shape [K, V]::

    S_t = alpha_t * S_{t-1}                                  (alpha_t = exp(g_t), g_t <= 0)
    S_t = S_t + k_t outer beta_t * (v_t - S_t^T k_t)         (delta rule: write the prediction error)
    o_t = scale * S_t^T q_t

:func:`chunk_gated_delta_rule_torch` computes the same thing a chunk at a time (WY form, one triangular
solve per chunk), which is what training uses; :func:`recurrent_gated_delta_rule_torch` is the token loop.
The layer uses fla's kernels instead when flash-linear-attention is installed and the input is on a GPU
(``backend="auto"``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from palimpsa.layers.checks import check_has_tokens
from palimpsa.layers.modules import GatedRMSNorm, ShortConvolution

BACKENDS = ("auto", "torch", "fla")


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x ** 2) + eps) over the last dimension (fla's l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _check_delta_rule_inputs(q, k, v, g, beta) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both have shape [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if g.shape != (B, T, H):
        raise ValueError(f"g must have shape [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must have shape [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")


def recurrent_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule, one token at a time (float32 state).

    Args:
        q, k: [B, T, H, K] (k is expected L2-normalised); v: [B, T, H, V];
        g: [B, T, H] log decay (<= 0); beta: [B, T, H] write strength in [0, 2].
        scale: read-out scale, default K ** -0.5.
        initial_state: [B, H, K, V] or None (zeros).
    Returns:
        o [B, T, H, V] in q's dtype, and the final state [B, H, K, V] float32 when output_final_state.
    """
    _check_delta_rule_inputs(q, k, v, g, beta)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t].to(dtype), k[:, t].to(dtype), v[:, t].to(dtype)
        S = S * g[:, t].to(dtype).exp()[..., None, None]
        error = v_t - torch.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, error * beta[:, t].to(dtype)[..., None])
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q_t, S))
    o = torch.stack(outputs, dim=1).to(q.dtype)
    return o, (S if output_final_state else None)


@torch.compiler.disable  # a graph break in a compiled block: fla's kernels run as written
def _fla_gated_delta_rule(q, k, v, g, beta, cu_seqlens):
    """fla's chunked gated delta rule (q, k l2-normalised in its kernel): o [B, T, H, V]."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)[0]


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule a chunk at a time (same math and arguments as the recurrent form).

    Inside a chunk with start state S0 and cumulative log decay G_t (from the chunk start, inclusive), the
    written errors u_t = beta_t (v_t - gamma_t S0^T k_t - sum_{s<t} (gamma_t / gamma_s)(k_t . k_s) u_s)
    solve the unit lower-triangular system (I + A) U = beta V - (beta gamma K) S0 with
    A_ts = beta_t (gamma_t / gamma_s) (k_t . k_s) for s < t; then
    o_t = scale (gamma_t q_t S0 + sum_{s<=t} (gamma_t / gamma_s)(q_t . k_s) u_s) and
    S_end = gamma_C S0 + sum_s (gamma_C / gamma_s) k_s u_s^T.  Computed in float32 (autocast off).

    Shapes as in :func:`recurrent_gated_delta_rule_torch`; chunk_size: tokens per chunk.
    """
    _check_delta_rule_inputs(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = min(chunk_size, T)
    pad = (-T) % C
    with torch.autocast(device_type=q.device.type, enabled=False):
        # [B, H, N, C, D] layout; padding tokens have k = v = beta = 0 and g = 0 so they change nothing
        def to_chunks(x):
            x = x.to(dtype)
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if x.dim() == 4 else F.pad(x, (0, 0, 0, pad))
            return rearrange(x, "b (n c) h ... -> b h n c ...", c=C)

        qc, kc, vc, gc, bc = (to_chunks(x) for x in (q, k, v, g, beta))
        G = gc.cumsum(-1)  # [B, H, N, C]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, -math.inf)
        decay = diff.exp()  # gamma_t / gamma_s for s <= t, else 0
        kk = kc @ kc.transpose(-1, -2)
        A = (bc[..., None] * kk * decay).tril(-1)
        eye = torch.eye(C, dtype=dtype, device=q.device)
        rhs = torch.cat([bc[..., None] * vc, (bc * G.exp())[..., None] * kc], dim=-1)
        # a flat, contiguous batch: the CPU solver is far slower on strided 5-d batches
        lower = (A + eye).reshape(-1, C, C).contiguous()
        sol = torch.linalg.solve_triangular(lower, rhs.reshape(-1, C, rhs.shape[-1]).contiguous(),
                                            upper=False, unitriangular=True).view(rhs.shape)
        U, W = sol[..., :V], sol[..., V:]  # U - W S0 = the written errors
        qk = (qc @ kc.transpose(-1, -2)) * decay
        q_decayed = qc * G.exp()[..., None]
        k_to_end = kc * (G[..., -1:] - G).exp()[..., None]
        S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
        outputs = []
        for n in range(qc.shape[2]):
            errors = U[:, :, n] - W[:, :, n] @ S
            outputs.append(q_decayed[:, :, n] @ S + qk[:, :, n] @ errors)
            S = S * G[:, :, n, -1, None, None].exp() + k_to_end[:, :, n].transpose(-1, -2) @ errors
        o = torch.stack(outputs, dim=2)  # [B, H, N, C, V]
        o = rearrange(o, "b h n c v -> b (n c) h v")[:, :T] * scale
    return o.to(q.dtype), (S if output_final_state else None)


def fla_available() -> bool:
    """True when flash-linear-attention (package ``fla``) is installed."""
    return importlib.util.find_spec("fla") is not None


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer (fla's layer, PyTorch delta rule unless fla runs it).

    Per head: q, k = L2norm(SiLU(conv(Linear(u)))); v = SiLU(conv(Linear(u))); beta = sigmoid(Linear(u));
    g = -exp(A_log) * softplus(Linear(u) + dt_bias); o = gated RMSNorm(delta rule, swish gate Linear(u));
    then Linear(H*V, d).  A_log [H] and dt_bias [H] as in Mamba2.

    Args:
        hidden_size: d.
        num_heads: H.
        head_k_dim: K (default d // H); head_v_dim: V (default 2 K, fla's expand_v = 2).
        conv_size: causal depthwise convolution kernel.
        norm_eps: epsilon of the output RMSNorm.
        backend: "auto" (fla's chunk kernel on CUDA when fla is installed, else PyTorch), "torch" or "fla".
        chunk_size: tokens per chunk of the PyTorch path.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        head_k_dim: Optional[int] = None,
        head_v_dim: Optional[int] = None,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        layer_idx: Optional[int] = None,
        backend: str = "auto",
        chunk_size: int = 64,
    ):
        super().__init__()
        if hidden_size < 1 or num_heads < 1:
            raise ValueError(f"hidden_size and num_heads must be >= 1, got {hidden_size} and {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "fla" and not fla_available():
            raise RuntimeError("backend='fla' needs flash-linear-attention: pip install flash-linear-attention")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim = head_k_dim or hidden_size // num_heads
        self.head_v_dim = head_v_dim or 2 * self.head_k_dim
        if self.head_k_dim < 1:
            raise ValueError(f"head_k_dim must be >= 1 (hidden_size // num_heads = {hidden_size // num_heads})")
        self.layer_idx, self.backend, self.chunk_size = layer_idx, backend, chunk_size
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.q_conv1d = ShortConvolution(key_dim, conv_size, activation="silu")
        self.k_conv1d = ShortConvolution(key_dim, conv_size, activation="silu")
        self.v_conv1d = ShortConvolution(value_dim, conv_size, activation="silu")
        # Mamba2-style decay: A ~ U(0, 16), dt log-uniform in [1e-3, 0.1] (floor 1e-4), dt_bias = softplus^-1(dt)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, norm_before_gate=True)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def recurrent_state_shape(self) -> Tuple[int, int, int]:
        """Shape [H, K, V] of the per-sequence memory the layer carries from token to token."""
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        output_variance: bool = False,
    ) -> Tuple[torch.Tensor, None]:
        """Mix tokens.

        Args:
            hidden_states: u [B, T, d].
            cu_seqlens: [N + 1] offsets of packed sequences (B == 1); nothing crosses a boundary.
            output_variance: accepted for a uniform mixer interface; the delta rule keeps no variance.

        Returns:
            (output [B, T, d], None).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape [B, T, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        check_has_tokens(hidden_states)
        if cu_seqlens is not None and hidden_states.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={hidden_states.shape[0]}")
        u = hidden_states
        H = self.num_heads
        q = rearrange(self.q_conv1d(self.q_proj(u), cu_seqlens=cu_seqlens)[0], "b t (h k) -> b t h k", h=H)
        k = rearrange(self.k_conv1d(self.k_proj(u), cu_seqlens=cu_seqlens)[0], "b t (h k) -> b t h k", h=H)
        v = rearrange(self.v_conv1d(self.v_proj(u), cu_seqlens=cu_seqlens)[0], "b t (h v) -> b t h v", h=H)
        fp = torch.promote_types(u.dtype, torch.float32)  # gates in float32 (float64 for float64 inputs)
        beta = self.b_proj(u).to(fp).sigmoid()
        g = -self.A_log.to(fp).exp() * F.softplus(self.a_proj(u).to(fp) + self.dt_bias.to(fp))
        use_fla = self.backend == "fla" or (self.backend == "auto" and u.is_cuda and fla_available())
        if use_fla:
            o = _fla_gated_delta_rule(q, k, v, g, beta, cu_seqlens)
        else:
            q, k = l2_normalize(q.to(fp)), l2_normalize(k.to(fp))
            if cu_seqlens is None:
                o, _ = chunk_gated_delta_rule_torch(q, k, v, g, beta, chunk_size=self.chunk_size)
            else:  # one sequence at a time, each from a zero state
                bounds = cu_seqlens.tolist()
                o = torch.cat([chunk_gated_delta_rule_torch(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                                            chunk_size=self.chunk_size)[0]
                               for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
        gate = rearrange(self.g_proj(u), "b t (h v) -> b t h v", h=H)
        o = rearrange(self.o_norm(o, gate), "b t h v -> b t (h v)")
        return self.o_proj(o.to(u.dtype)), None
