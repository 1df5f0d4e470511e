"""Check the grouped-importance / NotPalimpsa Triton path on a GPU against the float64 reference.

    PYTHONPATH=. python scripts/gpu_grouped_check.py [--shapes 170M-like,760M-like] [--log FILE]

For G = 1, G = 4 and no metaplasticity (beta = None), at the benchmark shapes' head sizes and full length
(batch 1, 2 heads: float64 autograd of the token-by-token reference keeps every state), and on a varlen batch:
outputs, variance, final state and every gradient (q, k, v, g, beta, prior, initial mu; the initial importance
is grouped and fixed), for bf16 and float32 inputs, against ``naive_palimpsa`` in float64 on the same (bf16-exact)
values; then each case again as a training step runs it (no initial state, no variance, no final state:
other kernel variants), output and gradients.  Limits: float32 1e-4, bf16 2e-2.  Triton 3.6 has known Hopper
miscompilations: a timing of this path counts only after this passes.  Exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from palimpsa.bench import ops as bench
from palimpsa.ops import chunk_palimpsa, naive_palimpsa

LIMITS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def case_inputs(K, V, T, G, seed, device, N=1, H=2):
    """bf16-exact float64 leaves: q, k, v, g, beta [.., G] or None, prior [H], initial (mu, I grouped)."""
    shape = bench.Shape("check", N, T, H, K, V)
    x = bench.make_inputs(shape, torch.bfloat16, device, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    leaves = {n: x[n].double() for n in ("q", "k", "v", "g")}
    leaves["g"] = leaves["g"].to(torch.bfloat16).double()
    leaves["beta"] = None if G is None else x["beta"][..., :G].double()
    leaves["prior"] = (0.5 + torch.rand(H, generator=gen)).to(torch.bfloat16).double().to(device)
    groups = G or 1
    mu0 = torch.randn(N, H, K, V, generator=gen).to(torch.bfloat16).double().to(device)
    imp0 = (1 + torch.rand(N, H, K, groups, generator=gen)).to(torch.bfloat16).double().to(device)
    leaves["initial_state"] = (mu0, imp0.repeat_interleave(V // groups, -1))
    return leaves


def run(fn, leaves, dtype, weights=None, training=False, **kw):
    """Outputs and gradients of a fixed random projection of (o, var, final mu, final I); ``training``: of o
    alone, without an initial state (what a training step runs: its own kernels, no variance, no final state)."""
    args = {}
    for n, t in leaves.items():
        if n == "initial_state" and training:
            args[n] = None
        elif n == "initial_state":
            args[n] = (t[0].to(torch.float32 if dtype != torch.float64 else dtype).requires_grad_(),
                       t[1].to(torch.float32 if dtype != torch.float64 else dtype))
        elif t is None:
            args[n] = None
        else:
            keep = torch.float32 if n in ("g", "prior") and dtype != torch.float64 else dtype
            args[n] = t.to(keep).requires_grad_()
    if training:
        outs = (fn(**args, **kw)[0],)
    else:
        o, var, final = fn(**args, output_final_state=True, output_variance=True, **kw)
        outs = (o, var, final[0], final[1])
    if weights is None:
        gen = torch.Generator(device="cpu").manual_seed(99)
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device) for t in outs]
    loss = sum((t.double() * w).sum() for t, w in zip(outs, weights))
    names = [n for n in ("q", "k", "v", "g", "beta", "prior") if args[n] is not None]
    tensors = [args[n] for n in names]
    if not training:
        names.append("mu0")
        tensors.append(args["initial_state"][0])
    grads = torch.autograd.grad(loss, tensors)
    return dict(zip(("o", "var", "mu", "I"), outs)), dict(zip(["d" + n for n in names], grads)), weights


def check(label, leaves, log, **kw) -> bool:
    ok = True
    for training in (False, True):
        ok &= _check(label + (" training" if training else ""), leaves, log, training=training, **kw)
    return ok


def _check(label, leaves, log, **kw) -> bool:
    ref_out, ref_grad, w = run(naive_palimpsa, leaves, torch.float64, **kw)
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        t0 = time.time()
        out, grad, _ = run(lambda **a: chunk_palimpsa(**a, backend="triton"), leaves, dtype, weights=w, **kw)
        errs = {n: rel_err(out[n], ref_out[n]) for n in out}
        errs.update({n: rel_err(grad[n], ref_grad[n]) for n in grad})
        worst = max(errs, key=errs.get)
        passed = all(e < LIMITS[dtype] for e in errs.values())
        ok &= passed
        log(f"{label} {str(dtype)[6:]:8s} {'PASS' if passed else 'FAIL'} worst {worst} {errs[worst]:.2e} "
            f"({time.time() - t0:.1f}s) " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="170M-like,760M-like")
    parser.add_argument("--log", default=None, help="also append the lines to this file")
    parser.add_argument("--groups", default="1,4,none", help="comma-separated G values ('none': beta = None)")
    parser.add_argument("--no-varlen", action="store_true", help="skip the varlen cases")
    parser.add_argument("--tokens", type=int, default=None, help="override T (a quick dry run)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1 (dry run)")
    args = parser.parse_args()

    def log(line):
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as handle:
                handle.write(line + "\n")

    device = torch.device(args.device)
    log(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    ok = True
    for name in args.shapes.split(","):
        shape = bench.shape_by_name(name.strip())
        groups = [None if x.strip() == "none" else int(x) for x in args.groups.split(",")]
        for G in groups:
            T = args.tokens or shape.T
            leaves = case_inputs(shape.K, shape.V, T, G, seed=len(name), device=device)
            ok &= check(f"{shape.name} T={T} G={G}", leaves, log)
    # varlen: three sequences packed, initial state per sequence
    K, V = 96, 192
    for G in (() if args.no_varlen else (1, None)):
        T = min(1000, args.tokens or 1000)
        leaves = case_inputs(K, V, T, G, seed=7, device=device, N=1)
        mu0, imp0 = leaves["initial_state"]
        leaves["initial_state"] = (mu0.repeat(3, 1, 1, 1), imp0.repeat(3, 1, 1, 1))
        ok &= check(f"varlen K={K} V={V} G={G}", leaves, log,
                    cu_seqlens=torch.tensor([0, T // 7, T // 2, T], device=device))
    log("ALL PASSED" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
