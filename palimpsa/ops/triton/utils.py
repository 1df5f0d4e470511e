"""Shared helpers of the Palimpsa Triton kernels: tile sizes, chunk tables, the fast reciprocal.

Every kernel keeps one head's state as a [K, BV] tile in registers.  Triton tiles must be powers of two,
so a head size K that is not one (48, 96, 192, ...) is covered by two tiles, a "part A" of KA rows and a
"part B" of KB rows (96 = 64 + 32, 48 = 32 + 16): no work is wasted on padding rows.  V is split across
programs in blocks of BV columns.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Tokens whose states are recomputed per step in the backward sub-blocks (see chunk_bwd.py).
SUB_BLOCK = 4
MIN_TILE = 16  # tl.dot needs every dimension >= 16


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_index_fix() -> None:
    """Let the Triton interpreter use run-time loop bounds under NumPy >= 2.4.

    Triton 3.6's interpreter turns a scalar (a one-element array) into a Python int with ``int(array)``,
    which NumPy 2.4 rejects for arrays of one dimension; ``range(start, end)`` with tensor bounds then
    fails.  This re-registers ``__index__`` with ``.item()``; it touches the interpreter only.
    """
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    if getattr(interpreter, "_palimpsa_index_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._palimpsa_index_fix = True


if interpreting():
    _interpreter_index_fix()


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: triton.cdiv and triton.next_power_of_2 are constexpr functions whose Python calls
    cost microseconds each (Triton 3.6), ~15 of them in every fwd+bwd."""
    return -(-a // b)


def k_parts(K: int) -> Tuple[int, int]:
    """Split the key size K into two power-of-two tiles (KA, KB), KB == 0 when one tile covers K.

    K is rounded up to a multiple of 16 first; then KA is the largest power of two not above it and KB
    covers the rest (96 -> (64, 32), 48 -> (32, 16), 64 -> (64, 0), 100 -> (64, 64)).
    """
    padded = max(MIN_TILE, -(-K // MIN_TILE) * MIN_TILE)
    ka = 1 << (padded.bit_length() - 1)
    rest = padded - ka
    kb = 0 if rest == 0 else max(MIN_TILE, next_power_of_two(rest))
    return ka, kb


def v_block(V: int, max_block: int) -> int:
    """Columns of V per program: the largest power of two dividing V (>= 16, <= max_block), else padded."""
    block = 1
    while V % (block * 2) == 0 and block * 2 <= max_block:
        block *= 2
    if block >= MIN_TILE:
        return block
    return max(MIN_TILE, min(max_block, next_power_of_two(V)))


def state_block(size: int, max_block: int = 64) -> int:
    """Tile size along K or V for the chunk-state kernel (plain masked tiles, >= 16)."""
    return v_block(size, max_block)


class SequenceLayout:
    """How the flattened tokens [B * T] split into sequences and chunks.

    Without ``cu_seqlens`` every one of the B rows is a sequence of T tokens.  With it, B == 1 and the
    packed sequences are given by the offsets.  ``chunk_table(C)`` returns, for every chunk of C tokens
    of every sequence, (sequence index, chunk index in the sequence) as an int32 [NC, 2] tensor and the
    offsets [N + 1] of each sequence's first chunk.
    """

    def __init__(self, B: int, T: int, cu_seqlens: Optional[torch.Tensor], device: torch.device):
        self.B, self.T, self.device = B, T, device
        self.cu_seqlens = cu_seqlens
        if cu_seqlens is None:
            self.N = B
            self.lengths = None
            self.cu32 = None
        else:
            self.N = cu_seqlens.numel() - 1
            self.lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            self.cu32 = cu_seqlens.to(device=device, dtype=torch.int32)
        self._tables = {}

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    def num_chunks(self, C: int) -> int:
        """Total number of chunks of C tokens over all sequences."""
        if not self.varlen:
            return self.B * cdiv(self.T, C)
        return sum(cdiv(n, C) for n in self.lengths)

    def chunk_table(self, C: int):
        """(indices int32 [NC, 2], offsets int32 [N + 1]) for chunks of C tokens; (None, None) if not varlen."""
        if not self.varlen:
            return None, None
        if C not in self._tables:
            counts = [cdiv(n, C) for n in self.lengths]
            seq = torch.repeat_interleave(torch.arange(self.N), torch.tensor(counts))
            within = torch.cat([torch.arange(c) for c in counts])
            indices = torch.stack([seq, within], 1).to(device=self.device, dtype=torch.int32).contiguous()
            offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(device=self.device, dtype=torch.int32)
            self._tables[C] = (indices, offsets)
        return self._tables[C]

    def max_length(self) -> int:
        return self.T if not self.varlen else max(self.lengths)


@triton.jit
def reciprocal(x, FAST: tl.constexpr):
    """1 / x; one MUFU.RCP instruction on the GPU (x is a precision >= the prior > 0, far from 0/inf)."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def masked_if(mask, cond):
    """``mask & cond`` for a block mask and a scalar condition (e.g. "token t is inside the sequence").

    Written as a select rather than ``&``: Triton's CPU interpreter (3.7 and later) broadcasts a scalar
    comparison as int32, and ``tl.load`` then rejects the mask ("mask has unsupported dtype").  Compiled,
    both forms give the same code.  Kernels combine a block mask with a scalar condition only through this.
    """
    return tl.where(cond, mask, False)


@triton.jit
def log_decay_to_end(g, tok_h, has_next, H: tl.constexpr):
    """Log decay from just after each token of a chunk to the chunk's end, ``g_{t+1} + ... + g_end``.

    g: log decays [tokens, H]; tok_h: [C] offsets ``token * H + head`` of the chunk's tokens; has_next: [C],
    whether token t + 1 is still in the chunk (and the sequence).  Sums the following tokens' log decays in
    reverse, never as a difference of cumulative sums (see palimpsa/ops/decay.py): exact for g = -1e4, and
    -inf after a full reset (its exp is the exact 0).  Returns [C] float32.
    """
    g_next = tl.load(g + tok_h + H, mask=has_next, other=0.0).to(tl.float32)
    return tl.cumsum(g_next, 0, reverse=True)


@triton.jit
def sequence_bounds(i_n, cu_seqlens, T, IS_VARLEN: tl.constexpr):
    """Token range [bos, eos) of sequence i_n in the flattened [B * T] token axis."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        bos = i_n * T
        eos = bos + T
    return bos, eos


@triton.jit
def locate_chunk(i_c, chunk_indices, chunk_offsets, cu_seqlens, T, C: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For global chunk i_c: (sequence, chunk index in the sequence, bos, eos, global index of chunk 0)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int32)
        i_w = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int32)
        base = tl.load(chunk_offsets + i_n).to(tl.int32)
    else:
        NT = tl.cdiv(T, C)
        i_n = i_c // NT
        i_w = i_c % NT
        base = i_n * NT
    bos, eos = sequence_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    return i_n, i_w, bos, eos, base
