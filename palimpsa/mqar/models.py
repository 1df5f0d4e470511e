"""The MQAR model zoo: one small language model, six token mixers.

Model (Zoology's layout): token embedding (plus rotary positions inside the attention baseline only),
``n_layers`` x (pre-RMSNorm mixer + residual [, pre-RMSNorm SwiGLU MLP + residual]), final RMSNorm, output
head tied to the embedding.

Mixers (``MODEL_NAMES``), with the paper's MQAR configuration when d_model = 128 and num_heads = 8
(spec 4.2); every head has a key size K = d_model / num_heads and a value size V = 2 K unless set:

    palimpsa        Palimpsa(metaplasticity=True), K=16, V=32, importance rank d/16 = 8
    notpalimpsa     the same layer with metaplasticity=False (simple gated linear attention)
    meta_mamba2     MetaMamba2(metaplasticity=True), state_size N = K, head_dim P = V, n_groups = H, expand 2
    mamba2          the same layer with metaplasticity=False (exactly Mamba2)
    gated_deltanet  GatedDeltaNet, K, V as above
    attention       causal softmax attention with rotary positions, head size d_model / num_heads

A metaplastic model's name may end in ``_g<G>`` (e.g. ``palimpsa_g1``, ``meta_mamba2_g4``): the same mixer with
G importance gates per head and token, each shared by V / G value channels (``importance_groups``; the plain name
is the paper's model, one gate per value channel, G = V).  See :func:`parse_model_name`.

Every recurrent mixer gets the paper's "small forgetting" initialisation (see :func:`small_forgetting_init`).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from palimpsa.layers.gated_deltanet import GatedDeltaNet
from palimpsa.layers.modules import RMSNorm, SwiGLUMLP, compiled_block_forward

MODEL_NAMES = ("palimpsa", "notpalimpsa", "meta_mamba2", "mamba2", "gated_deltanet", "attention")
METAPLASTIC_MODELS = ("palimpsa", "meta_mamba2")
# mixers built on the Palimpsa op return a posterior output variance (constant-importance for the twins
# without metaplasticity, which makes them the control for the variance's usefulness)
VARIANCE_MODELS = ("palimpsa", "notpalimpsa", "meta_mamba2", "mamba2")
STATE_BYTES_PER_ELEMENT = 4  # recurrent states (and the attention KV cache) counted in float32
_GROUPED_NAME = re.compile(r"^(?P<base>[a-z0-9_]+?)_g(?P<groups>[1-9][0-9]*)$")


def parse_model_name(name: str) -> Tuple[str, Optional[int]]:
    """A model name as ``--models`` accepts it -> (mixer name in MODEL_NAMES, importance_groups or None).

    "palimpsa" -> ("palimpsa", None) (one importance gate per value channel, the paper's model);
    "palimpsa_g4" -> ("palimpsa", 4).  The ``_g<G>`` suffix is allowed on METAPLASTIC_MODELS only; anything
    else raises ValueError naming the valid forms.
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    if name in MODEL_NAMES:
        return name, None
    match = _GROUPED_NAME.match(name)
    if match is None or match["base"] not in METAPLASTIC_MODELS:
        raise ValueError(f"model name must be one of {MODEL_NAMES}, or one of {METAPLASTIC_MODELS} followed by "
                         f"_g<G> (G importance groups per head, e.g. palimpsa_g1), got {name!r}")
    return match["base"], int(match["groups"])


@dataclass(frozen=True)
class MQARModelConfig:
    """Architecture of one MQAR model.

    name: one of MODEL_NAMES.  head_k_dim / head_v_dim: None gives K = d_model / num_heads, V = 2 K.
    gdn_backend: Gated DeltaNet's delta-rule backend ("auto", "torch" or "fla").
    importance_groups: G for the metaplastic models (a divisor of V; None = V, one gate per value channel);
    must stay None for the others.  :meth:`from_model_name` reads it from a name such as "palimpsa_g1".
    """

    name: str
    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 2
    num_heads: int = 8
    head_k_dim: Optional[int] = None
    head_v_dim: Optional[int] = None
    mlp: bool = False
    small_forgetting: bool = True
    gdn_backend: str = "auto"
    importance_groups: Optional[int] = None

    def __post_init__(self):
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model name must be one of {MODEL_NAMES}, got {self.name!r}")
        for field in ("vocab_size", "d_model", "n_layers", "num_heads"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        groups = self.importance_groups
        if groups is not None:
            if self.name not in METAPLASTIC_MODELS:
                raise ValueError(f"importance_groups applies to {METAPLASTIC_MODELS} only, got {groups!r} for "
                                 f"{self.name!r}")
            if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or self.value_dim % groups:
                raise ValueError(f"importance_groups must be a positive int dividing the value size V "
                                 f"({self.value_dim}), got {groups!r}")

    @classmethod
    def from_model_name(cls, name: str, **fields) -> "MQARModelConfig":
        """The config of a model named as ``--models`` accepts it ("palimpsa_g4" -> name "palimpsa",
        importance_groups 4); ``fields``: any other field."""
        base, groups = parse_model_name(name)
        return cls(name=base, importance_groups=groups, **fields)

    @property
    def groups(self) -> Optional[int]:
        """G, the importance gates per head and token of a metaplastic model (V when importance_groups is None);
        None for the models without an importance."""
        if self.name not in METAPLASTIC_MODELS:
            return None
        return self.importance_groups or self.value_dim

    @property
    def key_dim(self) -> int:
        """K, the key (Mamba2: state) size of a head."""
        return self.head_k_dim or self.d_model // self.num_heads

    @property
    def value_dim(self) -> int:
        """V, the value (Mamba2: head) size of a head."""
        return self.head_v_dim or 2 * self.key_dim


def small_forgetting_init(A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    """The paper's MQAR initialisation of a recurrent mixer's forgetting (in place).

    Per head h of H: A_h = linspace(0.01, 0.16, H)[h] and dt_h = exp(linspace(log 0.1, log 0.001, H))[h], so the
    per-token log decay -dt_h A_h starts between -1e-3 and -1.6e-4 (memories last thousands of tokens).
    A_log = log A; dt_bias = softplus^-1(dt).  A_log, dt_bias: [H].
    """
    H = A_log.numel()
    if dt_bias.numel() != H:
        raise ValueError(f"A_log and dt_bias must both have H entries, got {A_log.numel()} and {dt_bias.numel()}")
    with torch.no_grad():
        A = torch.linspace(0.01, 0.16, H, dtype=torch.float64)
        dt = torch.exp(torch.linspace(math.log(0.1), math.log(0.001), H, dtype=torch.float64))
        A_log.copy_(A.log().to(A_log.dtype))
        dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(dt_bias.dtype))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention).  Applied to q, k: [B, H, T, D] (D even)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq  # [T, D/2]
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal multi-head softmax attention with rotary positions (the MQAR upper baseline).

    hidden_states [B, T, d] -> (output [B, T, d], None).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(hidden_size // num_heads)

    def forward(self, hidden_states: torch.Tensor, output_variance: bool = False) -> Tuple[torch.Tensor, None]:
        B, T, d = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(self.rotary(q), self.rotary(k), v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, d)), None


def build_mixer(config: MQARModelConfig, layer_idx: int) -> nn.Module:
    """The token mixer of layer ``layer_idx`` (see the module docstring for the configurations)."""
    d, H, K, V = config.d_model, config.num_heads, config.key_dim, config.value_dim
    name = config.name
    if name == "attention":
        return CausalSelfAttention(d, H)
    if name in ("palimpsa", "notpalimpsa"):
        from palimpsa.layers.palimpsa import Palimpsa

        mixer = Palimpsa(d, num_heads=H, head_k_dim=K, head_v_dim=V, importance_groups=config.importance_groups,
                         metaplasticity=name == "palimpsa", layer_idx=layer_idx)
    elif name in ("meta_mamba2", "mamba2"):
        from palimpsa.layers.meta_mamba2 import MetaMamba2

        if (H * V) % d:
            raise ValueError(f"Mamba2 needs num_heads * head_v_dim ({H * V}) to be a multiple of d_model ({d})")
        mixer = MetaMamba2(d, state_size=K, head_dim=V, n_groups=H, expand=H * V // d,
                           importance_groups=config.importance_groups, metaplasticity=name == "meta_mamba2",
                           layer_idx=layer_idx)
    else:
        mixer = GatedDeltaNet(d, num_heads=H, head_k_dim=K, head_v_dim=V, layer_idx=layer_idx,
                              backend=config.gdn_backend)
    if config.small_forgetting:
        small_forgetting_init(mixer.A_log, mixer.dt_bias)
    return mixer


class MQARBlock(nn.Module):
    """Pre-RMSNorm mixer + residual, then (optionally) pre-RMSNorm SwiGLU MLP + residual."""

    def __init__(self, config: MQARModelConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, eps=1e-5)
        self.mixer = build_mixer(config, layer_idx)
        self.mixer_in_float32 = config.name in VARIANCE_MODELS  # the mixers built on the Palimpsa op
        self.mlp_norm = RMSNorm(config.d_model, eps=1e-5) if config.mlp else None
        self.mlp = SwiGLUMLP(config.d_model, hidden_ratio=4) if config.mlp else None

    @compiled_block_forward
    def forward(self, x: torch.Tensor, output_variance: bool = False):
        """x [B, T, d] -> (x [B, T, d], mixer variance [B, T, H, V] or None).  Compiled when compiled blocks are on
        (:func:`palimpsa.layers.modules.compiled_blocks`; ``palimpsa mqar --compile``).

        Under autocast the mixer receives its input in the autocast dtype (bf16), so every tensor a layer
        derives from it has one dtype (the Palimpsa op wants q, k, v, beta alike); the residual stream stays
        float32.  The mixers built on the Palimpsa op (Palimpsa, Meta-Mamba2 and their twins) run in float32
        with autocast off instead: under CUDA autocast the Palimpsa layer's L2-normalised q, k come out float32
        while v is bf16, which the op rejects; both pairs get the same precision.
        """
        h = self.mixer_norm(x)
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type) and self.mixer_in_float32:
            with torch.autocast(device_type, enabled=False):
                mixed, variance = self.mixer(h.float(), output_variance=output_variance)
        else:
            if torch.is_autocast_enabled(device_type):
                h = h.to(torch.get_autocast_dtype(device_type))
            mixed, variance = self.mixer(h, output_variance=output_variance)
        x = x + mixed
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, variance


class MQARModel(nn.Module):
    """Embedding -> blocks -> RMSNorm -> tied output head."""

    def __init__(self, config: MQARModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(MQARBlock(config, i) for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, eps=1e-5)

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                output_variance: bool = False):
        """Logits at the requested positions.

        Args:
            input_ids: [B, T] int64.
            positions: which positions to score: a [B, T] bool mask (e.g. labels != -100), or a [B, Q] int64
                index of Q positions per row (no device sync: MQAR queries every key once, so Q is fixed), or
                None for all.
            output_variance: also return the last layer's mixer variance (metaplastic models only).

        Returns:
            logits [M, vocab] for the M selected positions (row-major order; M = B * Q for an index), or
            [B, T, vocab] when positions is None; with output_variance, (logits, variance [M, H, V] /
            [B, T, H, V] or None).
        """
        x = self.embedding(input_ids)
        variance = None
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, layer_variance = block(x, output_variance=output_variance and last)
            if last:
                variance = layer_variance
        x = self.final_norm(x)
        if positions is not None and positions.dtype == torch.bool:  # score only where a label is
            x = x[positions]
            variance = None if variance is None else variance[positions]
        elif positions is not None:
            if positions.dim() != 2 or positions.shape[0] != x.shape[0]:
                raise ValueError(f"positions as an index must be [B={x.shape[0]}, Q] int64, got "
                                 f"{tuple(positions.shape)}")
            x = _gather_rows(x, positions).flatten(0, 1)
            variance = None if variance is None else _gather_rows(variance, positions).flatten(0, 1)
        logits = F.linear(x, self.embedding.weight)
        return (logits, variance) if output_variance else logits


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, *rest], index [B, Q] int64 -> x[b, index[b, q]] as [B, Q, *rest]."""
    shape = index.shape + x.shape[2:]
    flat = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(shape)
    return x.gather(1, flat)


def recurrent_state_bytes(config: MQARModelConfig, seq_len: int) -> int:
    """Bytes of the memory one layer carries between tokens, per sequence, in float32.

    Recurrent mixers: the mean mu, H * K * V entries, plus for the metaplastic ones the importance I, H * K * G
    entries for G importance groups (I is constant within a group of V / G value channels, so G = V gives
    twice the mean's size and G = 1 adds H * K); without metaplasticity I stays at the prior and need not be
    stored.  Attention: its key-value cache after ``seq_len`` tokens, 2 * seq_len * d_model entries.
    Convolution buffers (3 tokens) are not counted.
    """
    if config.name == "attention":
        entries = 2 * seq_len * config.d_model
    else:
        entries = config.num_heads * config.key_dim * (config.value_dim + (config.groups or 0))
    return entries * STATE_BYTES_PER_ELEMENT


OP_BACKENDS = ("auto", "torch", "triton")


@contextmanager
def palimpsa_op_backend(backend: str = "auto"):
    """Run every ``chunk_palimpsa`` call inside the block on ``backend`` ("auto" changes nothing).

    The Palimpsa and Meta-Mamba2 layers call the op with backend "auto" (Triton on CUDA); this lets a benchmark
    fall back to the PyTorch path (or insist on Triton) without touching the layers, by wrapping the op's
    backend choice for calls that asked for "auto".
    """
    if backend not in OP_BACKENDS:
        raise ValueError(f"op backend must be one of {OP_BACKENDS}, got {backend!r}")
    if backend == "auto":
        yield
        return
    import palimpsa.ops.chunk as chunk_module

    original = chunk_module.resolve_backend

    def resolve(requested, *args, **kwargs):
        return original(backend if requested == "auto" else requested, *args, **kwargs)

    chunk_module.resolve_backend = resolve
    try:
        yield
    finally:
        chunk_module.resolve_backend = original


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
