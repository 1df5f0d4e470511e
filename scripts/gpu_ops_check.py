"""Check the Palimpsa Triton kernels on a GPU against the float64 reference, then time them.

    PYTHONPATH=. python scripts/gpu_ops_check.py --out results/bench/ops_h100.md [--sweep]

1. Correctness, at every benchmark shape and on a varlen batch (where the CUDA sequence walk can run, that batch once
   more with saturated and infinite log decays, walked), for bf16 and float32 inputs:
   - chunk and fused-recurrent forward (outputs, variance, final states) over the full shape, against
     ``naive_palimpsa`` in float64 on the same inputs (values bf16 represents exactly, so one reference
     serves both dtypes);
   - every gradient (q, k, v, g, beta, prior, initial mu and I), through the variance and the final state,
     on a slice of the shape (batch 0, heads 0-1, all tokens: float64 autograd of the naive recurrence
     needs memory per token), and the full-shape backward agreeing with the slice on that slice.
   Relative errors ||ours - ref|| / ||ref|| are printed; limits: float32 1e-4, bf16 2e-2.
   Triton 3.6 has known Hopper miscompilations, so a timing only counts when this passes.
2. Optionally (--sweep) a few launch parameters at the two model shapes (timings only; the defaults
   are what step 1 checked and step 3 reports).
3. The benchmark table of ``palimpsa bench ops`` (our kernels, fla's when installed, the floor, decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from palimpsa.bench import ops as bench
from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa

LIMITS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
NAMES = ("o", "var", "mu", "I", "dq", "dk", "dv", "dg", "dbeta", "dprior", "dmu0", "dI0")


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def extra_inputs(x, N, dtype, seed):
    """Initial state, prior [H] and output gradients for a check."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, K = x["q"].shape
    V = x["v"].shape[-1]
    dev = x["q"].device
    out = dict(
        prior=(0.5 + torch.rand(H, generator=gen)).to(dev),
        mu0=(0.3 * torch.randn(N, H, K, V, generator=gen)).to(dev),
        imp0=(0.5 + torch.rand(N, H, K, V, generator=gen)).to(dev),
        do=torch.randn(B, T, H, V, generator=gen).to(dev, dtype),
        dvar=torch.randn(B, T, H, V, generator=gen).to(dev, dtype),
        dmu=torch.randn(N, H, K, V, generator=gen).to(dev),
        dimp=torch.randn(N, H, K, V, generator=gen).to(dev),
    )
    return out


def run(fn, x, e, cu=None, grads=True, **kw):
    """Outputs (o, var, mu, I) and, when ``grads``, gradients of q, k, v, g, beta, prior, mu0, I0."""
    leaves = {n: t.detach().clone().requires_grad_(grads) for n, t in {**x, "prior": e["prior"],
                                                                        "mu0": e["mu0"], "imp0": e["imp0"]}.items()}
    with torch.set_grad_enabled(grads):
        o, var, (mu, imp) = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"], leaves["prior"],
                               initial_state=(leaves["mu0"], leaves["imp0"]), output_final_state=True,
                               output_variance=True, cu_seqlens=cu, **kw)
    outs = [o.detach(), var.detach(), mu.detach(), imp.detach()]
    if not grads:
        return outs
    loss = ((o * e["do"].to(o.dtype)).sum() + (var * e["dvar"].to(var.dtype)).sum()
            + (mu * e["dmu"].to(mu.dtype)).sum() + (imp * e["dimp"].to(imp.dtype)).sum())
    loss.backward()
    return outs + [leaves[n].grad for n in ("q", "k", "v", "g", "beta", "prior", "mu0", "imp0")]


def as64(x, e):
    return {n: t.double() for n, t in x.items()}, {n: t.double() for n, t in e.items()}


def naive_forward_folded(x, e, cu):
    """Float64 naive forward with the batch folded into the heads (one pass of T steps, not B of them)."""
    B, T, H, K = x["q"].shape
    if cu is not None or B == 1:
        return run(naive_palimpsa, x, e, cu=cu, grads=False)
    fold = lambda t: t.transpose(0, 1).reshape(1, T, B * H, *t.shape[3:])  # noqa: E731
    xf = {n: fold(t) if t.dim() == 4 else t.transpose(0, 1).reshape(1, T, B * H) for n, t in x.items()}
    ef = dict(e, prior=e["prior"].repeat(B), mu0=e["mu0"].reshape(1, B * H, *e["mu0"].shape[2:]),
              imp0=e["imp0"].reshape(1, B * H, *e["imp0"].shape[2:]))
    o, var, mu, imp = run(naive_palimpsa, xf, ef, grads=False)
    unfold = lambda t: t.reshape(T, B, H, -1).transpose(0, 1)  # noqa: E731
    return [unfold(o), unfold(var), mu.reshape(B, H, *mu.shape[2:]), imp.reshape(B, H, *imp.shape[2:])]


def check_case(label, x, e, cu=None, slice_heads=2):
    """Check both dtypes on inputs that bf16 represents exactly (one float64 reference serves both).

    Forward over the whole input; gradients on batch 0 and the first heads.  Returns (ok, errors).
    """
    report, all_ok = {}, True
    hs = slice(0, slice_heads)
    N = e["mu0"].shape[0] if cu is not None else 1
    xs = {n: t[:1, :, hs].contiguous() for n, t in x.items()}
    es = dict(prior=e["prior"][hs].contiguous(), mu0=e["mu0"][:N, hs].contiguous(),
              imp0=e["imp0"][:N, hs].contiguous(), do=e["do"][:1, :, hs].contiguous(),
              dvar=e["dvar"][:1, :, hs].contiguous(), dmu=e["dmu"][:N, hs].contiguous(),
              dimp=e["dimp"][:N, hs].contiguous())
    ref = naive_forward_folded(*as64(x, e), cu)
    ref_s = run(naive_palimpsa, *as64(xs, es), cu=cu)
    for dtype in (torch.bfloat16, torch.float32):
        cast = lambda d: {n: (t if n == "g" else t.to(dtype)) for n, t in d.items()}  # noqa: E731
        xd, xsd = cast(x), cast(xs)
        errors = {}
        for name, fn in (("chunk", chunk_palimpsa), ("recurrent", fused_recurrent_palimpsa)):
            got = run(fn, xd, e, cu=cu, grads=False, backend="triton")
            for n, a, b in zip(NAMES[:4], got, ref):
                errors[f"{name}.{n}"] = rel_err(a, b)
        got_s = run(chunk_palimpsa, xsd, es, cu=cu, backend="triton")
        for n, a, b in zip(NAMES, got_s, ref_s):
            errors[f"grad.{n}"] = rel_err(a, b)
        full = run(chunk_palimpsa, xd, e, cu=cu, backend="triton")  # full-shape backward, compared on the slice
        for i, n in zip(range(4, 9), NAMES[4:9]):
            errors[f"full_vs_slice.{n}"] = rel_err(full[i][:1, :, hs], got_s[i])
        limit = LIMITS[dtype]
        worst_name = max(errors, key=errors.get)
        ok = errors[worst_name] < limit
        all_ok &= ok
        print(f"  {label:34s} {str(dtype).replace('torch.', ''):9s} worst {errors[worst_name]:.2e} ({worst_name}; "
              f"limit {limit:.0e}) {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            print(f"    failing: { {k: f'{v:.2e}' for k, v in errors.items() if not v < limit} }", flush=True)
        report[str(dtype)] = errors
    return all_ok, report


def bf16_exact(x):
    return {n: (t if n == "g" else t.to(torch.bfloat16).float()) for n, t in x.items()}


def walk_runs(device) -> bool:
    """Whether the CUDA output kernel's sequence walk can run here (a CUDA device and NVRTC)."""
    from palimpsa.ops.triton.function import _nvrtc_available

    return torch.device(device).type == "cuda" and _nvrtc_available()


def correctness(device, shapes=bench.BENCH_SHAPES, varlen=True) -> dict:
    print("1. correctness against the float64 naive recurrence", flush=True)
    report = {}
    all_ok = True
    for shape in shapes:
        x = bf16_exact(bench.make_inputs(shape, torch.float32, device, seed=1))
        e = extra_inputs(x, shape.B, torch.bfloat16, seed=2)
        ok, report[shape.name] = check_case(shape.name, x, e)
        all_ok &= ok
    if varlen:  # three packed sequences at the 760M-like head sizes, two heads
        shape = bench.shape_by_name("760M-like")
        cu = torch.tensor([0, 1000, 3001, 4096], device=device)
        x = bf16_exact(bench.make_inputs(shape, torch.float32, device, seed=3, B=1, T=4096, H=2))
        e = extra_inputs(x, 3, torch.bfloat16, seed=4)
        ok, report["varlen"] = check_case("varlen 760M-like (3 seqs, H=2)", x, e, cu=cu)
        all_ok &= ok
        if walk_runs(device):  # the forward's sequence walk there (too few warps for "auto" to walk it), with
            # saturated and infinite log decays, so that both its scaled chunks and its direct ones run
            from palimpsa.ops.triton.config import kernel_config

            g = x["g"].clone()
            g[0, [0, 31, 32, 999, 1000, 1001, 2500, 3001, 4095], :] = -35.0
            g[0, [5, 1500, 3002], :1] = float("-inf")
            with kernel_config(fwd_walk=True):
                ok, report["varlen walked"] = check_case("varlen 760M-like, walked, extreme decays", {**x, "g": g}, e,
                                                         cu=cu)
            all_ok &= ok
    report["all_ok"] = all_ok
    print(f"  => {'ALL CHECKS PASSED' if all_ok else 'SOME CHECKS FAILED'}", flush=True)
    return report


def sweep(device) -> list:
    """Time a few launch parameters (not part of the reported table)."""
    from palimpsa.ops.triton.config import kernel_config

    print("2. launch-parameter sweep (timings only)", flush=True)
    rows = []
    variants = [dict(fwd_block_v=16), dict(fwd_block_v=32), dict(fwd_block_v=64), dict(fwd_block_v=64, fwd_num_warps=8),
                dict(bwd_num_warps=4), dict(bwd_num_warps=8), dict(bwd_block_v=32, bwd_num_warps=8),
                dict(bwd_target_programs=8192), dict(bwd_target_programs=512)]  # counted with the running
    # sweep's own value blocks since 507300f (the Gluon sweep's are 4x narrower): not comparable with older rows
    for name in ("760M-like", "170M-like"):
        shape = bench.shape_by_name(name)
        x = bench.make_inputs(shape, torch.bfloat16, device)
        for v in variants:
            with kernel_config(**v):
                try:
                    m = bench._measure(bench.palimpsa_forward, x, ("q", "k", "v", "g", "beta"))
                except Exception as err:  # noqa: BLE001
                    m = {"error": str(err)[:100]}
            rows.append({"shape": name, "config": v, **m})
            print(f"  {name:10s} {json.dumps(v):48s} " + " ".join(
                f"{k}={val:.3f}" if isinstance(val, float) else f"{k}={val}" for k, val in m.items()), flush=True)
    return rows


def parse_shapes(names: str):
    return bench.BENCH_SHAPES if names == "all" else tuple(bench.shape_by_name(n.strip()) for n in names.split(","))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/ops_h100.md",
                        help="benchmark table (markdown; .json beside; default: runs/bench/ops_h100.md)")
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "."), help="where check/sweep JSON go")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--check-shapes", default="all", help="shapes to check (comma-separated names or 'all')")
    parser.add_argument("--no-varlen", action="store_true", help="skip the varlen check")
    parser.add_argument("--shapes", default="all", help="shapes to time (comma-separated names or 'all')")
    parser.add_argument("--no-fla", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    env = bench.environment()
    print(json.dumps(env), flush=True)
    t0 = time.time()
    report = {"environment": env}
    if not args.skip_check:
        report["check"] = correctness(device, parse_shapes(args.check_shapes), varlen=not args.no_varlen)
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if args.sweep:
        report["sweep"] = sweep(device)
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
    bench.write_atomic(os.path.join(args.log_dir, "gpu_ops_check.json"), json.dumps(report, indent=1, default=str))
    print("3. benchmark", flush=True)
    result = bench.run_benchmark(parse_shapes(args.shapes), with_fla=not args.no_fla)
    result["checked"] = report.get("check", {}).get("all_ok", False)
    bench.save_result(result, args.out)
    if args.log_dir != os.path.dirname(args.out):
        bench.save_result(result, os.path.join(args.log_dir, os.path.basename(args.out)))
    print(bench.format_table(result), end="")
    print(f"checks {'passed' if result['checked'] else 'NOT passed'}; total {time.time() - t0:.0f} s", flush=True)
    return 0 if result["checked"] or args.skip_check else 1


if __name__ == "__main__":
    sys.exit(main())
