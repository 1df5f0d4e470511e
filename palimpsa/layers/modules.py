"""Small building blocks shared by the layers and models: short convolution, norms, MLP, a chunked
linear cross-entropy, a layer cache.

The norms compute in float32 (float64 for float64 inputs) and return the input dtype.

Compiled blocks: after ``set_compiled_blocks(True)`` every decoder block's forward (the layer around the op, its
norms, short convolutions, gates, skip, MLP and residuals) runs through ``torch.compile`` on CUDA tensors (the
per-channel op traces as custom ops; the grouped path is one graph break and runs as written); so do the
element-wise pieces used outside the blocks (the final norm).  Inductor fuses the element-wise chains into a few
kernels that keep float32 intermediates in registers instead of memory.  CPU tensors take the plain PyTorch code
(the same functions, not compiled), so CPU runs and tests need no compiler.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {None: None, "silu": F.silu, "swish": F.silu}
IGNORE_INDEX = -100
_COMPILED_BLOCKS = {"enabled": False, "devices": ("cuda",), "backend": "inductor"}


def set_compiled_blocks(enabled: bool, devices: Tuple[str, ...] = ("cuda",), backend: str = "inductor") -> None:
    """Run decoder blocks and element-wise pieces through ``torch.compile`` (off by default).

    ``devices``: the device types whose tensors take the compiled code (CUDA; "cpu" too needs a C++ compiler,
    which the tests use to check the compiled code against the plain one).  ``backend``: torch.compile's
    backend ("aot_eager" traces and partitions like inductor without generating kernels: the CPU tests use it;
    each backend keeps its own compiled functions).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if isinstance(devices, str) or not all(d in ("cuda", "cpu") for d in devices):
        raise ValueError(f"devices must be a tuple of 'cuda' and/or 'cpu', got {devices!r}")
    _COMPILED_BLOCKS.update(enabled=enabled, devices=tuple(devices), backend=backend)


def compiled_blocks_enabled() -> bool:
    """Whether :func:`set_compiled_blocks` turned the compiled blocks on."""
    return _COMPILED_BLOCKS["enabled"]


@contextlib.contextmanager
def compiled_blocks(enabled: bool = True, devices: Tuple[str, ...] = ("cuda",), backend: str = "inductor"):
    """Compiled blocks on (or off) inside the ``with`` block; the previous setting is restored after it."""
    previous = dict(_COMPILED_BLOCKS)
    set_compiled_blocks(enabled, devices, backend)
    try:
        yield
    finally:
        _COMPILED_BLOCKS.update(previous)


def _compiles(x: torch.Tensor) -> bool:
    return (_COMPILED_BLOCKS["enabled"] and x.device.type in _COMPILED_BLOCKS["devices"]
            and not torch.compiler.is_compiling())


def _compiled(cache: Dict[str, Callable], fn: Callable) -> Callable:
    """``torch.compile(fn)`` for the current backend, made on first use and kept in ``cache`` (backend -> fn)."""
    backend = _COMPILED_BLOCKS["backend"]
    if backend not in cache:
        cache[backend] = torch.compile(fn, backend=backend)
    return cache[backend]


def compiled_on_cuda(fn: Callable) -> Callable:
    """``fn``, run through ``torch.compile`` when compiled blocks are on and its first argument is a CUDA tensor.

    Inside an enclosing ``torch.compile`` trace (a compiled block), or on other devices, ``fn`` runs as
    written.  The compiled version is made on first use.
    """
    compiled = {}  # backend -> compiled fn

    @functools.wraps(fn)
    def dispatch(*args):
        if _compiles(args[0]):
            return _compiled(compiled, fn)(*args)
        return fn(*args)

    dispatch.uncompiled = fn
    return dispatch


def compiled_block_forward(forward: Callable) -> Callable:
    """Decorator for a decoder block's ``forward(self, hidden_states, ...)``: compiled when blocks are.

    When compiled blocks are on, ``hidden_states`` is a CUDA tensor and no decoding ``cache`` is passed
    (training and full-sequence forwards), the forward runs through ``torch.compile`` (one compiled graph shared
    by every block of the class, whose parameters are inputs; shapes are static until one changes, e.g. the
    number of packed documents in ``cu_seqlens``, which then becomes dynamic instead of recompiling per value).  The
    per-channel Triton op traces as custom ops; the grouped path and fla's kernels are graph breaks.
    Otherwise it runs as written.
    """
    compiled = {}  # backend -> compiled forward

    @functools.wraps(forward)
    def dispatch(self, hidden_states, *args, **kwargs):
        if kwargs.get("cache") is None and _compiles(hidden_states):
            return _compiled(compiled, forward)(self, hidden_states, *args, **kwargs)
        return forward(self, hidden_states, *args, **kwargs)

    dispatch.uncompiled = forward
    return dispatch


@compiled_on_cuda
def causal_conv_taps(full: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     offset: Optional[torch.Tensor], activation: Optional[str]) -> torch.Tensor:
    """Causal depthwise convolution as W shifted multiply-adds (one fused kernel when compiled).

    full: [B, W - 1 + T, C] the W - 1 preceding inputs then the T inputs; weight: [C, W]; bias: [C] or None;
    offset: [T] position of every token inside its packed sequence (a tap reaching back s tokens counts only
    where offset >= s), or None.  Returns y [B, T, C] in the dtype of ``full``, contiguous: computed time-major
    throughout, so that the op downstream gets q, k and v without a copy (a channel-major result, a transposed
    view, would make every kernel's ``.contiguous()`` copy it, forward and backward).
    """
    W = weight.shape[-1]
    T = full.shape[1] - (W - 1)
    fp = torch.promote_types(full.dtype, torch.float32)
    y = None
    for s in range(W):  # output t reads input t - s through tap W - 1 - s
        tap = full[:, W - 1 - s: W - 1 - s + T].to(fp) * weight[:, W - 1 - s].to(fp)
        if offset is not None:
            tap = tap * (offset >= s).to(fp)[:, None]
        y = tap if y is None else y + tap
    if bias is not None:
        y = y + bias.to(fp)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return y.to(full.dtype)


def recomputed_in_backward(fn: Callable, *args):
    """``fn(*args)``; inside a compiled block (training), through ``torch.utils.checkpoint``, so that the backward
    recomputes it from ``args`` instead of keeping its float32 intermediates (short convolutions, activations and
    normalisations: cheap element-wise work, large per token).  ``fn`` returns tensors only."""
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


@compiled_on_cuda
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, in float32.  x: [..., D] -> dtype of x."""
    fp = torch.promote_types(x.dtype, torch.float32)
    h = x.to(fp)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(fp) * h).to(x.dtype)


@compiled_on_cuda
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   norm_before_gate: bool) -> torch.Tensor:
    """RMSNorm with a SiLU gate (see :class:`GatedRMSNorm`).  x, gate: [..., D] -> [..., D] in the dtype of x."""
    fp = torch.promote_types(x.dtype, torch.float32)
    h, swish = x.to(fp), F.silu(gate.to(fp))
    if not norm_before_gate:
        h = h * swish
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if norm_before_gate:
        h = h * swish
    return (weight.to(fp) * h).to(x.dtype)


@compiled_on_cuda
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the SwiGLU product; one kernel forward and one backward when compiled)."""
    return F.silu(gate) * up


@compiled_on_cuda
def l2_normalize(x: torch.Tensor, out_dtype: torch.dtype, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(||x||, eps)`` over the last dimension (``F.normalize``), computed in float32, cast to out_dtype."""
    fp = torch.promote_types(x.dtype, torch.float32)
    h = x.to(fp)
    return (h / h.norm(dim=-1, keepdim=True).clamp_min(eps)).to(out_dtype)


@compiled_on_cuda
def add_scaled_skip(o: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``o + scale[h] * x`` in float32, cast to out_dtype.  o, x: [B, T, H, V]; scale: [H]."""
    fp = torch.promote_types(torch.promote_types(o.dtype, x.dtype), torch.float32)
    return (o.to(fp) + scale.to(fp)[:, None] * x.to(fp)).to(out_dtype)


def positions_in_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Offset of every packed token inside its own sequence.

    cu_seqlens: [N + 1] offsets (0 = cu_seqlens[0] < ... < cu_seqlens[N] = total). Returns [total] int64.
    """
    positions = torch.arange(total, device=cu_seqlens.device)
    sequence_of_token = torch.searchsorted(cu_seqlens, positions, right=True) - 1
    return positions - cu_seqlens[sequence_of_token]


class ShortConvolution(nn.Conv1d):
    """Causal depthwise 1-D convolution over time (kernel W), with an optional activation and a decoding state.

    The weight has ``nn.Conv1d``'s depthwise layout [C, 1, W]; output t sees inputs t - W + 1 .. t.  The
    decoding state is the last W - 1 inputs, [B, C, W - 1]; zeros stand for "nothing before".

    Args:
        channels: C, the number of channels (one filter each).
        kernel_size: W >= 1.
        bias: add a per-channel bias.
        activation: None, "silu" or "swish" (applied after the convolution).
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False, activation: Optional[str] = "silu"):
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(k for k in ACTIVATIONS if k)} or None, got {activation!r}")
        super().__init__(channels, channels, kernel_size, groups=channels, padding=0, bias=bias)
        self.activation = activation

    def forward(
        self,
        x: torch.Tensor,
        state: Optional[torch.Tensor] = None,
        output_final_state: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Convolve x along time.

        Args:
            x: [B, T, C] inputs.
            state: [B, C, W - 1] the inputs that precede x (a decoding state); zeros when None.
            output_final_state: also return the last W - 1 inputs, [B, C, W - 1], for the next call.
            cu_seqlens: [N + 1] offsets of packed sequences (B == 1): no tap reaches across a boundary.
                Cannot be combined with ``state`` or ``output_final_state``.

        Returns:
            (y [B, T, C] in the dtype of x, final_state [B, C, W - 1] or None).
        """
        if x.dim() != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must have shape [B, T, C={self.in_channels}], got {tuple(x.shape)}")
        B, T, C = x.shape
        W = self.kernel_size[0]
        if cu_seqlens is not None and (state is not None or output_final_state):
            raise ValueError("cu_seqlens cannot be combined with a convolution state (state / output_final_state)")
        if state is not None and state.shape != (B, C, W - 1):
            raise ValueError(f"state must have shape [B, C, W - 1] = [{B}, {C}, {W - 1}], got {tuple(state.shape)}")
        past = x.new_zeros(B, W - 1, C) if state is None else state.to(x.dtype).transpose(1, 2)
        full = torch.cat([past, x], dim=1)  # [B, W - 1 + T, C]
        bias = None if self.bias is None else self.bias
        if cu_seqlens is not None or torch.compiler.is_compiling() or _compiles(x):
            # output t uses input t - s (weight tap W - 1 - s) only when that input is in t's own sequence
            offset = None if cu_seqlens is None else positions_in_sequences(cu_seqlens.to(x.device, torch.long), T)
            y = causal_conv_taps(full, self.weight[:, 0], bias, offset, self.activation)
        else:
            y = F.conv1d(full.transpose(1, 2), self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                         groups=C)
            y = y.transpose(1, 2)
            if self.activation is not None:
                y = ACTIVATIONS[self.activation](y)
        final_state = full[:, full.shape[1] - (W - 1):].transpose(1, 2).contiguous() if output_final_state else None
        return y, final_state


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``weight * x / sqrt(mean(x^2) + eps)``.  x: [..., D] -> [..., D]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dimension with a swish (SiLU) gate.  x, gate: [..., D] -> [..., D] (dtype of x).

    ``norm_before_gate=True`` (Palimpsa, Gated DeltaNet): ``weight * rms_normalise(x) * silu(gate)``.
    ``norm_before_gate=False`` (Mamba2): ``weight * rms_normalise(x * silu(gate))``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, norm_before_gate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps, self.norm_before_gate)


def swiglu_intermediate_size(hidden_size: int, hidden_ratio: float) -> int:
    """Width of a SwiGLU MLP with the parameters of a ``hidden_ratio`` x MLP: 2/3 of it, rounded up to 256.

    (The convention of flash-linear-attention's ``GatedMLP``, which the paper's models use.)
    """
    width = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * math.ceil(width / 256)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases.  x: [..., d] -> [..., d].

    Args:
        hidden_size: d.
        hidden_ratio: sets the width through :func:`swiglu_intermediate_size` when intermediate_size is None.
        intermediate_size: explicit width.
    """

    def __init__(self, hidden_size: int, hidden_ratio: float = 4, intermediate_size: Optional[int] = None):
        super().__init__()
        if intermediate_size is None:
            intermediate_size = swiglu_intermediate_size(hidden_size, hidden_ratio)
        if intermediate_size < 1:
            raise ValueError(f"intermediate_size must be positive, got {intermediate_size}")
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


LOSS_CHUNK_ROWS = 4096


@compiled_on_cuda
def chunk_cross_entropy(logits: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor, with_grad: bool):
    """Summed cross-entropy of one chunk of logits and, ``with_grad``, its gradient: softmax minus one-hot, zero on
    ignored rows.  Softmax in float32 (float64 for float64 logits); when compiled, one pass over the logits for the
    loss and one for the gradient, instead of a float32 copy and four element-wise passes.

    logits: [C, vocab] in the matmul's dtype (overwritten when it is already the softmax's); safe: [C] int64
    targets (any id where ignored); valid: [C] bool.  Returns (the summed loss, a scalar in the softmax's dtype;
    the gradient [C, vocab] in the dtype of logits, or None).
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, safe[:, None])[:, 0]
    total = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    if not with_grad:
        return total, None
    grad = x.sub_(lse[:, None]).exp_()  # softmax, in place
    grad.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
    grad.mul_(valid[:, None].to(acc))
    return total, grad.to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T``, a chunk of rows at a time; gradients made in the forward.

    Each chunk's logits [C, vocab] exist only while that chunk is processed: the forward computes the chunk's
    loss and, when gradients are needed, the chunk's softmax-minus-one-hot and from it the gradients of hidden
    and weight (as Liger-Kernel's fused linear cross-entropy does), so no [N, vocab] tensor is ever stored and
    the backward only scales them.  Matmuls run in ``compute_dtype`` (what autocast would pick), the softmax in
    float32 (float64 for float64 inputs), compiled with the blocks (:func:`chunk_cross_entropy`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int, compute_dtype: torch.dtype):
        acc = torch.promote_types(compute_dtype, torch.float32)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows].to(compute_dtype)
            t = targets[start:start + chunk_rows]
            valid = t != ignore_index
            safe = torch.where(valid, t, torch.zeros_like(t))
            loss, grad_logits = chunk_cross_entropy(h @ w.T, safe, valid, need_hidden or need_weight)
            total += loss
            if grad_logits is not None:  # [C, vocab] in compute_dtype
                if need_hidden:
                    grad_hidden[start:start + chunk_rows] = (grad_logits @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight += (grad_logits.T @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T`` without materialising them (chunks of rows).

    Equals ``F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=..., reduction=...)``, values
    and gradients (up to float rounding), at a memory cost of one [chunk_rows, vocab] block instead of
    [N, vocab].  Under autocast the matmuls run in the autocast dtype, as ``nn.Linear`` would.

    Args:
        hidden: [N, d] (or [..., d], flattened); weight: [vocab, d] (an output head, e.g. tied embeddings).
        targets: [N] (or [...]) int class ids in [0, vocab), or ``ignore_index``.
        reduction: "sum" or "mean" (over the targets that are not ignored; NaN when all are).
        chunk_rows: rows per chunk.

    Returns:
        a float32 scalar (float64 for float64 inputs).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., d] and weight [vocab, d] must agree on d, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dimension), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 class ids, got {targets.dtype}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    if not targets.is_cuda:  # on CUDA, gather's device-side index check catches these (without a sync here)
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {weight.shape[0]}) or {ignore_index}, got "
                             f"{targets[bad][0].item()}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device_type, enabled=False):
        total = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, compute_dtype)
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()


def causal_lm_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   shift_labels: Optional[torch.Tensor] = None, num_items_in_batch=None,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token loss of a causal LM from its final hidden states and output head, without the logits.

    The ``transformers`` contract (``ForCausalLMLoss``): ``labels`` [B, T] are shifted inside (position t
    predicts labels[t + 1]); ``shift_labels`` [B, T] are targets already aligned with the positions (give one of
    the two); the loss is the mean over targets that are not ``ignore_index``, or, with
    ``num_items_in_batch``, their sum divided by it (``num_items_in_batch=1``: the sum).

    hidden_states: [B, T, d]; weight: [vocab, d].  Returns a float32 scalar (float64 for float64 inputs).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("pass exactly one of labels [B, T] (shifted inside) or shift_labels [B, T]")
    if shift_labels is None:
        if labels.shape != hidden_states.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(hidden_states.shape[:-1])}, got {tuple(labels.shape)}")
        shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden_states, weight, shift_labels, ignore_index, reduction="mean")
    total = linear_cross_entropy(hidden_states, weight, shift_labels, ignore_index, reduction="sum")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class RecurrentLayerCache:
    """Decoding state of one recurrent layer, updated in place by the layer's forward.

    Attributes:
        conv_states: name -> [B, C, W - 1], the last inputs of each short convolution.
        recurrent_state: (mu, I), each [B, H, K, V] float32, or None before the first token.
        seen_tokens: number of positions absorbed so far (padding included).

    The batch methods (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``, ``reset``) are
    the ones ``transformers``' ``Cache`` calls on its layers during ``generate()``.
    """

    is_compileable = False
    supports_early_init = False
    is_croppable = False
    is_sliding = False

    def __init__(self) -> None:
        self.conv_states: Dict[str, torch.Tensor] = {}
        self.recurrent_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.seen_tokens = 0

    def __repr__(self) -> str:
        shape = None if self.recurrent_state is None else tuple(self.recurrent_state[0].shape)
        return f"{self.__class__.__name__}(seen_tokens={self.seen_tokens}, state={shape})"

    @property
    def has_previous_state(self) -> bool:
        return self.seen_tokens > 0

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.conv_states = {name: fn(x) for name, x in self.conv_states.items()}
        if self.recurrent_state is not None:
            self.recurrent_state = (fn(self.recurrent_state[0]), fn(self.recurrent_state[1]))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows ``beam_idx`` [B'] in that order (beam search)."""
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` [B']."""
        self._map(lambda x: x[indices.to(x.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times ([B, ...] -> [B * repeats, ...])."""
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """Forget everything (the next call starts a new sequence)."""
        self.conv_states, self.recurrent_state, self.seen_tokens = {}, None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back: crop() is not supported")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1  # no limit: the state has a fixed size whatever the length

    def offload(self) -> None:
        self._map(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self) -> None:  # states are used where they are
        pass
