"""The Gluon output kernel's source, run by Triton's CPU interpreter (as plain Triton, its layouts ignored:
palimpsa/ops/triton/gluon_shim.py), against the float64 naive recurrence: the chunk path with
``fwd_backend="gluon"``, every output (o, variance, final state) and, through the unchanged backward, every
gradient.  Shapes cover two key parts (K = 48 = 32 + 16), masked key rows (K = 24 in a 32-row part), masked
value columns (V = 20 in blocks of 8), 4-warp blocks (V = 32), several chunks with a partial last one, initial
states and varlen packing."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from palimpsa.ops import chunk_palimpsa  # noqa: E402
from tests.ops.test_triton_interpret import (NAMES, assert_close, make_grads, make_inputs, reference,  # noqa: E402
                                             run_op, triton_module)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def gluon_backend(cols=None, inputs=False):
    triton_module()
    from palimpsa.ops.triton import chunk_fwd_gluon
    from palimpsa.ops.triton.config import kernel_config

    if type(chunk_fwd_gluon.chunk_output_gluon_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the Gluon kernel was compiled for a GPU in this process")
    return kernel_config(fwd_backend="gluon", fwd_cols=cols, fwd_inputs=inputs)


def test_the_gluon_backend_runs_its_own_kernel(monkeypatch):
    """Choosing "gluon" really launches the Gluon kernel, not the Triton one."""
    from palimpsa.ops.triton import chunk_fwd, chunk_fwd_gluon

    calls = []
    original = chunk_fwd_gluon.fwd_output_gluon
    monkeypatch.setattr(chunk_fwd_gluon, "fwd_output_gluon", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(chunk_fwd, "chunk_fwd_kernel", None)  # the Triton output kernel must not be needed
    inputs = make_inputs(B=1, T=20, H=1, K=16, V=16, seed=1, with_init=False)
    with gluon_backend():
        o, _ = chunk_palimpsa(*(inputs[n] for n in ("q", "k", "v", "g", "beta", "prior")), backend="triton",
                              chunk_size=16)
    assert calls == [1] and torch.isfinite(o).all()


@pytest.mark.parametrize("B, H, K, V, cols, staged_inputs",
                         [(2, 1, 48, 20, 1, False), (1, 2, 24, 36, 2, False), (1, 2, 48, 36, 2, True)])
def test_gluon_chunk_matches_naive(B, H, K, V, cols, staged_inputs):
    """The output kernel (its threads holding one or two value columns each; V = 36 leaves a partial block of 8;
    with each chunk's q and k rows staged in shared memory, both key parts and a partial last chunk) and what the
    backward needs.  Two rows (the rows' offsets) in the first case, two heads (the heads' offsets) in the others:
    the interpreter runs each program in turn, and both in one case only repeated the same programs (the backward,
    the Triton one, recomputes from the inputs alone; test_triton_interpret.py checks it too)."""
    inputs = make_inputs(B=B, T=37, H=H, K=K, V=V, seed=K + staged_inputs, strong_decay=K == 24)
    grads = make_grads(inputs, N=B)
    with gluon_backend(cols, staged_inputs):
        got = run_op(chunk_palimpsa, inputs, grads, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads))


@pytest.mark.parametrize("staged_inputs", [False, True])
def test_gluon_varlen_matches_naive(staged_inputs):
    cu = torch.tensor([0, 7, 40, 45])
    inputs = make_inputs(B=1, T=45, H=1, K=16, V=16, seed=5)
    inputs["mu0"] = inputs["mu0"].expand(3, -1, -1, -1).contiguous()
    inputs["imp0"] = inputs["imp0"].expand(3, -1, -1, -1).contiguous() + torch.arange(3.0)[:, None, None, None]
    grads = make_grads(inputs, N=3)
    # staged: also one key part read by threads of two value columns, as at K = 128 (OUTPUT_TUNED, OUTPUT_INPUTS)
    with gluon_backend(cols=2 if staged_inputs else None, inputs=staged_inputs):
        got = run_op(chunk_palimpsa, inputs, grads, cu_seqlens=cu, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads, cu_seqlens=cu))


def gluon_sweep(lanes_k, warps=1, stage=0, unroll=1, cols=1, inputs=False):
    triton_module()
    from palimpsa.ops.triton.config import kernel_config

    return kernel_config(fwd_backend="gluon", bwd_backend="gluon", bwd_lanes_k=lanes_k, bwd_warps=warps,
                         bwd_stage=stage, bwd_unroll=unroll, bwd_cols=cols, bwd_inputs=inputs)


@pytest.mark.parametrize("H, K, V, lanes_k, unroll, cols, staged_inputs",
                         [(1, 48, 10, 8, 1, 1, False), (2, 24, 32, 4, 4, 2, True)])
def test_gluon_backward_matches_naive(H, K, V, lanes_k, unroll, cols, staged_inputs, monkeypatch):
    """Every gradient through the Gluon reverse sweep (and output kernel); the Triton sweep is not run.  unroll 4
    rebuilds the sub-blocks' start states four tokens per loop iteration; cols 2 gives each thread two adjacent
    value columns; staged_inputs puts each chunk's per-token inputs in shared memory.  V = 10 at 8 lanes of one
    column (blocks of 4) leaves a partial value block.  The sweep's head offsets are the second case's (H = 2, as
    in the staged several-warps test); the first case, of three value blocks and three units, runs one head: a
    second only repeated its programs and doubled the slowest test of the file."""
    from palimpsa.ops.triton import chunk_bwd

    monkeypatch.setattr(chunk_bwd, "unit_bwd_kernel", None)
    inputs = make_inputs(B=1, T=37, H=H, K=K, V=V, seed=K + lanes_k, strong_decay=K == 24)
    grads = make_grads(inputs, N=1)
    with gluon_sweep(lanes_k, unroll=unroll, cols=cols, inputs=staged_inputs):
        got = run_op(chunk_palimpsa, inputs, grads, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads))


@pytest.mark.parametrize("case, staged_inputs", [("reset", False), ("strong_forget", True), ("saturated", True),
                                                  ("saturated", False)])
def test_gluon_backward_with_extreme_decays_matches_naive(case, staged_inputs, monkeypatch):
    """g = -inf, -1e4 or -35 at some tokens (the first, one after a chunk's end, the last, and a run across the
    backward's unit boundary at 32): a saturated token's tiny dg stays accurate relative to its value (the sweep
    takes every dg directly, alpha_t sum(dM_t M_{t-1} + dP_t P_{t-1})); every other gradient float32-accurate.
    Units of one chunk, so the local-adjoint pass sees them too."""
    from palimpsa.ops.triton import chunk_bwd, function

    original = chunk_bwd.chunk_bwd
    monkeypatch.setattr(function, "chunk_bwd", lambda *a, **kw: original(*a, **dict(kw, unit_chunks=1)))
    monkeypatch.setattr(chunk_bwd, "unit_bwd_kernel", None)
    inputs = make_inputs(B=1, T=40, H=1, K=16, V=16, seed=21)
    tokens = [0, 5, 16, 31, 32, 33, 39]
    inputs["g"][0, tokens] = {"reset": float("-inf"), "strong_forget": -1e4, "saturated": -35.0}[case]
    grads = make_grads(inputs, N=1)
    ref = reference(inputs, grads)
    with gluon_sweep(8, unroll=4, cols=2, inputs=staged_inputs):
        got = run_op(chunk_palimpsa, inputs, grads, backend="triton", chunk_size=16)
    assert_close(got, ref)
    if case == "saturated":
        dg, dg_ref = got[NAMES.index("dg")][0, tokens], ref[NAMES.index("dg")][0, tokens]
        assert dg_ref.abs().max() < 1e-10 and ((dg.double() - dg_ref).abs() / dg_ref.abs()).max() < 1e-4


@pytest.mark.parametrize("stage, staged_inputs", [(0, False), (1, True)])
def test_gluon_backward_with_several_warps_matches_naive(stage, staged_inputs, monkeypatch):
    """Two warps per sweep program (value blocks of 8 columns at 8 lanes per column; V = 20 leaves a partial
    block), with a sub-block's states in registers or staged in shared memory (there with the chunk's inputs too,
    shared by both warps), an initial state and the variance: every gradient."""
    from palimpsa.ops.triton import chunk_bwd

    monkeypatch.setattr(chunk_bwd, "unit_bwd_kernel", None)
    # one sequence (the interpreter is slow), of two chunks (the second partial) and two heads when staged (the
    # staged inputs' per-token, per-head offsets); of three chunks (three units) and one head when not: there a
    # second head only repeated every program
    batch, length, heads = (1, 21, 2) if staged_inputs else (1, 37, 1)
    inputs = make_inputs(B=batch, T=length, H=heads, K=48, V=20, seed=21)
    grads = make_grads(inputs, N=batch)
    with gluon_sweep(8, warps=2, stage=stage, inputs=staged_inputs):
        got = run_op(chunk_palimpsa, inputs, grads, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads))


@pytest.mark.parametrize("K, V, lanes_k, stage, unroll, cols, staged_inputs",
                         [(16, 16, 4, 1, 2, 1, False), (48, 10, 16, 2, 4, 2, True)])
def test_gluon_backward_with_staged_sub_blocks_matches_naive(K, V, lanes_k, stage, unroll, cols, staged_inputs,
                                                             monkeypatch):
    """bwd_stage = 1: a sub-block's states go through shared memory between its forward and reverse steps (one key
    part at K = 16); 2: so do the states at the sub-blocks' starts (two key parts at K = 48, 16 lanes of two value
    columns each: blocks of 4, so V = 10 leaves a partial one); T = 37 (21) ends on a partial segment and
    sub-block; with an initial state and the variance (staged with the chunk's other inputs in the second case):
    every gradient."""
    from palimpsa.ops.triton import chunk_bwd

    monkeypatch.setattr(chunk_bwd, "unit_bwd_kernel", None)
    # the interpreter's shared memory is slow: one sequence of two chunks (the second partial) when staged; batches
    # of several sequences are the varlen tests' and the Triton sweep's.  One head: the shared-memory staging is
    # per program, which a second head only repeated (the sweep's head offsets, staged inputs' included, are
    # test_gluon_backward_matches_naive's and the several-warps test's, at H = 2)
    batch, length = (1, 21) if staged_inputs else (1, 37)
    inputs = make_inputs(B=batch, T=length, H=1, K=K, V=V, seed=31 + K)
    grads = make_grads(inputs, N=batch)
    with gluon_sweep(lanes_k, stage=stage, unroll=unroll, cols=cols, inputs=staged_inputs):
        got = run_op(chunk_palimpsa, inputs, grads, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads))


@pytest.mark.parametrize("unit_chunks", [1, 4])
def test_gluon_backward_varlen_matches_naive(unit_chunks, monkeypatch):
    """Packed sequences with initial states; one backward unit per chunk (local adjoints and their scan) and
    per sequence (with each chunk's inputs staged in shared memory).  V = 8: two value blocks of 4 columns (8 lanes
    of one column), so the sequences' offsets are still met by more than one block; V = 16's four blocks only
    repeated them."""
    from palimpsa.ops.triton import chunk_bwd, function

    original = chunk_bwd.chunk_bwd
    monkeypatch.setattr(function, "chunk_bwd", lambda *a, **kw: original(*a, **dict(kw, unit_chunks=unit_chunks)))
    cu = torch.tensor([0, 7, 40, 45])
    inputs = make_inputs(B=1, T=45, H=1, K=16, V=8, seed=6)
    inputs["mu0"] = inputs["mu0"].expand(3, -1, -1, -1).contiguous()
    inputs["imp0"] = inputs["imp0"].expand(3, -1, -1, -1).contiguous() + torch.arange(3.0)[:, None, None, None]
    grads = make_grads(inputs, N=3)
    with gluon_sweep(8, inputs=unit_chunks == 4):
        got = run_op(chunk_palimpsa, inputs, grads, cu_seqlens=cu, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads, cu_seqlens=cu))


def test_gluon_local_adjoints_run_when_units_are_short(monkeypatch):
    """With units of one chunk, the local-adjoint pass runs: its Gluon kernel, not the Triton one, and every
    gradient still matches (a long sequence of several units, strong decays and an initial state)."""
    from palimpsa.ops.triton import chunk_bwd, function

    original = chunk_bwd.chunk_bwd
    monkeypatch.setattr(function, "chunk_bwd", lambda *a, **kw: original(*a, **dict(kw, unit_chunks=1)))
    monkeypatch.setattr(chunk_bwd, "unit_local_adjoint_kernel", None)
    monkeypatch.setattr(chunk_bwd, "unit_bwd_kernel", None)
    # three units, the last partial; two value blocks of two columns (16 lanes of one column): more blocks only
    # repeated the same programs
    inputs = make_inputs(B=1, T=40, H=1, K=48, V=4, seed=11, strong_decay=True)
    grads = make_grads(inputs, N=1)
    with gluon_sweep(16):
        got = run_op(chunk_palimpsa, inputs, grads, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads))
