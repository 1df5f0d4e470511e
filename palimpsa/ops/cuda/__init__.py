"""CUDA C++ kernels of the Palimpsa op, compiled at run time by NVRTC (no build step; see nvrtc.py)."""

# the kernels' names, as profilers list them (extern "C" in sweep.cu and output.cu)
KERNEL_NAMES = frozenset({"palimpsa_sweep", "palimpsa_output"})
