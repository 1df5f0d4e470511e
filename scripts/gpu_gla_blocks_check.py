"""Which value widths and key sharing the Triton GLA kernels get right on this GPU (one subprocess per case).

    PYTHONPATH=. python scripts/gpu_gla_blocks_check.py [--log FILE]

Each case runs ``GLAFunction`` (palimpsa/ops/triton/gla.py) forward and backward on random inputs and compares
the output, final state and every gradient (q, k, v, g, initial state) with the PyTorch twin
(``gla_chunk_torch``) in float64 on the same values.  Cases: (K, Vd) in {(64, 12), (64, 16), (64, 24),
(64, 48), (64, 64), (8, 4), (8, 16)} (the last two: MQAR's quarter state with G = 4 and 1); bf16 with keys
shared by 4 query heads (as grouped importance runs them) or one key head per query head; float32 with shared
keys.  A case that crashes the CUDA context (an illegal memory access) is reported as CRASH without stopping the
others.  Limits: float32 1e-4, bf16 2e-2 (relative, Frobenius).  Exit code 1 if any case fails.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys

LIMITS = {"float32": 1e-4, "bfloat16": 2e-2}


def one_case(kd: int, vd: int, dtype_name: str, shared: bool) -> dict:
    import torch

    from palimpsa.ops.torch_gla import gla_chunk_torch
    from palimpsa.ops.triton.gla import GLAFunction, kernel_chunk

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(vd)
    N, T, HV, K, chunk = 2, 256, 8, kd, 64
    HK = 2 if shared else HV
    q = torch.randn(N, T, HV, K, generator=gen) * K ** -0.5
    k = torch.randn(N, T, HK, K, generator=gen) * K ** -0.5
    v = torch.randn(N, T, HV, vd, generator=gen)
    g = -torch.rand(N, T, HK, generator=gen) * 0.2
    h0 = torch.randn(N, HV, K, vd, generator=gen)
    leaves = [x.to(dtype).double() for x in (q, k, v)] + [g.double(), h0.double()]
    w_o, w_s = torch.randn(N, T, HV, vd, generator=gen).double(), torch.randn(N, HV, K, vd, generator=gen).double()

    def grads(fn, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        o, hT = fn(*tensors)
        loss = (o.double() * w_o.to(o.device)).sum() + (hT.double() * w_s.to(hT.device)).sum()
        return [o, hT] + list(torch.autograd.grad(loss, tensors))

    def expand(x):
        return x.repeat_interleave(HV // HK, dim=2)

    ref = grads(lambda q, k, v, g, h0: gla_chunk_torch(q, expand(k), v, expand(g), 1.0, h0, chunk), leaves)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only under TRITON_INTERPRET=1
    dev = [t.to(device) for t in leaves]
    dev = [t.to(dtype) for t in dev[:3]] + [dev[3].float(), dev[4].float()]
    # the chunk production runs (float32 takes smaller ones)
    ours = grads(lambda q, k, v, g, h0: GLAFunction.apply(q, k, v, g, h0, 1.0, kernel_chunk(T, chunk, dtype)), dev)
    if device == "cuda":
        torch.cuda.synchronize()
    errs = {}
    for name, a, b in zip(("o", "hT", "dq", "dk", "dv", "dg", "dh0"), ours, ref):
        a = a.double().cpu()
        errs[name] = float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()
    return errs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        kd, vd, dtype_name, shared = args.case.split(",")
        print(json.dumps(one_case(int(kd), int(vd), dtype_name, shared == "shared")))
        return 0
    sizes = ((64, 12), (64, 16), (64, 24), (64, 48), (64, 64), (8, 4), (8, 16))
    cases = [(kd, vd, "bfloat16", shared) for kd, vd in sizes for shared in ("shared", "copied")]
    cases += [(kd, vd, "float32", "shared") for kd, vd in sizes]

    def run_case(case):
        kd, vd, dtype_name, shared = case
        proc = subprocess.run([sys.executable, __file__, "--case", f"{kd},{vd},{dtype_name},{shared}"],
                              capture_output=True, text=True)
        name = f"K={kd:2d} Vd={vd:3d} {dtype_name:8s} {shared:6s}"
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
            return f"{name} CRASH {tail}", False
        errs = json.loads(proc.stdout.strip().splitlines()[-1])
        worst = max(errs, key=errs.get)
        ok = errs[worst] <= LIMITS[dtype_name]
        detail = " ".join(f"{k}={e:.1e}" for k, e in errs.items())
        return f"{name} {'PASS' if ok else 'FAIL'} worst {worst} {detail}", ok

    lines = []
    failed = False
    with ThreadPoolExecutor(max_workers=12) as pool:  # one CUDA context per case, 12 at a time
        for line, ok in pool.map(run_case, cases):
            print(line, flush=True)
            lines.append(line)
            failed |= not ok
    if args.log:
        with open(args.log, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
