"""Pieces shared by the Gluon kernels of the per-channel op (chunk_fwd_gluon, chunk_bwd_gluon): the reciprocal,
masked loads of a token's key rows and value columns, a chunk-start state tile, and where a unit of chunks lies.

Written against :mod:`palimpsa.ops.triton.gluon_shim`, so they compile as Gluon on a GPU and run as plain
Triton under the CPU interpreter.  Layouts come from the arguments (the offsets' layouts), so one function serves
every part and kernel.
"""

from __future__ import annotations

import triton.language as tl  # parameter annotations: the interpreter knows only tl.constexpr

from palimpsa.ops.triton.gluon_shim import gl, jit


@jit
def reciprocal(x):
    """1 / x in one MUFU instruction (x is a precision >= the prior > 0, far from 0 and inf)."""
    return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@jit
def masked_if(mask, cond):
    """``mask & cond`` for a block mask and a scalar condition, as a select (see utils.masked_if: Triton's CPU
    interpreter 3.7+ rejects the ``&`` form as a load mask)."""
    return gl.where(cond, mask, False)


@jit
def load_rows(ptr, tok_h, offs, mask, valid, K: tl.constexpr):
    """Key rows ``offs`` of a [tokens * H, K] tensor at row tok_h, float32 (zeros when not ``valid``)."""
    return gl.load(ptr + tok_h * K + offs, mask=masked_if(mask, valid), other=0.0).to(gl.float32)


@jit
def load_cols(ptr, tok_h, offs, mask, valid, V: tl.constexpr):
    """Value columns ``offs`` of a [tokens * H, V] tensor at row tok_h, float32 (zeros when not ``valid``)."""
    return gl.load(ptr + tok_h * V + offs, mask=masked_if(mask, valid), other=0.0).to(gl.float32)


@jit
def load_state(mean_ptr, imp_ptr, off, offs_k, offs_v, mask_k, mask_v, V: tl.constexpr):
    """A [rows, BV] part of a state pair (M, I) at ``off`` of a [..., K, V] float32 tensor; masked entries get
    I = 1 (never divided into an output)."""
    tile = gl.expand_dims(offs_k, 1) * V + gl.expand_dims(offs_v, 0)
    mask = gl.expand_dims(mask_k, 1) & gl.expand_dims(mask_v, 0)
    mean = gl.load(mean_ptr + off + tile, mask=mask, other=0.0).to(gl.float32)
    imp = gl.load(imp_ptr + off + tile, mask=mask, other=1.0).to(gl.float32)
    return mean, imp


@jit
def locate_unit(i_u, unit_indices, cu_seqlens, chunk_offsets, T, C: tl.constexpr, W: tl.constexpr,
                IS_VARLEN: tl.constexpr):
    """Unit i_u of W tokens (the whole grid's numbering): (sequence, unit index in it, the sequence's token
    range [bos, eos), global index of the sequence's first chunk of C tokens)."""
    if IS_VARLEN:
        i_n = gl.load(unit_indices + 2 * i_u)
        i_w = gl.load(unit_indices + 2 * i_u + 1)
        bos = gl.load(cu_seqlens + i_n)
        eos = gl.load(cu_seqlens + i_n + 1)
        cbase = gl.load(chunk_offsets + i_n)
    else:
        NW = gl.cdiv(T, W)
        i_n = i_u // NW
        i_w = i_u % NW
        bos = i_n * T
        eos = bos + T
        cbase = i_n * gl.cdiv(T, C)
    return i_n, i_w, bos, eos, cbase
