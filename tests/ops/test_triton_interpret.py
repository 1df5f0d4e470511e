"""The Triton kernels, run on the CPU by Triton's interpreter, against the float64 naive recurrence.

TRITON_INTERPRET must be set before the kernels are defined, so this module sets it first and imports
``palimpsa.ops.triton`` lazily.  Shapes are tiny (the interpreter executes every op in NumPy); they still
cover several chunks, a partial last chunk, two K tiles (K = 48 = 32 + 16), a masked V block, varlen
packing, initial and final states, the variance output and every gradient.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa, palimpsa_step  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

NAMES = ("o", "var", "mu", "I", "dq", "dk", "dv", "dg", "dbeta", "dprior", "dmu0", "dI0")


def triton_module():
    import palimpsa.ops.triton as module
    from palimpsa.ops.triton import chunk_state

    kernel = chunk_state.chunk_states_kernel
    if type(kernel).__name__ != "InterpretedFunction":
        pytest.skip("palimpsa.ops.triton was imported before TRITON_INTERPRET=1 was set in this process")
    return module


def make_inputs(B, T, H, K, V, seed, with_init=True, strong_decay=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    N = B
    g = -rand(B, T, H) * (3.0 if strong_decay else 0.5)
    inputs = dict(q=randn(B, T, H, K), k=randn(B, T, H, K) / K ** 0.5, v=randn(B, T, H, V), g=g,
                  beta=rand(B, T, H, V), prior=rand(H) + 0.5)
    if with_init:
        inputs["mu0"] = randn(N, H, K, V) * 0.3
        inputs["imp0"] = rand(N, H, K, V) + 0.5
    return inputs


def run_op(fn, inputs, grads, cu_seqlens=None, **kwargs):
    """Forward with every output, a weighted loss, then all gradients (None where an input is absent)."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    init = (leaves["mu0"], leaves["imp0"]) if "mu0" in leaves else None
    o, var, (mu, imp) = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"], leaves["prior"],
                           initial_state=init, output_final_state=True, output_variance=True,
                           cu_seqlens=cu_seqlens, **kwargs)
    loss = (o * grads["do"]).sum() + (var * grads["dvar"]).sum() + (mu * grads["dmu"]).sum() + (imp * grads["dimp"]).sum()
    loss.backward()
    order = ("q", "k", "v", "g", "beta", "prior", "mu0", "imp0")
    return [o, var, mu, imp] + [leaves[n].grad if n in leaves else None for n in order]


def reference(inputs, grads, cu_seqlens=None):
    return run_op(naive_palimpsa, {n: x.double() for n, x in inputs.items()}, {n: x.double() for n, x in grads.items()},
                  cu_seqlens=cu_seqlens)


def assert_close(got, ref, tol=1e-5):
    for name, a, b in zip(NAMES, got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a is not None, f"{name} is missing"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def make_grads(inputs, N):
    gen = torch.Generator().manual_seed(99)
    B, T, H, K = inputs["q"].shape
    V = inputs["v"].shape[-1]
    return dict(do=torch.randn(B, T, H, V, generator=gen), dvar=torch.randn(B, T, H, V, generator=gen),
                dmu=torch.randn(N, H, K, V, generator=gen), dimp=torch.randn(N, H, K, V, generator=gen))


def test_kernels_run_in_the_interpreter():
    module = triton_module()
    assert hasattr(module, "chunk_palimpsa_triton")


@pytest.mark.parametrize("K", [48, 24])
def test_chunk_matches_naive(K):
    triton_module()
    inputs = make_inputs(B=2, T=37, H=1, K=K, V=20, seed=K, strong_decay=K == 24)
    grads = make_grads(inputs, N=2)
    got = run_op(chunk_palimpsa, inputs, grads, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads))


@pytest.mark.parametrize("tuning", [(16, 16, 2, 1, None), (32, 32, 4, None, 64)])
def test_chunk_state_launches_match_naive(tuning):
    """The chunk-state kernel with other blocks, warps, stages and a register cap (config.StateTuning): two key
    and two value blocks (16 of K = 24 and V = 20), then one block wider than each; outputs, final states and
    every gradient (the backward rebuilds the chunk states) against float64."""
    triton_module()
    from palimpsa.ops.triton.config import StateTuning, kernel_config

    inputs = make_inputs(B=1, T=37, H=1, K=24, V=20, seed=5)
    grads = make_grads(inputs, N=1)
    with kernel_config(state_tuning=StateTuning(*tuning)):
        got = run_op(chunk_palimpsa, inputs, grads, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads))


def test_fused_recurrent_matches_naive():
    triton_module()
    inputs = make_inputs(B=1, T=21, H=2, K=16, V=16, seed=3)
    grads = make_grads(inputs, N=1)
    got = run_op(fused_recurrent_palimpsa, inputs, grads, backend="triton")
    assert_close(got, reference(inputs, grads))


@pytest.mark.parametrize("unit_chunks", [1, 4])
def test_varlen_matches_naive(unit_chunks, monkeypatch):
    """Packed sequences; one backward unit per chunk (local-adjoint pass and scan) and per sequence."""
    triton_module()
    from palimpsa.ops.triton import chunk_bwd, function

    original = chunk_bwd.chunk_bwd
    monkeypatch.setattr(function, "chunk_bwd", lambda *a, **kw: original(*a, **dict(kw, unit_chunks=unit_chunks)))
    cu = torch.tensor([0, 7, 40, 45])
    inputs = make_inputs(B=1, T=45, H=1, K=16, V=16, seed=5, with_init=unit_chunks == 1)
    if unit_chunks == 1:
        inputs["mu0"] = inputs["mu0"].expand(3, -1, -1, -1).contiguous()
        inputs["imp0"] = inputs["imp0"].expand(3, -1, -1, -1).contiguous() + torch.arange(3.0)[:, None, None, None]
    grads = make_grads(inputs, N=3)
    got = run_op(chunk_palimpsa, inputs, grads, cu_seqlens=cu, backend="triton", chunk_size=16)
    assert_close(got, reference(inputs, grads, cu_seqlens=cu))


def test_outputs_without_optional_parts():
    """No variance, no final state, no initial state: the plain (o, None) contract and gradients."""
    triton_module()
    inputs = make_inputs(B=1, T=19, H=1, K=16, V=16, seed=7, with_init=False)
    do = torch.randn(1, 19, 1, 16, generator=torch.Generator().manual_seed(1))

    def grads_of(fn, dtype, **kw):
        leaves = {n: x.detach().to(dtype).requires_grad_() for n, x in inputs.items()}
        o, final = fn(*(leaves[n] for n in ("q", "k", "v", "g", "beta", "prior")), **kw)
        assert final is None
        (o * do.to(dtype)).sum().backward()
        return [o] + [leaves[n].grad for n in ("q", "k", "v", "g", "beta", "prior")]

    got = grads_of(chunk_palimpsa, torch.float32, backend="triton", chunk_size=16)
    ref = grads_of(naive_palimpsa, torch.float64)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dg", "dbeta", "dprior"), got, ref):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-5, f"{name}: {err:.2e}"


def test_half_inputs_match_naive():
    """float16 q, k, v, beta (float32 states inside): every output and gradient against float64 on the same rounded
    inputs, to float16's precision.  Here dq and dk are cast from float32 sums that share one zeroed buffer with dg's
    and dprior's (chunk_bwd): a view into the wrong part of it would show."""
    triton_module()
    inputs = make_inputs(B=2, T=37, H=2, K=32, V=16, seed=5)
    half = {n: x.half() if n in ("q", "k", "v", "beta") else x for n, x in inputs.items()}
    grads = make_grads(inputs, N=2)
    got = run_op(chunk_palimpsa, half, {n: x.half() for n, x in grads.items()}, backend="triton", chunk_size=16)
    for name, a in zip(NAMES, got):
        assert a is not None and a.dtype == (torch.float16 if name in ("o", "var", "dq", "dk", "dv", "dbeta")
                                             else torch.float32), name
    rounded = {n: x.float() for n, x in half.items()}
    assert_close(got, reference(rounded, {n: x.half().float() for n, x in grads.items()}), tol=3e-3)


def test_a_final_state_asked_for_but_unused_gets_no_gradient():
    """Asking for the final state and leaving it out of the loss gives the gradients of the loss without it (its
    gradient reaches the backward as None: no zero state is materialised or read)."""
    triton_module()
    inputs = make_inputs(B=2, T=21, H=1, K=16, V=16, seed=11)
    do = torch.randn(2, 21, 1, 16, generator=torch.Generator().manual_seed(3))

    def grads_of(fn, dtype, **kw):
        leaves = {n: x.detach().to(dtype).requires_grad_() for n, x in inputs.items()}
        init = (leaves["mu0"], leaves["imp0"])
        o, final = fn(*(leaves[n] for n in ("q", "k", "v", "g", "beta", "prior")), initial_state=init,
                      output_final_state=True, **kw)
        assert final is not None
        (o * do.to(dtype)).sum().backward()
        return [leaves[n].grad for n in ("q", "k", "v", "g", "beta", "prior", "mu0", "imp0")]

    got = grads_of(chunk_palimpsa, torch.float32, backend="triton", chunk_size=16)
    ref = grads_of(naive_palimpsa, torch.float64)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dprior", "dmu0", "dI0"), got, ref):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-5, f"{name}: {err:.2e}"


def test_step_updates_state_in_place():
    triton_module()
    gen = torch.Generator().manual_seed(11)
    B, H, K, V = 2, 2, 24, 20
    q, k = torch.randn(B, H, K, generator=gen), torch.randn(B, H, K, generator=gen) / K ** 0.5
    v, beta = torch.randn(B, H, V, generator=gen), torch.rand(B, H, V, generator=gen)
    g = -torch.rand(B, H, generator=gen)
    prior = torch.rand(H, generator=gen) + 0.5
    mu, imp = torch.randn(B, H, K, V, generator=gen) * 0.3, torch.rand(B, H, K, V, generator=gen) + 0.5
    ref_state = (mu.clone(), imp.clone())
    ref_o, ref_var = palimpsa_step(q, k, v, g, beta, ref_state, prior=prior, output_variance=True, backend="torch")
    state = (mu.clone(), imp.clone())
    mu_ptr = state[0].data_ptr()
    o, var = palimpsa_step(q, k, v, g, beta, state, prior=prior, output_variance=True, backend="triton")
    assert state[0].data_ptr() == mu_ptr
    for a, b in ((o, ref_o), (var, ref_var), (state[0], ref_state[0]), (state[1], ref_state[1])):
        assert ((a - b).norm() / b.norm()).item() < 1e-5
    o2 = palimpsa_step(q, k, v, g, beta, state, prior=0.8, backend="triton")
    o2_ref = palimpsa_step(q, k, v, g, beta, ref_state, prior=0.8, backend="torch")
    assert ((o2 - o2_ref).norm() / o2_ref.norm()).item() < 1e-5


def test_compiled_graph_matches_eager():
    """The ops trace as custom ops inside torch.compile(fullgraph=True): same outputs and gradients."""
    triton_module()
    inputs = make_inputs(B=1, T=18, H=1, K=16, V=16, seed=13, with_init=False)

    def f(q, k, v, g, beta):
        o, var, final = chunk_palimpsa(q, k, v, g, beta, prior=0.9, output_variance=True, output_final_state=True,
                                       backend="triton", chunk_size=16)
        return (o * o).sum() + var.sum() + final[0].sum() + final[1].sum()

    def grads_of(fn):
        leaves = [inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "g", "beta")]
        out = fn(*leaves)
        out.backward()
        return [out] + [x.grad for x in leaves]

    eager = grads_of(f)
    compiled = grads_of(torch.compile(f, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_step_updates_state_in_place():
    """The decoding step traces as a mutating custom op: same output and the same in-place state update."""
    triton_module()
    gen = torch.Generator().manual_seed(17)
    B, H, K, V = 1, 2, 16, 16
    q, k = torch.randn(B, H, K, generator=gen), torch.randn(B, H, K, generator=gen) / 4
    v, beta, g = torch.randn(B, H, V, generator=gen), torch.rand(B, H, V, generator=gen), -torch.rand(B, H, generator=gen)

    def step(mu, imp):
        return palimpsa_step(q, k, v, g, beta, (mu, imp), prior=0.9, backend="triton") * 2

    eager_state = (torch.zeros(B, H, K, V), torch.ones(B, H, K, V))
    compiled_state = (torch.zeros(B, H, K, V), torch.ones(B, H, K, V))
    eager = step(*eager_state)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_state)
    assert torch.allclose(compiled, eager)
    assert compiled_state[0].abs().sum() > 0
    for a, b in zip(compiled_state, eager_state):
        assert torch.allclose(a, b)


def test_bad_arguments_raise():
    triton_module()
    inputs = make_inputs(B=1, T=4, H=1, K=16, V=16, seed=1, with_init=False)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_palimpsa(*args, backend="triton", chunk_size=24)
    with pytest.raises(TypeError, match="float64"):
        chunk_palimpsa(*(x.double() for x in args), backend="triton")


@pytest.mark.parametrize("case", ["reset", "strong_forget", "saturated"])
def test_extreme_decays_match_naive(case, monkeypatch):
    """g = -inf (full reset), g = -1e4 and g <= -30 at some tokens: finite, float32-accurate, and the decay
    gradient of every saturated token accurate relative to its (tiny) value.  One backward unit per chunk,
    so the local-adjoint pass and the scan over units see the extreme decays too."""
    triton_module()
    from palimpsa.ops.triton import chunk_bwd, function

    original = chunk_bwd.chunk_bwd
    monkeypatch.setattr(function, "chunk_bwd", lambda *a, **kw: original(*a, **dict(kw, unit_chunks=1)))
    inputs = make_inputs(B=1, T=40, H=1, K=16, V=16, seed=21)
    tokens = [0, 5, 15, 16, 31, 32, 33]
    inputs["g"][0, tokens] = {"reset": float("-inf"), "strong_forget": -1e4, "saturated": -35.0}[case]
    grads = make_grads(inputs, N=1)
    ref = reference(inputs, grads)
    for fn, kw in ((chunk_palimpsa, dict(chunk_size=16)), (fused_recurrent_palimpsa, {})):
        got = run_op(fn, inputs, grads, backend="triton", **kw)
        assert_close(got, ref)
        if case == "saturated":
            dg, dg_ref = got[NAMES.index("dg")][0, tokens], ref[NAMES.index("dg")][0, tokens]
            assert ((dg.double() - dg_ref).abs() / dg_ref.abs()).max() < 1e-4
