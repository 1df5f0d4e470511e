"""The grouped-importance Triton kernels (GLA and importance scan), in Triton's CPU interpreter, against the
float64 naive recurrence: outputs, variance, final states and every gradient, varlen, no metaplasticity.

TRITON_INTERPRET must be set before the kernels are defined, so this module sets it first (as
test_triton_interpret.py does) and the kernels are imported lazily.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from palimpsa.ops import chunk_palimpsa, naive_palimpsa  # noqa: E402
from tests.ops.helpers import assert_close_to_reference, rel_err  # noqa: E402
from tests.ops.test_grouped import grouped_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _interpreted():
    from palimpsa.ops.triton import gla

    if type(gla._fwd_output).__name__ != "InterpretedFunction":
        pytest.skip("palimpsa.ops.triton was imported before TRITON_INTERPRET=1 was set in this process")


def _as_float32(inputs):
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.detach().float().requires_grad_(value.requires_grad)
        elif isinstance(value, tuple):
            out[name] = tuple(t.detach().float().requires_grad_(t.requires_grad) for t in value)
        else:
            out[name] = value
    return out


def _triton(**extra):
    return lambda **kw: chunk_palimpsa(**kw, backend="triton", chunk_size=16, **extra)


@pytest.mark.parametrize("G,initial", [(1, "none"), (2, "grouped"), (None, "none"), (None, "grouped")])
def test_grouped_kernels_match_reference(G, initial):
    _interpreted()
    # K = 24 and V / G = 10 are not powers of two (masked tiles); T = 37 covers 3 chunks, the last partial
    inputs = _as_float32(grouped_inputs(2, 37, 2, 24, 20, G, initial))
    assert_close_to_reference(_triton(), naive_palimpsa, inputs, 2e-5)


@pytest.mark.parametrize("G", [1, 2])
def test_grouped_kernels_with_several_key_blocks(G):
    """K = 40: the importance scan splits the key channels over two programs (32 + a masked 8) and sums their
    parts of dbeta and dg.  One head: the key blocks are what this covers (the heads' offsets are
    test_grouped_kernels_match_reference's, H = 2)."""
    _interpreted()
    inputs = _as_float32(grouped_inputs(1, 37, 1, 40, 8, G, "grouped"))
    assert_close_to_reference(_triton(), naive_palimpsa, inputs, 2e-5)


@pytest.mark.parametrize("variance,final", [(False, False), (False, True), (True, False)])
def test_grouped_kernels_without_variance_or_final_state(variance, final):
    """The training path (no variance, no final state) and the mixed cases: the rescaled query's backward then
    gets no gradient for the variance or the last importance.  One row (the same kernels' batch offsets are
    test_grouped_kernels_match_reference's, B = 2): what differs here is which outputs exist, not the shape."""
    _interpreted()
    inputs = _as_float32(grouped_inputs(1, 37, 2, 24, 20, 1, "grouped"))
    assert_close_to_reference(_triton(), naive_palimpsa, inputs, 2e-5, variance=variance, final=final)


@pytest.mark.parametrize("final", [True, False])
@pytest.mark.parametrize("G", [1, 16], ids=["G1", "per_channel"])
def test_kernels_varlen(final, G):
    """With final states: each sequence from its own state; without (training): one row, sequences reset at
    their first token (one starts on a chunk's first token).  G = 16 = V: the per-channel kernels."""
    _interpreted()
    inputs = _as_float32(grouped_inputs(1, 45, 1, 16, 16, G))
    cu = torch.tensor([0, 9, 16, 30, 45])
    assert_close_to_reference(_triton(cu_seqlens=cu), lambda **kw: naive_palimpsa(**kw, cu_seqlens=cu), inputs, 2e-5,
                              final=final)


@pytest.mark.parametrize("G", [1, None])
@pytest.mark.parametrize("kind", ["reset", "forget", "saturated"])
def test_grouped_kernels_extreme_decays(G, kind):
    """g = -inf, -1e4 and <= -35 in the kernels: within 1e-5 of the token-by-token recurrence in float32."""
    _interpreted()
    from tests.ops.test_grouped import _extreme

    inputs = _extreme(grouped_inputs(1, 40, 2, 16, 16, G, "grouped", seed=3), kind)
    assert_close_to_reference(_triton(), naive_palimpsa, _as_float32(inputs), 1e-5)


@pytest.mark.parametrize("G", [1, None])
def test_grouped_kernels_dg_of_saturated_decays_is_accurate_per_token(G):
    """Where a decay saturates (g <= -35) dg is ~e^-35: summed per chunk from token pairs, it keeps its own
    relative accuracy (a reverse running sum over the sequence would leave float32 noise of ~1e-7 there)."""
    _interpreted()
    from tests.ops.test_grouped import _extreme

    inputs = _extreme(grouped_inputs(1, 40, 2, 16, 16, G, "grouped", seed=4), "saturated")
    saturated = torch.zeros(1, 40, 2, dtype=torch.bool)
    saturated[0, [3, 9, 15, 16]] = True
    grads = []
    for leaves, kw in ((inputs, dict(backend="torch")), (_as_float32(inputs), dict(backend="triton", chunk_size=16))):
        g = leaves["g"].detach().clone().requires_grad_()
        beta = leaves["beta"].detach() if leaves["beta"] is not None else None
        mu0, imp0 = (t.detach() for t in leaves["initial_state"])
        o, (mu, imp) = chunk_palimpsa(leaves["q"].detach(), leaves["k"].detach(), leaves["v"].detach(), g, beta,
                                      prior=leaves["prior"].detach(), initial_state=(mu0, imp0),
                                      output_final_state=True, **kw)
        weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        loss = (o.double() * weights).sum() + mu.double().sum() + imp.double().sum()
        grads.append(torch.autograd.grad(loss, g)[0].double())
    ref, got = grads
    assert ref[saturated].abs().max() < 1e-10
    assert ((got - ref).abs() / ref.abs())[saturated].max() < 1e-3


def _importance_loop(q, k, g, beta, prior, excess0, groups, scale):
    """The rescaled query token by token: J_t = exp(g_t) J_{t-1} + k_t^2 beta_t[j], iota = prior + J."""
    N, T, H, K = k.shape
    J = excess0 if excess0 is not None else k.new_zeros(N, H, groups, K)
    q_tilde, variance = [], []
    for t in range(T):
        J = torch.exp(g[:, t])[:, :, None, None] * J
        if beta is not None:
            J = J + (k[:, t] ** 2)[:, :, None, :] * beta[:, t][..., None]
        iota = prior[None, :, None, None] + J
        q_tilde.append(q[:, t, :, None, :] / iota)
        variance.append((scale ** 2) * (q[:, t, :, None, :] ** 2 / iota).sum(-1))
    return torch.stack(q_tilde, 1), torch.stack(variance, 1), prior[None, :, None, None] + J


@pytest.mark.parametrize("G,with_beta", [(1, True), (2, True), (2, False)])
def test_importance_scan_kernels_match_the_token_loop(G, with_beta):
    """The importance-scan kernels alone against a float64 token loop: q~, the variance, the last iota and every
    gradient (the initial J's per channel included), at 3 chunks (the last one padded) and 2 key blocks (32 + a
    masked 8), with full resets (g = -inf) and saturated decays (-1e4, -40) inside chunks and on their first and
    last tokens, where the in-chunk scans meet what comes from the chunks before and after.  One sequence of two
    heads (each head a different set of extreme tokens; several sequences go through these kernels in
    test_grouped_kernels_match_reference and the varlen tests): a second sequence only repeated every program."""
    _interpreted()
    from palimpsa.ops.triton.importance import rescaled_query_triton

    N, T, H, K, chunk = 1, 37, 2, 40, 16
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(N, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(N, T, H, K, generator=gen, dtype=torch.float64)
    g = -0.5 * torch.rand(N, T, H, generator=gen, dtype=torch.float64)
    # inside chunks (5, 9), on a chunk's last (15, 31) and first (16, 32) token
    g[0, 5, 0] = g[0, 32, 1] = float("-inf")
    g[0, 16, 0] = g[0, 15, 1] = -1e4
    g[0, 31, 0] = g[0, 9, 1] = -40.0
    beta = 2 * torch.rand(N, T, H, G, generator=gen, dtype=torch.float64) if with_beta else None
    prior = 0.5 + torch.rand(H, generator=gen, dtype=torch.float64)
    excess0 = torch.rand(N, H, G, K, generator=gen, dtype=torch.float64)
    scale = K ** -0.5
    inputs = [t for t in (q, k, g, beta, prior, excess0) if t is not None]
    weights = None
    results = []
    for fn, dtype in ((_importance_loop, torch.float64), (rescaled_query_triton, torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        args = list(leaves)
        if beta is None:
            args.insert(3, None)
        outs = fn(*args, G, scale) if fn is _importance_loop else fn(*args, G, chunk, scale, True)
        if weights is None:
            weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
        loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
        results.append(list(outs) + list(torch.autograd.grad(loss, leaves, allow_unused=True)))
    names = ["q~", "variance", "iota_T", "dq", "dk", "dg"] + (["dbeta"] if with_beta else []) + ["dprior", "dJ0"]
    for name, want, got in zip(names, *results):
        if name == "dk" and not with_beta:  # no writes: k is not used
            assert got is None and want is None
            continue
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < 1e-5, f"{name}: relative error {rel_err(got, want):.2e}"


def test_grouped_kernels_under_torch_compile():
    """Inside torch.compile the grouped path's kernels are graph breaks: same outputs and gradients as eager."""
    _interpreted()
    inputs = _as_float32(grouped_inputs(1, 20, 2, 16, 16, 1))
    names = ("q", "k", "v", "g", "beta")

    def f(q, k, v, g, beta):
        o, _ = chunk_palimpsa(q, k, v, g, beta, prior=inputs["prior"].detach(), backend="triton", chunk_size=16)
        return (o * o).sum()

    def grads_of(fn):
        leaves = [inputs[n].detach().clone().requires_grad_() for n in names]
        out = fn(*leaves)
        out.backward()
        return [out] + [x.grad for x in leaves]

    for a, b in zip(grads_of(torch.compile(f, backend="aot_eager")), grads_of(f)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_metaplasticity_with_the_prior_one():
    """prior=1 (a number): the GLA kernels take q itself as the rescaled query (no copy)."""
    _interpreted()
    inputs = _as_float32(grouped_inputs(2, 37, 2, 24, 20, None))
    inputs["prior"] = 1.0
    assert_close_to_reference(_triton(), naive_palimpsa, inputs, 2e-5)


@pytest.mark.parametrize("G", [1, None])
def test_grouped_kernels_half_inputs(G):
    """float16 q, k, v, beta (the kernels store dq and dk in the input dtype): outputs and gradients within
    float16 rounding of the float64 reference."""
    _interpreted()
    x = grouped_inputs(1, 37, 2, 24, 20, G)
    q, k, v = (x[n].detach().half().requires_grad_() for n in ("q", "k", "v"))
    g = x["g"].detach().float().requires_grad_()
    beta = x["beta"].detach().half().requires_grad_() if G is not None else None
    o, _ = chunk_palimpsa(q, k, v, g, beta, prior=1.0, backend="triton", chunk_size=16)
    o.float().pow(2).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, g)]
    beta64 = beta.detach().double().requires_grad_() if beta is not None else None
    beta_full = beta64.repeat_interleave(20 // G, -1) if beta64 is not None else torch.zeros_like(ref_leaves[2])
    ref, _ = naive_palimpsa(*ref_leaves, beta_full, prior=1.0)
    ref.pow(2).sum().backward()
    pairs = [(o, ref)] + [(t.grad, r.grad) for t, r in zip((q, k, v, g), ref_leaves)]
    if beta is not None:
        pairs.append((beta.grad, beta64.grad))
    for got, want in pairs:
        assert got.dtype != torch.float64 and torch.isfinite(got).all()
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 3e-3
