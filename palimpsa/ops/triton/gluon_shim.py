"""Gluon on the GPU, plain Triton under the CPU interpreter: one kernel source, checked on the CPU.

Gluon (``triton.experimental.gluon``) lets a kernel state its register layouts, but it has no CPU interpreter.
A kernel written against this module's ``gl`` and ``jit`` compiles as Gluon on a GPU and, under
``TRITON_INTERPRET=1``, runs as an ordinary interpreted Triton kernel whose layouts are ignored: the same source
is then tested against the float64 reference in the CPU test suite, and on a GPU only its speed depends on
the layouts.

The interpreter half covers what the project's Gluon kernels use: layouts (ignored), ``arange``, ``zeros``,
``load``, ``store``, ``cast``, ``expand_dims``, ``sum``, ``exp``, ``minimum``, ``cdiv``, ``program_id``,
``convert_layout`` (the identity) and ``inline_asm_elementwise`` for the one instruction used,
``rcp.approx.ftz.f32`` (computed as 1 / x), and float32 shared memory (``allocate_shared_memory``, its views
``index(i)`` and ``slice(start, length)``, ``store(x)`` and ``load(layout)``: a numpy array per buffer, since the
interpreter runs each program alone, as Python).  Every call goes through ``triton.language`` at call time, where the
interpreter patches it.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl
from triton.runtime.interpreter import TensorHandle

from palimpsa.ops.triton.utils import interpreting

RECIPROCAL_ASM = "rcp.approx.ftz.f32 $0, $1;"


class _InterpretedSharedMemory:
    """A shared-memory buffer (or a view of one) under the interpreter: a float32 numpy array that ``store`` writes
    and ``load`` reads, with Gluon's ``index(i)`` (a view along the first dimension) and ``slice(start, length)``.
    Every program of the interpreter runs alone, so a buffer is that program's own memory, as on the GPU."""

    def __init__(self, data):
        self.data = data

    @property
    def shape(self):
        return list(self.data.shape)

    def index(self, i):
        return _InterpretedSharedMemory(self.data[_python_int(i)])

    def _reinterpret(self, dtype, shape, layout):
        return self

    reinterpret = _reinterpret

    def slice(self, start, length, dim=0):
        start, length = _python_int(start), _python_int(length)
        return _InterpretedSharedMemory(self.data.swapaxes(0, dim)[start:start + length].swapaxes(0, dim))

    def store(self, value):
        self.data[...] = np.broadcast_to(value.handle.data, self.data.shape)

    def load(self, layout=None):
        data = self.data.copy()
        if data.ndim == 0:
            return tl.core.tensor(TensorHandle(np.array(data), tl.float32), tl.float32)
        return tl.core.tensor(TensorHandle(data, tl.float32), tl.block_type(tl.float32, list(data.shape)))


def _python_int(i):
    """An index given as a Python int, a constexpr or an interpreted scalar tensor."""
    i = getattr(i, "value", i)
    if hasattr(i, "handle"):
        i = i.handle.data.item()
    return int(i)


class _InterpretedGluon:
    """The subset of ``triton.experimental.gluon.language`` used here, as plain Triton (layouts ignored)."""

    constexpr = tl.constexpr
    float32 = tl.float32
    int64 = tl.int64
    # layouts, registers' and shared memory's: the interpreter ignores them
    BlockedLayout = SliceLayout = SwizzledSharedLayout = staticmethod(lambda *args, **kwargs: None)

    @staticmethod
    def arange(start, end, layout=None):
        return tl.arange(start, end)

    @staticmethod
    def zeros(shape, dtype, layout=None):
        return tl.zeros(shape, dtype)

    @staticmethod
    def convert_layout(x, layout):
        return x

    @staticmethod
    def allocate_shared_memory(element_ty, shape, layout=None):
        if element_ty is not tl.float32:
            raise NotImplementedError(f"the interpreter shim's shared memory holds float32 only, got {element_ty}")
        return _InterpretedSharedMemory(np.zeros([_python_int(n) for n in shape], np.float32))

    @staticmethod
    def inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
        if asm != RECIPROCAL_ASM:
            raise NotImplementedError(f"the interpreter shim knows only {RECIPROCAL_ASM!r}, got {asm!r}")
        return 1.0 / args[0]

    def __getattr__(self, name):  # load, store, cast, expand_dims, sum, exp, minimum, cdiv, program_id, ...
        return getattr(tl, name)


if interpreting():
    gl = _InterpretedGluon()
    jit = triton.jit
else:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl  # noqa: F401 - re-exported

    jit = gluon.jit


def shared_memory_reinterpret_is_private() -> bool:
    """Whether this Triton's Gluon names the shared-memory view method ``_reinterpret`` (3.6) rather than
    ``reinterpret`` (3.7+); the interpreter shim has both."""
    if interpreting():
        return False
    from triton.experimental.gluon.language._core import shared_memory_descriptor

    return not hasattr(shared_memory_descriptor, "reinterpret")
