"""Pieces shared by the Gluon kernels of the per-channel op (chunk_fwd_gluon, chunk_bwd_gluon): the reciprocal,
masked loads of a token's key rows and value columns, a chunk-start state tile, where a unit of chunks lies, and a
chunk's q and k rows staged in shared memory.

Written against :mod:`palimpsa.ops.triton.gluon_shim`, so they compile as Gluon on a GPU and run as plain
Triton under the CPU interpreter.  Layouts come from the arguments (the offsets' layouts), so one function serves
every part and kernel.
"""

from __future__ import annotations

import triton.language as tl  # parameter annotations: the interpreter knows only tl.constexpr

from palimpsa.ops.triton.gluon_shim import gl, jit, shared_memory_reinterpret_is_private


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


@jit
def _view_public(buffer, shape: tl.constexpr, layout: tl.constexpr):
    """The shared-memory ``buffer`` seen with another shape and layout, same memory (Gluon of Triton 3.7+)."""
    return buffer.reinterpret(gl.float32, shape, layout)


@jit
def _view_private(buffer, shape: tl.constexpr, layout: tl.constexpr):
    """The same through Triton 3.6's Gluon, where the method is private."""
    return buffer._reinterpret(gl.float32, shape, layout)


# chosen once: the kernels call ``shared_view``, whichever Triton is installed
shared_view = _view_private if shared_memory_reinterpret_is_private() else _view_public


@jit
def allocate_rows(C: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, HAS_B: tl.constexpr):
    """Shared memory for a chunk's staged q and k rows (see stage_rows): the rank-3 buffers stage_rows writes, [2 C,
    KA, 1] and [2 C, KB, 1] (token-major, a token's key rows contiguous), and their rank-2 views, from which a step
    reads one token's rows ([rows, 1] through ``.index(j)``).  Returns (stage_a, in_a, stage_b, in_b); without
    HAS_B the second pair repeats the first."""
    ROWS3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 2, 0])
    ROWS_FIRST: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0, 1])
    stage_a = gl.allocate_shared_memory(gl.float32, [2 * C, KA, 1], ROWS3)
    in_a = shared_view(stage_a, [2 * C, KA, 1], ROWS_FIRST)
    stage_b = stage_a
    in_b = in_a
    if HAS_B:
        stage_b = gl.allocate_shared_memory(gl.float32, [2 * C, KB, 1], ROWS3)
        in_b = shared_view(stage_b, [2 * C, KB, 1], ROWS_FIRST)
    return stage_a, in_a, stage_b, in_b


@jit
def _stage_part(ptr, dst, tok_h, tok_ok, offs, mask, factor, K: tl.constexpr):
    """The key rows ``offs`` of a [tokens * H, K] tensor at the rows tok_h ([C]), float32 times ``factor``, into
    the shared-memory view ``dst`` [C, rows, 1] (zeros where not ``tok_ok`` or not ``mask``); one store."""
    x = gl.load(ptr + gl.expand_dims(tok_h * K, 1) + gl.expand_dims(offs, 0),
                mask=gl.expand_dims(tok_ok, 1) & gl.expand_dims(mask, 0), other=0.0)
    dst.store(gl.expand_dims(x.to(gl.float32) * factor, 2))


@jit
def stage_rows(q, k, in_a, in_b, cs, n_tok, i_h, scale, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
               KA: tl.constexpr, KB: tl.constexpr, WARPS: tl.constexpr, HAS_B: tl.constexpr):
    """The q (times ``scale``) and k rows of the C tokens from cs, float32, into shared memory once, for every
    step of the chunk to read there: in_a [2 C, KA, 1] and in_b [2 C, KB, 1] (the two key parts; in_b unused
    without HAS_B) hold q of the chunk's token j in row j and k in row C + j.  Tokens at or after n_tok are zeros.
    One store per quantity and part, by all WARPS warps of the program."""
    L3R: gl.constexpr = gl.BlockedLayout([1, 4, 1], [4, 8, 1], [WARPS, 1, 1], [2, 1, 0])
    ROWS2: gl.constexpr = gl.SliceLayout(2, L3R)
    tok = gl.arange(0, C, layout=gl.SliceLayout(1, ROWS2))
    tok_h = gl.cast(cs + tok, gl.int64) * H + i_h
    tok_ok = tok < n_tok
    offs = gl.arange(0, KA, layout=gl.SliceLayout(0, ROWS2))
    _stage_part(q, in_a.slice(0, C), tok_h, tok_ok, offs, offs < K, scale, K)
    _stage_part(k, in_a.slice(C, C), tok_h, tok_ok, offs, offs < K, 1.0, K)
    if HAS_B:
        offs = KA + gl.arange(0, KB, layout=gl.SliceLayout(0, ROWS2))
        _stage_part(q, in_b.slice(0, C), tok_h, tok_ok, offs, offs < K, scale, K)
        _stage_part(k, in_b.slice(C, C), tok_h, tok_ok, offs, offs < K, 1.0, K)
