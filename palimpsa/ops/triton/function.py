"""Autograd and ``torch.compile`` glue of the Palimpsa Triton kernels.

The forward and the backward are ``torch.library`` custom ops (``palimpsa_triton::fwd`` and
``palimpsa_triton::bwd``) tied together with ``register_autograd``, so that a compiled graph sees each op as one
opaque node (no graph break inside).  Eager code runs the same two implementations through a plain
``torch.autograd.Function`` (:class:`_EagerChunkOp`): the custom ops' dispatch costs the host ~0.1 ms per fwd+bwd
(``scripts/cpu_host_glue.py --per-channel``), which at small shapes is time the GPU waits.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from palimpsa.ops.backends import on_device
from palimpsa.ops.checks import PreparedInputs
from palimpsa.ops.triton.chunk_bwd import BWD_CHUNK, chunk_bwd
from palimpsa.ops.triton.chunk_fwd import fwd_output
from palimpsa.ops.triton.chunk_state import chunk_states
from palimpsa.ops.triton.config import (BWD_BACKENDS, CONFIG, FWD_BACKENDS, TRITON_TARGET_PROGRAMS, output_columns,
                                       output_inputs, sweep_tuning)
from palimpsa.ops.triton.step import launch_step
from palimpsa.ops.triton.utils import SequenceLayout, interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_CHUNK_SIZE = 64


# Where "auto" picks the Gluon kernels: the key sizes at which they passed the float64 check on an H200 and ran faster
# than the Triton ones (results/bench/README.md), on that architecture (compute capability 9.0, the H200's and H100's)
# only.  The output kernel: K = 48, 64 and 96 (fourth session, calls 3 and 5), and K = 128 with two columns a thread and
# staged rows once those were read without bank conflicts (eleventh session, gluon_d128_fwd_h200_e721f0d.md: checked at
# d128 and varlen, then forward 1.349 -> 1.193 ms at d128). The reverse sweep: the same and K = 128 (one column per
# thread, staged inputs, config.SWEEP_TUNED[128]: checked at d128 and on a varlen batch, then 15.64 -> 11.44 ms fwd+bwd
# at d128, tenth session, gluon_d128_check_h200_eb446bb.md).  Other key sizes run the Triton kernels until they are
# measured.
GLUON_FWD_KEY_SIZES = frozenset({48, 64, 96, 128})
GLUON_BWD_KEY_SIZES = frozenset({48, 64, 96, 128})
GLUON_CAPABILITIES = ((9, 0),)
# Where "auto" picks the CUDA C++ reverse sweep (palimpsa/ops/cuda/sweep.cu) over the Gluon one: the key sizes at which
# it passed the float64 checks on an H200 and ran faster (twelfth session, cuda_sweep_h200_*.md in results/bench/:
# fwd+bwd 760M-like 18.09 -> 13.65 ms, 170M-like 3.49 -> 2.23, d64 3.72 -> 3.41, d128 10.97 -> 10.41), on the same
# architecture, when NVRTC can be loaded (else the Gluon sweep runs).
CUDA_BWD_KEY_SIZES = frozenset({48, 64, 96, 128})
# Where "auto" picks the CUDA C++ output kernel (palimpsa/ops/cuda/output.cu) over the Gluon one, on the same terms:
# checked at all four shapes and varlen, then faster at K = 48 (ncu, 170M-like: 0.323 ms against the Gluon kernel's
# 0.388, results/bench/ncu_h200_1f03bb5/), K = 64 (d64 forward 0.597 against 0.623 ms, cuda_vec_h200_1f03bb5.md) and,
# once a chunk's loads were all issued before any store (twelfth session, cuda_staged_h200_89ef9fb.md), K = 96
# (760M-like 2.581 against 2.776 ms); not at K = 128 (d128 1.202 against 1.191).
CUDA_FWD_KEY_SIZES = frozenset({48, 64, 96})
# Where "auto" has the CUDA output kernel walk whole sequences (no chunk-start states; output.cu's PWALK) rather than
# run chunks in parallel from chunk-start states: the key sizes at which it passed the float64 checks on an H200 and
# ran faster (thirteenth session, walk_h200_942ba6d.md: forward 760M-like 2.581 -> 2.091 ms, 170M-like 0.531 -> 0.332,
# d64 0.610 -> 0.459, d128 1.191 -> 1.011; with states scaled by the inverse decay in its chunks, 185c9f7, checked again
# at the four shapes, whose chunks all ran scaled: 1.912, 0.329, 0.444, 0.935, walk_scaled_h200_185c9f7.md), where
# "auto" would run the Gluon or CUDA output kernel and NVRTC loads;
# and only while the walk keeps at least WALK_MIN_WARPS_PER_SM warps on each multiprocessor (it cannot spread a
# sequence's chunks over the GPU: the fewest measured faster were d128's 1024 warps, 7.8 a multiprocessor).
CUDA_WALK_KEY_SIZES = frozenset({48, 64, 96, 128})
WALK_MIN_WARPS_PER_SM = 7
MAX_GRID_Y = 65535  # a CUDA grid's second dimension: the walk's sequences
# the CUDA sweep's units are sized for this many warps (of 4 value columns): whole sequences at every benchmark shape
# (the Gluon sweep's 1536 gave two units a sequence at d128, and so the local-adjoint pass)
CUDA_TARGET_PROGRAMS = 1024


def _nvrtc_available() -> bool:
    from palimpsa.ops.cuda.nvrtc import nvrtc_library

    try:
        nvrtc_library()
    except OSError:
        return False
    return True


def _gluon_measured_faster(q: torch.Tensor, key_sizes: frozenset) -> bool:
    """Whether the Gluon kernel was checked and measured faster for ``q``'s device and key size K (one of
    ``key_sizes``)."""
    if not q.is_cuda or interpreting():
        return False
    if torch.cuda.get_device_capability(q.device) not in GLUON_CAPABILITIES:
        return False
    return q.shape[-1] in key_sizes


def resolve_backend(setting: str, q: torch.Tensor, what: str, allowed=FWD_BACKENDS,
                    key_sizes: frozenset = GLUON_FWD_KEY_SIZES) -> str:
    """The kernel family that runs for ``setting`` (one of ``allowed``: "auto", "triton" or "gluon") on queries
    ``q`` [B, T, H, K].

    "auto" gives "gluon" only where :func:`_gluon_measured_faster` for ``key_sizes``, else "triton".  ``what``
    names the setting in the error for anything else ("the forward backend (CONFIG.fwd_backend /
    PALIMPSA_FWD_BACKEND)").
    """
    if setting not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {setting!r}")
    if setting == "auto":
        return "gluon" if _gluon_measured_faster(q, key_sizes) else "triton"
    return setting


def _cuda_or(chosen: str, setting: str, q: torch.Tensor, measured: bool, fits: Optional[bool], what: str,
             needs: str) -> str:
    """The CUDA C++ kernel's place in the choice ``chosen`` of ``setting``: "auto" becomes "cuda" where the Gluon
    kernel would run, the CUDA one was ``measured`` faster, ``fits`` (it can run this shape) and NVRTC loads; an
    explicit "cuda" raises ValueError naming ``what`` when it cannot run here (``needs``: its shape requirements;
    ``fits`` None: not known yet)."""
    if setting == "auto" and chosen == "gluon" and measured and fits and _nvrtc_available():
        return "cuda"
    if chosen == "cuda":
        if not q.is_cuda or interpreting():
            raise ValueError(f"{what} 'cuda' runs on an NVIDIA GPU only (not on the CPU or under TRITON_INTERPRET)")
        if fits is False:
            raise ValueError(f"{what} 'cuda' needs {needs}")
    return chosen


def output_kernel(q: torch.Tensor, V: Optional[int] = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    """The chunk path's output kernel for ``q`` [B, T, H, K], value size V and chunks of ``chunk_size``, from
    ``CONFIG.fwd_backend``: "triton", "gluon" (under the CPU interpreter the Gluon source runs as plain Triton, see
    palimpsa/ops/triton/gluon_shim.py) or "cuda" (palimpsa/ops/cuda/output.cu: an NVIDIA GPU, K a multiple of 16 up
    to 128, V a multiple of 4; an explicit "cuda" that cannot run raises ValueError).  "auto" gives "cuda" where the
    Gluon kernel would run, K is one of :data:`CUDA_FWD_KEY_SIZES`, V is given and NVRTC loads."""
    from palimpsa.ops.cuda.output import block_warps

    K = q.shape[-1]
    chosen = resolve_backend(CONFIG.fwd_backend, q, "the forward backend (CONFIG.fwd_backend / PALIMPSA_FWD_BACKEND)")
    fits = None if V is None else block_warps(K, V, chunk_size) is not None
    return _cuda_or(chosen, CONFIG.fwd_backend, q, K in CUDA_FWD_KEY_SIZES and chunk_size <= DEFAULT_CHUNK_SIZE,
                    fits, "fwd_backend", "K a multiple of 16 up to 128, V a multiple of 4 and chunks that fit shared "
                    f"memory, got K = {K}, V = {V}, chunk_size = {chunk_size}")


def walk_forward(q: torch.Tensor, V: int, sequences: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bool:
    """Whether the chunk path's forward runs as the CUDA output kernel walking whole sequences (``sequences`` of
    them, of queries ``q`` [B, T, H, K] and value size V) instead of chunk-start states then chunks in parallel.

    ``CONFIG.fwd_walk`` True asks for it, whatever ``CONFIG.fwd_backend`` says (ValueError where the CUDA output
    kernel cannot run); False refuses it; None ("auto") takes it when ``CONFIG.fwd_backend`` is "auto" (and "auto"
    would run the Gluon or CUDA output kernel here, and NVRTC loads) or "cuda", K is one of
    :data:`CUDA_WALK_KEY_SIZES` and the walk keeps at least :data:`WALK_MIN_WARPS_PER_SM` warps on each
    multiprocessor."""
    from palimpsa.ops.cuda.output import walk_warps

    K = q.shape[-1]
    fits = walk_warps(K, V) is not None and sequences <= MAX_GRID_Y
    if CONFIG.fwd_walk:
        _cuda_or("cuda", "cuda", q, True, fits, "fwd_walk",
                 f"K a multiple of 16 up to 128, V a multiple of 4 and at most {MAX_GRID_Y} sequences (one block row "
                 f"each), got K = {K}, V = {V}, {sequences} sequences")
        return True
    if CONFIG.fwd_walk is False or CONFIG.fwd_backend not in ("auto", "cuda"):
        return False
    if CONFIG.fwd_backend == "cuda":
        output_kernel(q, V, chunk_size)  # raises where the CUDA output kernel cannot run
    elif not (_gluon_measured_faster(q, GLUON_FWD_KEY_SIZES) and _nvrtc_available()):
        return False
    if K not in CUDA_WALK_KEY_SIZES or not fits:
        return False
    warps = sequences * q.shape[2] * (V // 4)
    return warps >= WALK_MIN_WARPS_PER_SM * torch.cuda.get_device_properties(q.device).multi_processor_count


def sweep_kernel(q: torch.Tensor, V: int) -> str:
    """The backward's reverse-sweep kernel for ``q`` [B, T, H, K] and value size V, from ``CONFIG.bwd_backend``:
    "triton", "gluon" or "cuda" (the CUDA C++ sweep, palimpsa/ops/cuda/sweep.cu: it needs an NVIDIA GPU, K a multiple
    of 16 up to 128 and V a multiple of 4).  "auto" gives "cuda" where the Gluon sweep would run, K is one of
    :data:`CUDA_BWD_KEY_SIZES` and NVRTC loads; an explicit "cuda" that cannot run raises ValueError."""
    from palimpsa.ops.cuda.sweep import block_warps

    K = q.shape[-1]
    chosen = resolve_backend(CONFIG.bwd_backend, q, "the backward backend (CONFIG.bwd_backend / PALIMPSA_BWD_BACKEND)",
                             BWD_BACKENDS, GLUON_BWD_KEY_SIZES)
    return _cuda_or(chosen, CONFIG.bwd_backend, q, K in CUDA_BWD_KEY_SIZES, block_warps(K, V, BWD_CHUNK) is not None,
                    "bwd_backend", f"K a multiple of 16 up to 128 and V a multiple of 4, got K = {K}, V = {V}")


def _absent(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Placeholder for an output that was not asked for (custom ops return tensors only)."""
    return like.new_empty(0, dtype=dtype or like.dtype)


def _fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, prior: torch.Tensor,
    mu0: Optional[torch.Tensor], imp0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    scale: float, chunk_size: int, recurrent: bool, output_final_state: bool, output_variance: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, var, final_mu, final_imp); var and the final state are empty tensors unless requested."""
    with on_device(q.device):  # Triton launches on the current device: make it the inputs'
        B, T, H, _ = q.shape
        layout = SequenceLayout(B, T, cu_seqlens, q.device)
        init = (mu0, imp0) if mu0 is not None else None
        if recurrent:
            o, var, final = fwd_output(q, k, v, g, beta, prior, scale, layout, output_variance, states=None,
                                       initial_state=init, output_final_state=output_final_state,
                                       block_v=CONFIG.fwd_block_v, num_warps=CONFIG.fwd_num_warps)
        elif walk_forward(q, v.shape[-1], layout.N, chunk_size):
            from palimpsa.ops.cuda.output import fwd_walk_cuda

            o, var, final = fwd_walk_cuda(q, k, v, g, beta, prior, scale, layout, output_variance, init,
                                          output_final_state)
        else:
            states, final = chunk_states(k, v, g, beta, prior, init, layout, chunk_size, True, output_final_state)
            kernel = output_kernel(q, v.shape[-1], chunk_size)
            if kernel == "cuda":
                from palimpsa.ops.cuda.output import fwd_output_cuda

                o, var = fwd_output_cuda(q, k, v, g, beta, prior, scale, layout, output_variance, states,
                                         chunk_size=chunk_size)
            elif kernel == "gluon":
                from palimpsa.ops.triton.chunk_fwd_gluon import fwd_output_gluon

                o, var = fwd_output_gluon(q, k, v, g, beta, prior, scale, layout, output_variance, states,
                                          chunk_size=chunk_size, cols=output_columns(q.shape[-1]),
                                          inputs=output_inputs(q.shape[-1]))
            else:
                o, var, _ = fwd_output(q, k, v, g, beta, prior, scale, layout, output_variance, states=states,
                                       chunk_size=chunk_size, block_v=CONFIG.fwd_block_v,
                                       num_warps=CONFIG.fwd_num_warps)
            del states
        var = var if var is not None else _absent(o)
        final_mu, final_imp = final if final is not None else (_absent(o, torch.float32), _absent(o, torch.float32))
        return o, var, final_mu, final_imp


_fwd_op = torch.library.custom_op("palimpsa_triton::fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(q, k, v, g, beta, prior, mu0, imp0, cu_seqlens, scale, chunk_size, recurrent,
              output_final_state, output_variance):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, H, V)
    var = q.new_empty(B, T, H, V) if output_variance else _absent(q)
    if output_final_state:
        return o, var, q.new_empty(N, H, K, V, dtype=torch.float32), q.new_empty(N, H, K, V, dtype=torch.float32)
    return o, var, _absent(q, torch.float32), _absent(q, torch.float32)


def _bwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, prior: torch.Tensor,
    mu0: Optional[torch.Tensor], imp0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    do: torch.Tensor, dvar: Optional[torch.Tensor], dmu: Optional[torch.Tensor], dimp: Optional[torch.Tensor],
    scale: float, chunk_size: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(dq, dk, dv, dg, dbeta, dprior, dmu0, dimp0); the last two are empty without an initial state."""
    with on_device(q.device):  # Triton launches on the current device: make it the inputs'
        B, T, H, _ = q.shape
        layout = SequenceLayout(B, T, cu_seqlens, q.device)
        init = (mu0, imp0) if mu0 is not None else None
        dfinal = (dmu, dimp) if dmu is not None else None
        tuning = sweep_tuning(q.shape[-1])
        sweep = sweep_kernel(q, v.shape[-1])
        if sweep == "cuda":
            target_programs = (CONFIG.bwd_target_programs if CONFIG.bwd_target_programs is not None
                               else CUDA_TARGET_PROGRAMS)
        elif sweep == "gluon":
            target_programs = tuning.target_programs
        else:
            target_programs = (CONFIG.bwd_target_programs if CONFIG.bwd_target_programs is not None
                               else TRITON_TARGET_PROGRAMS)
        dq, dk, dv, dg, dbeta, dprior, dinit = chunk_bwd(q, k, v, g, beta, prior, scale, init, layout, do, dvar,
                                                        dfinal,
                                                        block_v=CONFIG.bwd_block_v, num_warps=CONFIG.bwd_num_warps,
                                                        target_programs=target_programs, sweep=sweep,
                                                        lanes_k=tuning.lanes_k,
                                                        sweep_warps=CONFIG.bwd_warps, sweep_stage=tuning.stage,
                                                        sweep_maxnreg=tuning.maxnreg, sweep_unroll=tuning.unroll,
                                                        sweep_cols=tuning.cols, sweep_inputs=tuning.inputs,
                                                        sweep_dqk=CONFIG.bwd_dqk_tokens,
                                                        sweep_key_lanes=CONFIG.bwd_key_lanes,
                                                        sweep_blocks=CONFIG.bwd_sweep_blocks,
                                                        sweep_block_warps=CONFIG.bwd_sweep_warps,
                                                        sweep_segment=CONFIG.bwd_sweep_segment,
                                                        sweep_ck_first=CONFIG.bwd_sweep_ck_first,
                                                        sweep_compact=CONFIG.bwd_sweep_compact,
                                                        sweep_pairs=CONFIG.bwd_sweep_pairs)
        dmu0, dimp0 = dinit if dinit is not None else (_absent(prior), _absent(prior))
        return dq, dk, dv, dg, dbeta, dprior, dmu0, dimp0


_bwd_op = torch.library.custom_op("palimpsa_triton::bwd", _bwd_impl, mutates_args=())


@_bwd_op.register_fake
def _bwd_fake(q, k, v, g, beta, prior, mu0, imp0, cu_seqlens, do, dvar, dmu, dimp, scale, chunk_size):
    dmu0 = torch.empty_like(mu0) if mu0 is not None else _absent(prior)
    dimp0 = torch.empty_like(imp0) if imp0 is not None else _absent(prior)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), torch.empty_like(prior), dmu0, dimp0)


def _setup_context(ctx, inputs, output):
    (q, k, v, g, beta, prior, mu0, imp0, cu_seqlens, scale, chunk_size, recurrent,
     output_final_state, output_variance) = inputs
    ctx.save_for_backward(q, k, v, g, beta, prior, mu0, imp0, cu_seqlens)
    ctx.scale = scale
    ctx.chunk_size = chunk_size
    ctx.output_final_state = output_final_state
    ctx.output_variance = output_variance


def _given(grad: Optional[torch.Tensor], wanted: bool) -> Optional[torch.Tensor]:
    return grad.contiguous() if wanted and grad is not None and grad.numel() > 0 else None


def _backward_with(bwd, ctx, do, dvar, dmu, dimp):
    """The gradients of the forward's inputs, by ``bwd`` (the custom op, or its implementation in eager code)."""
    q, k, v, g, beta, prior, mu0, imp0, cu_seqlens = ctx.saved_tensors
    do = do.contiguous() if do is not None else torch.zeros_like(v, dtype=q.dtype)
    dvar = _given(dvar, ctx.output_variance)
    dmu = _given(dmu, ctx.output_final_state)
    dimp = _given(dimp, ctx.output_final_state)
    if (dmu is None) != (dimp is None):
        present = dmu if dmu is not None else dimp
        dmu = dmu if dmu is not None else torch.zeros_like(present)
        dimp = dimp if dimp is not None else torch.zeros_like(present)
    dq, dk, dv, dg, dbeta, dprior, dmu0, dimp0 = bwd(
        q, k, v, g, beta, prior, mu0, imp0, cu_seqlens, do, dvar, dmu, dimp, ctx.scale, ctx.chunk_size)
    if mu0 is None:
        dmu0 = dimp0 = None
    return dq, dk, dv, dg, dbeta, dprior, dmu0, dimp0, None, None, None, None, None, None


def _backward(ctx, do, dvar, dmu, dimp):
    return _backward_with(_bwd_op, ctx, do, dvar, dmu, dimp)


torch.library.register_autograd("palimpsa_triton::fwd", _backward, setup_context=_setup_context)


class _EagerChunkOp(torch.autograd.Function):
    """``palimpsa_triton::fwd`` with its registered autograd, for eager code: the same implementations, context and
    gradients, without the custom ops' dispatch (what a compiled graph traces instead)."""

    @staticmethod
    def forward(ctx, *inputs):  # ctx first: apply() then binds no signature (inspect costs ~0.1 ms a call)
        ctx.set_materialize_grads(False)  # an unused final state's gradients come as None, not zero fills to read
        output = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, do, dvar, dmu, dimp):
        return _backward_with(_bwd_impl, ctx, do, dvar, dmu, dimp)


def _check_supported(x: PreparedInputs) -> None:
    if x.q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 inputs, got {x.q.dtype}; "
                        "use backend='torch' for float64")
    K, V = x.q.shape[-1], x.v.shape[-1]
    if K > 256 or V > 256:
        raise ValueError(f"the Triton kernels support head sizes K, V <= 256, got K={K}, V={V}")


def _check_chunk_size(chunk_size: Optional[int]) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK_SIZE
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size > 256 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two in [16, 256], got {chunk_size!r}")
    return chunk_size


def _run(x: PreparedInputs, output_final_state: bool, output_variance: bool, chunk_size: int, recurrent: bool):
    _check_supported(x)
    mu0, imp0 = (x.initial_state[0].contiguous(), x.initial_state[1].contiguous()) if x.initial_state else (None, None)
    op = _fwd_op if torch.compiler.is_compiling() else _EagerChunkOp.apply
    o, var, final_mu, final_imp = op(
        x.q.contiguous(), x.k.contiguous(), x.v.contiguous(), x.g.contiguous(), x.beta.contiguous(),
        x.prior.contiguous(), mu0, imp0, x.cu_seqlens, x.scale, chunk_size, recurrent,
        bool(output_final_state), bool(output_variance))
    return o, (var if output_variance else None), ((final_mu, final_imp) if output_final_state else None)


def chunk_palimpsa_triton(x: PreparedInputs, output_final_state: bool, output_variance: bool,
                          chunk_size: Optional[int] = None):
    """Chunk-parallel Palimpsa on Triton kernels, differentiable.

    Shapes as :func:`palimpsa.ops.chunk_palimpsa`.  Returns (o [B, T, H, V] in the dtype of q,
    var or None, (mu, I) each [N, H, K, V] float32 or None).
    """
    return _run(x, output_final_state, output_variance, _check_chunk_size(chunk_size), recurrent=False)


def fused_recurrent_palimpsa_triton(x: PreparedInputs, output_final_state: bool, output_variance: bool):
    """Token-by-token Palimpsa forward (one program walks a whole sequence); its backward is the chunked one.

    Shapes and returns as :func:`chunk_palimpsa_triton`.
    """
    return _run(x, output_final_state, output_variance, DEFAULT_CHUNK_SIZE, recurrent=True)


@torch.library.custom_op("palimpsa_triton::step", mutates_args=("mu", "imp"))
def _step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
             mu: torch.Tensor, imp: torch.Tensor, prior: Optional[torch.Tensor], prior_value: float,
             scale: float, output_variance: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    with on_device(q.device):  # Triton launches on the current device: make it the inputs'
        o, var = launch_step(q, k, v, g, beta, mu, imp, prior if prior is not None else prior_value, scale,
                             output_variance)
        return o, (var if output_variance else _absent(o))


@_step_op.register_fake
def _step_fake(q, k, v, g, beta, mu, imp, prior, prior_value, scale, output_variance):
    o = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    return o, (torch.empty_like(o) if output_variance else _absent(o))


def palimpsa_step_triton(q, k, v, g, beta, state, prior, scale: float, output_variance: bool):
    """One decoding step: updates ``state`` = (mu, I) [B, H, K, V] float32 in place.

    q, k [B, H, K]; v, beta [B, H, V]; g [B, H]; prior float or [H] tensor.
    Returns o [B, H, V] (dtype of q), or (o, var) when ``output_variance``.
    """
    mu, imp = state
    if mu.dtype != torch.float32 or imp.dtype != torch.float32:
        raise TypeError(f"the Triton step keeps float32 states, got {mu.dtype} and {imp.dtype}; use backend='torch'")
    if not (mu.is_contiguous() and imp.is_contiguous()):
        raise ValueError("state tensors (mu, I) must be contiguous to be updated in place")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton step takes float16, bfloat16 or float32 inputs, got {q.dtype}")
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    prior_t = prior.reshape(-1).to(device=q.device, dtype=torch.float32).contiguous() \
        if isinstance(prior, torch.Tensor) else None
    prior_value = 1.0 if prior_t is not None else float(prior)
    if torch.compiler.is_compiling():
        o, var = _step_op(q, k, v, g, beta, mu, imp, prior_t, prior_value, scale, output_variance)
    else:
        o, var = launch_step(q, k, v, g, beta, mu, imp, prior_t if prior_t is not None else prior_value, scale,
                             output_variance)
    return (o, var) if output_variance else o
