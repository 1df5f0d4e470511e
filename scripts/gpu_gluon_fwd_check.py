"""Check the Gluon output kernel on a GPU against the float64 reference and the Triton kernel, then time both.

    PYTHONPATH=. python scripts/gpu_gluon_fwd_check.py [--shapes 760M-like,170M-like,d64,d128] [--out FILE.md]

1. Correctness.  At every shape (and on a varlen batch and MQAR's small heads), with an initial state, the
   variance and the final state: the chunk path's forward with ``fwd_backend="gluon"`` and with "triton",
   both against ``naive_palimpsa`` in float64 on the same inputs (values bf16 represents exactly), in bf16 and
   float32.  Relative errors ||ours - ref|| / ||ref||; limits: float32 1e-4, bf16 2e-2 (as
   scripts/gpu_ops_check.py).  The backward does not use the output kernel, so its gradients are unchanged.
2. Timing, only when every check passed: the op's forward (bf16, no initial state or variance, as
   ``palimpsa bench ops``) with each backend, ``triton.testing.do_bench`` medians, and the ratio.
Everything is printed as it goes and, with --out, written as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_ops_check import LIMITS, as64, bf16_exact, extra_inputs, naive_forward_folded, rel_err, run  # noqa: E402

from palimpsa.bench import ops as bench  # noqa: E402
from palimpsa.ops import chunk_palimpsa  # noqa: E402
from palimpsa.ops.triton.config import kernel_config  # noqa: E402

BACKENDS = ("triton", "gluon")
EXTRA_SHAPES = {"mqar-full": bench.Shape("mqar-full", 4, 256, 8, 16, 32),
                "mqar-quarter": bench.Shape("mqar-quarter", 4, 256, 8, 8, 16)}


def check(shape, varlen: bool, seed: int = 0):
    """[(label, dtype, backend, worst error, name of the worst)] and whether all passed."""
    x = bf16_exact(bench.make_inputs(shape, torch.float32, "cuda"))
    cu = None
    if varlen:  # the batch packed into one row, cut into sequences of uneven lengths
        B, T = x["q"].shape[:2]
        x = {n: t.reshape(1, B * T, *t.shape[2:]) for n, t in x.items()}
        cuts = sorted({0, B * T, *torch.randint(1, B * T, (2 * B - 1,), generator=torch.Generator().manual_seed(seed))
                       .tolist()})
        cu = torch.tensor(cuts, device="cuda", dtype=torch.long)
    N = cu.numel() - 1 if cu is not None else x["q"].shape[0]
    e = extra_inputs(x, N, torch.float32, seed)
    ref = naive_forward_folded(*as64(x, e), cu)
    rows, ok = [], True
    for dtype in (torch.bfloat16, torch.float32):
        xd = {n: (t if n == "g" else t.to(dtype)) for n, t in x.items()}
        outs = {}
        for backend in BACKENDS:
            with kernel_config(fwd_backend=backend):
                outs[backend] = run(chunk_palimpsa, xd, e, cu=cu, grads=False, backend="triton")
            errors = {n: rel_err(a, b) for n, a, b in zip(("o", "var", "mu", "I"), outs[backend], ref)}
            worst = max(errors, key=errors.get)
            passed = errors[worst] < LIMITS[dtype]
            ok &= passed
            rows.append((shape.name + (" varlen" if varlen else ""), str(dtype).replace("torch.", ""), backend,
                         errors[worst], worst, passed))
            print(f"  {rows[-1][0]:22s} {rows[-1][1]:9s} {backend:7s} worst {errors[worst]:.2e} ({worst}) "
                  f"{'ok' if passed else 'FAILED'}", flush=True)
        between = rel_err(outs["gluon"][0], outs["triton"][0])
        print(f"  {'':22s} {'':9s} gluon vs triton o: {between:.2e}", flush=True)
    return rows, ok


def timing(shape):
    """ms of the op's forward with each backend (bf16, as palimpsa bench ops times it)."""
    import triton

    inputs = bench.make_inputs(shape, torch.bfloat16, "cuda")
    out = {}
    for backend in BACKENDS:
        with kernel_config(fwd_backend=backend), torch.no_grad():
            bench.palimpsa_forward(**inputs)
            out[backend] = float(triton.testing.do_bench(lambda: bench.palimpsa_forward(**inputs), warmup=25,
                                                         rep=100, return_mode="median"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="760M-like,170M-like,d64,d128")
    parser.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_gluon_fwd_check.py needs a CUDA GPU")
    shapes = [bench.shape_by_name(s.strip()) for s in args.shapes.split(",")]
    lines = [f"Gluon output kernel against the Triton one; {torch.cuda.get_device_name()}, {bench.environment()}",
             "", "| case | dtype | backend | worst rel. error | of | passed |", "|---|---|---|---|---|---|"]
    all_ok = True
    cases = [(s, False) for s in shapes] + [(shapes[-1], True)] + [(s, False) for s in EXTRA_SHAPES.values()]
    for shape, varlen in cases:
        rows, ok = check(shape, varlen)
        all_ok &= ok
        lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2e} | {r[4]} | {'yes' if r[5] else 'NO'} |" for r in rows]
    lines += ["", f"all checks passed: {all_ok}", ""]
    if all_ok:
        lines += ["Forward of the op (bf16, do_bench median ms; chunk-boundary states included):", "",
                  "| shape | triton | gluon | triton / gluon |", "|---|---|---|---|"]
        for shape in shapes:
            t = timing(shape)
            lines.append(f"| {shape.name} | {t['triton']:.3f} | {t['gluon']:.3f} | {t['triton'] / t['gluon']:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        bench.write_atomic(args.out, text)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
