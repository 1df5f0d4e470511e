"""CUDA C++ kernels compiled at run time: NVRTC (shipped with PyTorch's CUDA builds) turns the source into a cubin
for the GPU at hand, the CUDA driver loads and launches it on PyTorch's current stream.  No compiler, no build step
and no package beyond torch: only ``libnvrtc`` and ``libcuda``, found through ctypes.

``PALIMPSA_NVRTC_LIBRARY`` names the NVRTC shared library explicitly (e.g. to compile on a machine without a GPU:
:func:`compile_cubin` needs only NVRTC).
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
import sys
import threading
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
MAX_SHARED_BYTES = 227 * 1024  # dynamic shared memory of one block at most on sm_90
SHARED_PER_SM = 228 * 1024  # shared memory of a multiprocessor on sm_90, of which each resident block also takes
SHARED_RESERVED_PER_BLOCK = 1024  # this much


def _candidates() -> Iterable[str]:
    """Where libnvrtc may be: the override, the sonames of PyTorch's CUDA major version, the NVIDIA pip wheels
    next to torch, the CUDA toolkit."""
    override = os.environ.get("PALIMPSA_NVRTC_LIBRARY")
    if override:
        yield override
        return
    major = (torch.version.cuda or "12").split(".")[0]
    yield f"libnvrtc.so.{major}"
    yield "libnvrtc.so"
    for site in sys.path:
        yield from sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnvrtc.so*"), recursive=True))
    yield from sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))


_NVRTC: Optional[ctypes.CDLL] = None
_NVRTC_MISSING: Optional[str] = None  # why it could not be loaded (searched once per process)


def nvrtc_library() -> ctypes.CDLL:
    """The NVRTC shared library (looked for once; OSError, every time, when it is not found)."""
    global _NVRTC, _NVRTC_MISSING
    if _NVRTC is None and _NVRTC_MISSING is None:
        tried = []
        for name in _candidates():
            if "builtins" in os.path.basename(name) or ".alt." in os.path.basename(name):
                continue
            try:
                _NVRTC = ctypes.CDLL(name)
                break
            except OSError:
                tried.append(name)
        if _NVRTC is None:
            _NVRTC_MISSING = ("no NVRTC library found (tried " + ", ".join(tried[:6]) + "); set "
                              "PALIMPSA_NVRTC_LIBRARY to the path of libnvrtc.so, or use the Triton kernels "
                              "(CONFIG.fwd_backend / bwd_backend = 'gluon')")
    if _NVRTC is None:
        raise OSError(_NVRTC_MISSING)
    return _NVRTC


def nvrtc_version() -> Tuple[int, int]:
    """(major, minor) of the NVRTC library found (OSError when there is none)."""
    lib = nvrtc_library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_cubin(source: str, name: str, arch: int, options: Sequence[str] = ()) -> Tuple[bytes, str]:
    """(cubin, compile log) of ``source`` for compute capability ``arch`` (e.g. 90).  Raises RuntimeError with
    NVRTC's log when the source does not compile."""
    lib = nvrtc_library()
    prog = ctypes.c_void_p()

    def check(code: int, what: str) -> None:
        if code != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(code).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        # -default-device: a lambda inside a kernel (sweep.cu's chunk body, instantiated per step form) is device code
        opts = [f"--gpu-architecture=sm_{arch}", "--std=c++17", "-default-device", *options]
        array = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), array)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"the CUDA kernel {name} did not compile (sm_{arch}):\n{log}")
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


_CUDA: Optional[ctypes.CDLL] = None


def _driver() -> ctypes.CDLL:
    global _CUDA
    if _CUDA is None:
        _CUDA = ctypes.CDLL("libcuda.so.1")
        _CUDA.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    return _CUDA


def _check_driver(code: int, what: str) -> None:
    if code != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(code, ctypes.byref(text))
        raise RuntimeError(f"CUDA driver call {what} failed: {(text.value or b'unknown error').decode()} ({code})")


class Kernel:
    """One ``extern "C" __global__`` function of a compiled cubin, loaded into the current device's context."""

    def __init__(self, cubin: bytes, name: str, shared_bytes: int):
        torch.cuda.init()
        torch.cuda.current_stream().synchronize()  # makes PyTorch's (primary) context current on this thread
        lib = _driver()
        self._module = ctypes.c_void_p()
        _check_driver(lib.cuModuleLoadData(ctypes.byref(self._module), cubin), "cuModuleLoadData")
        self._function = ctypes.c_void_p()
        _check_driver(lib.cuModuleGetFunction(ctypes.byref(self._function), self._module, name.encode()),
                      "cuModuleGetFunction")
        self.shared_bytes = shared_bytes
        self._packings: Dict[str, "_ArgumentPacking"] = {}
        if shared_bytes > 48 * 1024:
            _check_driver(lib.cuFuncSetAttribute(self._function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                 shared_bytes),
                          f"cuFuncSetAttribute ({name} asks for {shared_bytes} bytes of shared memory a block, more "
                          "than this GPU allows: the CUDA kernels are sized for sm_90)")

    def __call__(self, grid: Tuple[int, int, int], block: int, args: Sequence) -> None:
        """Launch on PyTorch's current stream; ``args`` in the kernel's order: tensors (their data pointers; None
        for an unused pointer), Python ints (int32) and floats (float32)."""
        values, kinds = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                values.append(a.data_ptr())
                kinds.append("P")
            elif a is None:
                values.append(0)
                kinds.append("P")
            elif isinstance(a, (bool, int)):
                values.append(int(a))
                kinds.append("i")
            elif isinstance(a, float):
                values.append(a)
                kinds.append("f")
            else:
                raise TypeError(f"kernel argument of type {type(a).__name__} is not supported")
        pattern = "".join(kinds)
        packing = self._packings.get(pattern)
        if packing is None:
            packing = self._packings[pattern] = _ArgumentPacking(pattern)
        stream = torch.cuda.current_stream().cuda_stream
        with packing.lock:  # the driver copies the arguments during the call: the buffer is free after it
            packing.pack(values)
            _check_driver(_driver().cuLaunchKernel(self._function, grid[0], grid[1], grid[2], block, 1, 1,
                                                   self.shared_bytes, stream, packing.argv, None), "cuLaunchKernel")


class _ArgumentPacking:
    """One buffer holding a launch's arguments at their natural alignment (pointers 8 bytes, ints and floats 4), and
    the array of their addresses that cuLaunchKernel reads; made once per pattern of argument kinds ("P" pointer,
    "i" int32, "f" float32), so that a launch only packs its values (one struct.pack_into instead of a ctypes object
    per argument)."""

    def __init__(self, kinds: str):
        fmt, offsets, offset = "=", [], 0
        for kind in kinds:
            size = 8 if kind == "P" else 4
            pad = -offset % size
            fmt += "x" * pad + {"P": "Q", "i": "i", "f": "f"}[kind]
            offset += pad
            offsets.append(offset)
            offset += size
        self.format = struct.Struct(fmt)
        self.buffer = ctypes.create_string_buffer(max(offset, 8))
        base = ctypes.addressof(self.buffer)
        self.argv = (ctypes.c_void_p * max(len(kinds), 1))(*[base + o for o in offsets])
        self.lock = threading.Lock()

    def pack(self, values: Sequence) -> None:
        try:
            self.format.pack_into(self.buffer, 0, *values)
        except struct.error as err:
            raise ValueError(f"a kernel argument does not fit its type (pointers 64-bit, ints int32): {err}") from None


_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def dtype_code(dtype: torch.dtype, name: str) -> int:
    """The kernels' code of a tensor dtype (0 bfloat16, 1 float16, 2 float32); ``name`` names the tensor in the
    error for any other."""
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"the CUDA kernels take bfloat16, float16 or float32 tensors, got {dtype} for {name}")
    return _DTYPE_CODES[dtype]


def aligned16(K: int, V: int, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether every tensor starts at a 16-byte boundary and its rows of K or V elements are whole 16-byte vectors
    (the kernels' PALIGNED: vector loads when staging a chunk)."""
    return all(t.data_ptr() % 16 == 0 and (K * t.element_size()) % 16 == 0 and (V * t.element_size()) % 16 == 0
               for t in tensors if t is not None)


def kernel_source(filename: str, defines: Dict[str, int]) -> str:
    """The CUDA source ``filename`` (next to this module) with its compile-time parameters defined and common.cuh
    before it."""
    here = os.path.dirname(os.path.abspath(__file__))
    head = "".join(f"#define {name} {int(value)}\n" for name, value in defines.items())
    with open(os.path.join(here, "common.cuh")) as common, open(os.path.join(here, filename)) as body:
        return head + common.read() + "\n" + body.read()


_KERNELS: Dict[tuple, Kernel] = {}


def load_kernel(filename: str, defines: Dict[str, int], name: str, shared_bytes: int, device: torch.device,
                options: Sequence[str] = ()) -> Kernel:
    """The kernel ``name`` of the CUDA source ``filename`` with ``defines`` (:func:`kernel_source`), compiled for
    ``device``; cached per device and defines, so that a launch after the first builds no source."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, filename, tuple(sorted(defines.items())), name, tuple(options))
    kernel = _KERNELS.get(key)
    if kernel is None:
        major, minor = torch.cuda.get_device_capability(index)
        with torch.cuda.device(index):
            cubin, _log = compile_cubin(kernel_source(filename, defines), name, major * 10 + minor, options)
            kernel = _KERNELS[key] = Kernel(cubin, name, shared_bytes)
    return kernel
