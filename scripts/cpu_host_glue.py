"""The host's Python and PyTorch glue around the Triton kernels of one fwd+bwd, with the kernel launches stubbed.

Every Triton kernel launch (``kernel[grid](...)``, autotuned or not) becomes a no-op, and the GPU path (bf16
inputs, the Triton backend's code) runs on CPU tensors at a tiny shape: what remains is the time of our Python,
the autograd engine and PyTorch's own operators (allocations, views, sums), without any kernel's launch cost.
Set beside the host time measured on a GPU (``palimpsa bench ops``: "host"), the difference is the launches.
The outputs are meaningless (nothing is computed); only the time counts.

``--per-channel`` adds the per-channel op as it runs on an sm_90 GPU: the CUDA output kernel walking the sequences
and the CUDA sweep, their NVRTC kernels stubbed too (the driver's launch a no-op, the argument marshalling kept).

    python scripts/cpu_host_glue.py [--iters 200] [--profile] [--per-channel]
"""
import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch
import triton.runtime.jit as triton_jit

from palimpsa.bench import ops as bench_ops


CUDA_LAUNCHES = [0]  # the stubbed driver's count of kernel launches


def stub_cuda_path() -> None:
    """Make the per-channel op take its sm_90 path on CPU tensors: the decisions forced to the CUDA kernels, NVRTC's
    compile and the driver's module load and launch made no-ops (the launches counted in CUDA_LAUNCHES), PyTorch's
    CUDA stream queries answered."""
    from palimpsa.ops.cuda import nvrtc
    from palimpsa.ops.triton import function

    class _Stream:
        cuda_stream = 0

        def synchronize(self):
            pass

    class _Driver:  # every driver call succeeds and does nothing
        def __getattr__(self, name):
            return lambda *args: 0

        @staticmethod
        def cuLaunchKernel(*args):
            CUDA_LAUNCHES[0] += 1
            return 0

    torch.cuda.init = lambda: None
    function.walk_forward = lambda *args, **kwargs: True
    function.sweep_kernel = lambda *args, **kwargs: "cuda"
    nvrtc.compile_cubin = lambda *args, **kwargs: (b"", "")
    nvrtc._driver = lambda: _Driver()
    torch.cuda.current_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda *args: (9, 0)
    torch.cuda.device = lambda *args: contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions by own time")
    parser.add_argument("--per-channel", action="store_true",
                        help="also the per-channel op on its sm_90 path (CUDA kernels, stubbed as well)")
    args = parser.parse_args()
    triton_jit.KernelInterface.__getitem__ = lambda self, grid: (lambda *a, **k: None)  # every launch a no-op
    if args.per_channel:
        stub_cuda_path()
    inputs = bench_ops.make_inputs(bench_ops.Shape("tiny", 1, 128, 2, 32, 64), torch.bfloat16, "cpu")
    for name, forward, grad_names, transform in bench_ops.op_variants(with_fla=False, per_channel=args.per_channel):
        leaves = {n: t.detach().requires_grad_(n in grad_names) for n, t in transform(inputs).items()}

        def step():
            forward(**leaves).float().sum().backward()
            for n in grad_names:
                leaves[n].grad = None

        for _ in range(5):
            step()
        launches = CUDA_LAUNCHES[0]
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        elapsed = time.perf_counter() - start
        cuda = (CUDA_LAUNCHES[0] - launches) / args.iters
        print(f"{name}: {1e6 * elapsed / args.iters:.0f} us of host glue per fwd+bwd (mean of {args.iters}, launches "
              f"stubbed{f'; {cuda:g} CUDA kernels a fwd+bwd' if cuda else ''})")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.iters):
                step()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
            print(text.getvalue())


if __name__ == "__main__":
    main()
