"""Shared helpers for the op tests: random inputs and a comparison of outputs and all gradients."""

from __future__ import annotations

import torch


def make_inputs(B, T, H, K, V, dtype=torch.float64, gate=(-2.0, 0.0), beta_max=2.0, prior_tensor=True,
                initial_state=True, seed=0, device="cpu"):
    """Random Palimpsa inputs: q, k [B,T,H,K]; v, beta [B,T,H,V]; g [B,T,H] in [gate]; prior [H]; (mu, I)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    lo, hi = gate
    inputs = dict(
        q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V),
        g=lo + (hi - lo) * u(B, T, H), beta=beta_max * u(B, T, H, V),
    )
    inputs = {n: t.to(dtype).to(device).requires_grad_() for n, t in inputs.items()}
    N = B
    inputs["prior"] = (0.5 + u(H)).to(device).requires_grad_() if prior_tensor else 1.0
    if initial_state:
        inputs["initial_state"] = (r(N, H, K, V).to(device).requires_grad_(),
                                   (0.5 + u(N, H, K, V)).to(device).requires_grad_())
    return inputs


def named_leaves(inputs):
    """(gradient name, tensor) of every input that requires a gradient, in a fixed order."""
    out = [("d" + n, inputs[n]) for n in ("q", "k", "v", "g", "beta")]
    if isinstance(inputs["prior"], torch.Tensor):
        out.append(("dprior", inputs["prior"]))
    if "initial_state" in inputs:
        out.extend(zip(("dmu0", "dI0"), inputs["initial_state"]))
    return [(n, t) for n, t in out if isinstance(t, torch.Tensor) and t.requires_grad]


def leaves(inputs):
    return [t for _, t in named_leaves(inputs)]


def run_with_grads(fn, inputs, weights=None, variance=True, final=True, **kwargs):
    """Run ``fn`` (with the variance and the final state unless told otherwise), return (outputs, gradients of
    a random projection of them, weights)."""
    args = {n: inputs[n] for n in ("q", "k", "v", "g", "beta")}
    result = fn(**args, prior=inputs["prior"], initial_state=inputs.get("initial_state"),
                output_final_state=final, output_variance=variance, **kwargs)
    o, var, last = result if variance else (result[0], None, result[1])
    outs = (o,) + ((var,) if variance else ()) + ((last[0], last[1]) if final else ())
    if weights is None:
        gen = torch.Generator().manual_seed(1234)
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device) for t in outs]
    loss = sum((t.double() * w).sum() for t, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves(inputs), allow_unused=True)
    return outs, grads, weights


def rel_err(a, b):
    a, b = a.double(), b.double()
    # Relative to the reference, absolute where the reference is (near) zero, e.g. dg at T = 1.
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()


def assert_close_to_reference(fn, ref_fn, inputs, tol, variance=True, final=True, **kwargs):
    ref_outs, ref_grads, w = run_with_grads(ref_fn, inputs, variance=variance, final=final)
    outs, grads, _ = run_with_grads(fn, inputs, weights=w, variance=variance, final=final, **kwargs)
    names = ["o"] + (["variance"] if variance else []) + (["final mu", "final I"] if final else [])
    for name, a, b in zip(names, outs, ref_outs):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e} >= {tol}"
    gnames = [n for n, _ in named_leaves(inputs)]
    for name, a, b in zip(gnames, grads, ref_grads):
        assert a is not None, f"{name} missing"
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e} >= {tol}"
