"""How much of an op's wall time is the host's (Python, autograd, launches), per variant, on one GPU.

For each variant, one fwd+bwd is issued ``--iters`` times back to back without synchronising: while the GPU's
queue is not full the host never waits, so the time to issue them divided by ``--iters`` is the host's cost of
one fwd+bwd.  Beside it, the wall time with a synchronise (what do_bench sees) and the kernels' device time.
Then the Python functions that take the host's time in G = 1's and the per-channel op's fwd+bwd (cProfile, top
``--top`` by own time).

    PYTHONPATH=. python scripts/gpu_host_overhead.py --shapes 760M-like,170M-like [--no-per-channel] --out host.md
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from palimpsa.bench import ops as bench_ops


def _step_fn(forward, inputs, grad_names):
    leaves = {n: x.detach().requires_grad_(n in grad_names) for n, x in inputs.items()}
    grads = [leaves[n] for n in grad_names]

    def step():
        forward(**leaves).float().sum().backward()
        for x in grads:
            x.grad = None
    return step


def wall_ms(step, iters: int) -> float:
    """One step's wall time with the GPU's work finished (mean of ``iters`` back to back)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="760M-like,170M-like")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--fla-bypass-check", action="store_true")
    parser.add_argument("--no-per-channel", action="store_true", help="leave the per-channel op out")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with_fla = bench_ops.fla_available()
    lines = [f"# Host time of one fwd+bwd: {torch.cuda.get_device_name(0)}, {bench_ops.environment()}", "",
             f"host: time to issue one fwd+bwd with no synchronise (mean of {args.iters}); wall: the same with the "
             "GPU's work finished; device: the kernels alone (profiler).", "",
             "| shape | variant | host ms | wall ms | device ms |", "|---|---|---|---|---|"]
    profiles = []
    with bench_ops.hopper_check_bypassed(args.fla_bypass_check):
        for name in args.shapes.split(","):
            inputs = bench_ops.make_inputs(bench_ops.shape_by_name(name), torch.bfloat16, "cuda")
            variants = bench_ops.op_variants(with_fla, per_channel=not args.no_per_channel)
            for variant, forward, grad_names, transform in variants:
                x = transform(inputs)
                step = _step_fn(forward, x, grad_names)
                host, wall = bench_ops.host_ms(step, iters=args.iters), wall_ms(step, args.iters)
                device = bench_ops._device_ms(step, [])
                lines.append(f"| {name} | {variant} | {host:.3f} | {wall:.3f} | {device:.3f} |")
                print(lines[-1], flush=True)
                if variant in ("grouped G=1", "per-channel"):
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.iters):
                        step()
                    prof.disable()
                    torch.cuda.synchronize()
                    text = io.StringIO()
                    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
                    profiles.append(f"\n## {name}, {variant}: cProfile of {args.iters} fwd+bwd, by own time\n\n"
                                    "```\n" + text.getvalue().strip() + "\n```")
    bench_ops.write_atomic(args.out, "\n".join(lines + profiles) + "\n")


if __name__ == "__main__":
    main()
