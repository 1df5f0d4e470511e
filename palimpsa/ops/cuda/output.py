"""The per-channel op's output kernel in CUDA C++ (``output.cu``), compiled at run time by NVRTC.

A drop-in for ``chunk_fwd_gluon.fwd_output_gluon``: same inputs (the chunk-start states of ``chunk_states``), same
outputs, checked against the float64 reference on the GPU by ``scripts/gpu_gluon_fwd_check.py --variants cuda``.
Each thread holds K / 16 key rows of 2 value columns; a block of ``warps`` warps covers 4 * warps value columns of
one chunk and head (:func:`fwd_output_cuda`), or of one sequence and head, walked chunk after chunk from the initial
state (:func:`fwd_walk_cuda`: no chunk-start states needed).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from palimpsa.ops.cuda.nvrtc import SHARED_PER_SM, SHARED_RESERVED_PER_BLOCK, aligned16, dtype_code, load_kernel
from palimpsa.ops.triton.utils import SequenceLayout

BLOCKS_PER_SM = 2  # the warps per block are chosen so that at least this many blocks fit a multiprocessor


def shared_bytes(K: int, warps: int, chunk: int) -> int:
    """Dynamic shared memory of one block (the layout in output.cu)."""
    return 4 * (2 * chunk * K + chunk * 2 * 4 * warps + 2 * chunk + warps * 16 * 33)


def block_warps(K: int, V: int, chunk: int) -> Optional[int]:
    """Warps per block: the most (8, 4, 2, 1) whose 4 * warps value columns divide V and of whose blocks
    BLOCKS_PER_SM fit a multiprocessor's shared memory; None when the kernel cannot run (K not a multiple of 16 or
    above 128, V not a multiple of 4, or a chunk too long for shared memory)."""
    if K % 16 or not 16 <= K <= 128:
        return None
    for warps in (8, 4, 2, 1):
        per_block = shared_bytes(K, warps, chunk) + SHARED_RESERVED_PER_BLOCK
        if V % (4 * warps) == 0 and BLOCKS_PER_SM * per_block <= SHARED_PER_SM:
            return warps
    return None


def kernel_defines(K: int, V: int, H: int, chunk: int, warps: int, dtype: torch.dtype, g_dtype: torch.dtype,
                   with_variance: bool, varlen: bool, aligned: bool = True, walk: bool = False,
                   has_init: bool = False, final: bool = False, min_blocks: int = 1) -> Dict[str, int]:
    """output.cu's compile-time parameters (``aligned``: see sweep.kernel_defines; ``walk``: blocks walk whole
    sequences, from an initial state if ``has_init``, writing the ``final`` state; ``min_blocks``: blocks a
    multiprocessor must hold, which caps the registers)."""
    defines = dict(PK=K, PV=V, PH=H, PC=chunk, PWARPS=warps, PIN=dtype_code(dtype, "q"), PG=dtype_code(g_dtype, "g"),
                   PDO=dtype_code(dtype, "q"), PVAR=with_variance, PVARLEN=varlen, PALIGNED=aligned,
                   PSHARED_BYTES=shared_bytes(K, warps, chunk), PWALK=walk, PINIT=walk and has_init,
                   PFINAL=walk and final, PMINBLOCKS=min_blocks)
    return defines


def fwd_output_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    prior: torch.Tensor, scale: float, layout: SequenceLayout, output_variance: bool, states,
                    chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The chunk path's outputs from chunk-start ``states`` by the CUDA kernel.

    q, k [B, T, H, K]; v, beta [B, T, H, V] (q's dtype); g [B, T, H] (bfloat16, float16 or float32); prior [H]
    float32; states: (M, I) at every chunk's start, [chunks, H, K, V] float32.  Returns o [B, T, H, V] (dtype of
    q) and var (or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    warps = block_warps(K, V, chunk_size)
    if warps is None:
        raise ValueError(f"the CUDA output kernel needs K a multiple of 16 up to 128, V a multiple of 4 and a chunk "
                         f"that fits shared memory, got K = {K}, V = {V}, chunk_size = {chunk_size}")
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if x.dtype != q.dtype:
            raise TypeError(f"the CUDA output kernel needs {name} in q's dtype {q.dtype}, got {x.dtype}")
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    var = torch.empty_like(o) if output_variance else None
    chunk_indices, _ = layout.chunk_table(chunk_size)
    h_mean, h_imp = states
    defines = kernel_defines(K, V, H, chunk_size, warps, q.dtype, g.dtype, output_variance, layout.varlen,
                             aligned16(K, V, q, k, v, beta))
    kernel = load_kernel("output.cu", defines, "palimpsa_output", shared_bytes(K, warps, chunk_size), q.device)
    kernel((V // (4 * warps), layout.num_chunks(chunk_size), H), 32 * warps,
           (q, k, v, g, beta, prior, h_mean, h_imp, o, var, None, None, layout.cu32, chunk_indices, float(scale),
            int(T)))
    return o, var


# The sequence walk's chunk (its staging area, and the inputs one chunk ahead in registers): one token a lane, for
# the scan of its log decays (output.cu asserts it)
WALK_CHUNK = 32


def walk_min_blocks(K: int, warps: int, dtype: torch.dtype = torch.bfloat16, aligned: bool = True) -> int:
    """Blocks of the sequence walk a multiprocessor must hold (which caps the registers a thread): 24 warps where a
    thread holds up to 6 key rows and the chunk ahead arrives in 16-byte vectors of 16-bit floats (85 registers hold
    it without spills), else 16."""
    narrow = dtype in (torch.bfloat16, torch.float16) and aligned
    return max(1, (24 if K <= 96 and narrow else 16) // warps)


def walk_warps(K: int, V: int) -> Optional[int]:
    """Warps per block of the sequence walk: as :func:`block_warps` for its chunks of :data:`WALK_CHUNK`."""
    return block_warps(K, V, WALK_CHUNK)


def fwd_walk_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  prior: torch.Tensor, scale: float, layout: SequenceLayout, output_variance: bool,
                  initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]], output_final_state: bool):
    """The op's outputs by blocks that each walk one sequence (of a value block and head) from its initial state,
    chunk after chunk: no chunk-start states.

    q, k [B, T, H, K]; v, beta [B, T, H, V] (q's dtype); g [B, T, H]; prior [H] float32; initial_state (mu, I), each
    [N, H, K, V] float32, or None.  Returns o [B, T, H, V] (dtype of q), var or None, and (mu, I) after each
    sequence, each [N, H, K, V] float32, or None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    warps = walk_warps(K, V)
    if warps is None:
        raise ValueError(f"the CUDA output kernel needs K a multiple of 16 up to 128 and V a multiple of 4, got "
                         f"K = {K}, V = {V}")
    N = layout.N
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if x.dtype != q.dtype:
            raise TypeError(f"the CUDA output kernel needs {name} in q's dtype {q.dtype}, got {x.dtype}")
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    var = torch.empty_like(o) if output_variance else None
    final = None
    if output_final_state:
        final = (torch.empty(N, H, K, V, device=q.device, dtype=torch.float32),
                 torch.empty(N, H, K, V, device=q.device, dtype=torch.float32))
    mu0, imp0 = initial_state if initial_state is not None else (None, None)
    aligned = aligned16(K, V, q, k, v, beta)
    defines = kernel_defines(K, V, H, WALK_CHUNK, warps, q.dtype, g.dtype, output_variance, layout.varlen, aligned,
                             walk=True, has_init=initial_state is not None, final=output_final_state,
                             min_blocks=walk_min_blocks(K, warps, q.dtype, aligned))
    kernel = load_kernel("output.cu", defines, "palimpsa_output", shared_bytes(K, warps, WALK_CHUNK), q.device)
    kernel((V // (4 * warps), N, H), 32 * warps,
           (q, k, v, g, beta, prior, mu0, imp0, o, var, final[0] if final else None, final[1] if final else None,
            layout.cu32, None, float(scale), int(T)))
    return o, var, final
