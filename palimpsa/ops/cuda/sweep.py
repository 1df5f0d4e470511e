"""The per-channel op's reverse sweep in CUDA C++ (``sweep.cu``), compiled at run time by NVRTC.

It is a drop-in for ``chunk_bwd_gluon.unit_bwd_gluon_kernel``: same buffers, same units of chunks, same results
(checked against the float64 reference on the GPU by ``scripts/gpu_gluon_fwd_check.py --variants cuda``).  Each
thread holds K / 16 key rows of 2 value columns; a block of ``warps`` warps covers 4 * warps value columns of one
head and unit (see the source's header for what the C++ does that the Gluon source cannot).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from palimpsa.ops.cuda.nvrtc import MAX_SHARED_BYTES, aligned16, dtype_code, load_kernel

SEGMENT = 16


def shared_bytes(K: int, V: int, warps: int, chunk: int, segment: int = SEGMENT, has_dvar: bool = False,
                 dqk_tokens: int = 2) -> int:
    """Dynamic shared memory of one block (the layout in sweep.cu's header)."""
    rows = K // 16
    nq = 4 if has_dvar else 3
    bv = 4 * warps
    per_warp = (segment // 4) * 2 * (2 * rows) * 32 + 2 * (2 * rows) * 32 + 16 * 33 + 4 * dqk_tokens * K
    return 4 * (2 * chunk * K + chunk * nq * bv + 4 * chunk + warps * per_warp)


def dqk_tokens(K: int, V: int, warps: int, chunk: int, has_dvar: bool, wanted: Optional[int]) -> int:
    """Tokens whose dq and dk the sweep sums at a time (sweep.cu's PDQK): ``wanted`` (2 or 4; None: 2, what the
    GPU checks and timings ran) where a block of ``warps`` warps still fits in shared memory with it, else 2."""
    if wanted not in (None, 2, 4):
        raise ValueError(f"dq and dk are summed per 2 or 4 tokens, got {wanted!r}")
    if wanted == 4 and shared_bytes(K, V, warps, chunk, has_dvar=has_dvar, dqk_tokens=4) <= MAX_SHARED_BYTES:
        return 4
    return 2


def block_warps(K: int, V: int, chunk: int, has_dvar: bool = True) -> Optional[int]:
    """Warps per block for key size K and value size V: the most (8, 4, 2 or 1) whose 4 * warps value columns
    divide V and whose shared memory fits a block; None when the sweep cannot run (K not a multiple of 16 or
    above 128)."""
    if K % 16 or not 16 <= K <= 128:
        return None
    for warps in (8, 4, 2, 1):
        if V % (4 * warps) == 0 and shared_bytes(K, V, warps, chunk, has_dvar=has_dvar) <= MAX_SHARED_BYTES:
            return warps
    return None


def kernel_defines(K: int, V: int, H: int, chunk: int, unit_chunks: int, warps: int, dtype: torch.dtype,
                   has_dvar: bool, has_init: bool, varlen: bool, segment: int = SEGMENT,
                   g_dtype: Optional[torch.dtype] = None, do_dtype: Optional[torch.dtype] = None,
                   aligned: bool = True, dqk: int = 2) -> Dict[str, int]:
    """sweep.cu's compile-time parameters (see its header); ``dtype`` is q's (and k, v, beta's), ``g_dtype`` and
    ``do_dtype`` those of g and of the output gradients (default: ``dtype``); ``aligned``: every staged input
    allows 16-byte vector loads (:func:`palimpsa.ops.cuda.nvrtc.aligned16`); ``dqk``: tokens whose dq and dk are
    summed at a time (:func:`dqk_tokens`)."""
    defines = dict(PK=K, PV=V, PH=H, PC=chunk, PU=unit_chunks, PWARPS=warps, PSEG=segment, PDQK=dqk,
                   PIN=dtype_code(dtype, "q"),
                   PG=dtype_code(g_dtype or dtype, "g"), PDO=dtype_code(do_dtype or dtype, "do"), PDVAR=has_dvar,
                   PINIT=has_init, PVARLEN=varlen, PALIGNED=aligned,
                   PSHARED_BYTES=shared_bytes(K, V, warps, chunk, segment, has_dvar, dqk))
    return defines


def launch_sweep(q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar, dq, dk, dv, dbeta,
                 dg_part, dg_anchor, dprior_part, dmu0, dimp0, cu_seqlens, unit_indices, chunk_offsets, scale: float,
                 T: int, NU: int, chunk: int, unit_chunks: int, has_init: bool, varlen: bool,
                 dqk: Optional[int] = None) -> None:
    """Run the sweep over NU units on q's device; arguments as ``unit_bwd_gluon_kernel``'s (q, k [B*T, H, K],
    v, beta, do, dvar [B*T, H, V], g [B*T, H]; k, v, beta, dv, dbeta of q's dtype, g, do and dvar of any
    of bfloat16, float16, float32; dq, dk float32 zero-initialised; dprior_part [V / 4, NU, H]); dvar None without
    a variance gradient.  dg comes as terms (sweep.cu's header): dg_part [B*T, H] per token and dg_anchor [NC, H]
    per chunk of ``chunk`` tokens, both float32 zero-initialised; ``chunk_bwd.dg_from_token_terms`` sums them.
    ``dqk``: tokens whose dq and dk are summed at a time, as :func:`dqk_tokens` allows (None: 2)."""
    K, V, H = q.shape[-1], v.shape[-1], q.shape[-2]
    has_dvar = dvar is not None
    warps = block_warps(K, V, chunk, has_dvar)
    if warps is None:
        raise ValueError(f"the CUDA sweep needs K a multiple of 16 up to 128 and V a multiple of 4, got K = {K}, "
                         f"V = {V}")
    if has_dvar and dvar.dtype != do.dtype:
        dvar = dvar.to(do.dtype)
    for name, x in (("k", k), ("v", v), ("beta", beta), ("dv", dv), ("dbeta", dbeta)):
        if x.dtype != q.dtype:
            raise TypeError(f"the CUDA sweep needs {name} in q's dtype {q.dtype}, got {x.dtype}")
    dqk = dqk_tokens(K, V, warps, chunk, has_dvar, dqk)
    defines = kernel_defines(K, V, H, chunk, unit_chunks, warps, q.dtype, has_dvar, has_init, varlen, g_dtype=g.dtype,
                             do_dtype=do.dtype, aligned=aligned16(K, V, q, k, v, beta, do, dvar), dqk=dqk)
    smem = shared_bytes(K, V, warps, chunk, has_dvar=has_dvar, dqk_tokens=dqk)
    kernel = load_kernel("sweep.cu", defines, "palimpsa_sweep", smem, q.device)
    kernel((V // (4 * warps), NU, H), 32 * warps,
           (q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar, dq, dk, dv, dbeta,
            dg_part, dg_anchor, dprior_part, dmu0, dimp0, cu_seqlens, unit_indices, chunk_offsets, float(scale), int(T),
            int(NU)))
