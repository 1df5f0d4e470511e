"""CPU speed of the chunked PyTorch path against a per-token Python loop of the recurrence.

Forward + backward at B=4, T=1024, H=4, K=V=32, float32 (issue default), on however many threads torch
uses.  The loop baseline is ``naive_palimpsa``: the recurrence written token by token, differentiated by
autograd.  Beside the paper's per-channel op (``chunk``), the chunked path with one importance gate per head
and token (``chunk_g1``, the GLA-shaped path) and without metaplasticity (``chunk_notpalimpsa``).  Writes
``OUT/cpu_bench.json`` and ``OUT/cpu_bench.md`` atomically.

    python -m palimpsa.bench.cpu                  # all, table + files under runs/bench (--out DIR)
    python -m palimpsa.bench.cpu --impl chunk     # one implementation only (for whole-process timers)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from palimpsa.io import atomic_write_text
from palimpsa.ops import chunk_palimpsa, naive_palimpsa

IMPLEMENTATIONS = {  # (q, k, v, g, beta [B, T, H, V]) -> (o, final state)
    "chunk": lambda q, k, v, g, beta: chunk_palimpsa(q, k, v, g, beta, backend="torch"),
    "chunk_g1": lambda q, k, v, g, beta: chunk_palimpsa(q, k, v, g, beta[..., :1], backend="torch"),
    "chunk_notpalimpsa": lambda q, k, v, g, beta: chunk_palimpsa(q, k, v, g, None, backend="torch"),
    "loop": lambda q, k, v, g, beta: naive_palimpsa(q, k, v, g, beta),
}


def make_inputs(B, T, H, K, V, seed=0):
    """q, k [B,T,H,K]; v, beta [B,T,H,V]; g [B,T,H] (float32, requiring grad)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -0.1 * torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, V, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def time_fwd_bwd(impl: str, shape, repeats: int) -> list:
    """Seconds per forward + backward, one entry per repeat (after one warm-up)."""
    fn = IMPLEMENTATIONS[impl]
    inputs = make_inputs(*shape)
    times = []
    for i in range(repeats + 1):
        for x in inputs:
            x.grad = None
        start = time.perf_counter()
        o, _ = fn(*inputs)
        o.square().mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["all", *IMPLEMENTATIONS], default="all")
    parser.add_argument("--shape", type=int, nargs=5, default=[4, 1024, 4, 32, 32], metavar=("B", "T", "H", "K", "V"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    impls = list(IMPLEMENTATIONS) if args.impl == "all" else [args.impl]
    rows = {}
    for impl in impls:
        times = time_fwd_bwd(impl, tuple(args.shape), args.repeats)
        rows[impl] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        print(f"{impl:>17}: fwd+bwd median {rows[impl]['median_s'] * 1e3:9.1f} ms  "
              f"(min {rows[impl]['min_s'] * 1e3:.1f}, max {rows[impl]['max_s'] * 1e3:.1f}, {args.repeats} runs)")
    if args.impl != "all":
        return 0
    speedup = rows["loop"]["median_s"] / rows["chunk"]["median_s"]
    print(f"speed-up of chunk_palimpsa over the per-token loop: {speedup:.1f}x")
    record = {
        "shape_BTHKV": args.shape, "dtype": "float32", "threads": torch.get_num_threads(), "repeats": args.repeats,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "results": rows, "speedup": speedup,
    }
    atomic_write_text(args.out / "cpu_bench.json", json.dumps(record, indent=2) + "\n")
    md = ("| implementation | fwd+bwd median (ms) | min | max | loop / this |\n|---|---|---|---|---|\n" + "".join(
        f"| {k} | {v['median_s'] * 1e3:.1f} | {v['min_s'] * 1e3:.1f} | {v['max_s'] * 1e3:.1f} | "
        f"{rows['loop']['median_s'] / v['median_s']:.1f}x |\n" for k, v in rows.items())
        + f"\nB,T,H,K,V = {tuple(args.shape)}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {args.repeats} runs after one warm-up; speed-up {speedup:.1f}x. "
        f"Command: `palimpsa bench cpu --repeats {args.repeats} --out {args.out}`.\n")
    atomic_write_text(args.out / "cpu_bench.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
