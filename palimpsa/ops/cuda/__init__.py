"""CUDA C++ kernels of the Palimpsa op, compiled at run time by NVRTC (no build step; see nvrtc.py)."""
