"""Gluon on the GPU, plain Triton under the CPU interpreter: one kernel source, checked on the CPU.

Gluon (``triton.experimental.gluon``) lets a kernel state its register layouts, but it has no CPU interpreter.
A kernel written against this module's ``gl`` and ``jit`` compiles as Gluon on a GPU and, under
``TRITON_INTERPRET=1``, runs as an ordinary interpreted Triton kernel whose layouts are ignored: the same source
is then tested against the float64 reference in the CPU test suite, and on a GPU only its speed depends on
the layouts.

The interpreter half covers what the project's Gluon kernels use: layouts (ignored), ``arange``, ``zeros``,
``load``, ``store``, ``cast``, ``expand_dims``, ``sum``, ``exp``, ``minimum``, ``cdiv``, ``program_id``,
``convert_layout`` (the identity) and ``inline_asm_elementwise`` for the one instruction used,
``rcp.approx.ftz.f32`` (computed as 1 / x), and shared memory that a thread reads back as it wrote it
(``allocate_shared_memory(...).index(i).store(x)`` / ``.load(layout)``: a Python list of tensors, since the
interpreter runs each program as Python).  Every call goes through ``triton.language`` at call time, where the
interpreter patches it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from palimpsa.ops.triton.utils import interpreting

RECIPROCAL_ASM = "rcp.approx.ftz.f32 $0, $1;"


class _InterpretedSharedSlot:
    """One slot of an interpreted shared-memory buffer: holds the last tensor stored."""

    def __init__(self, buffer, i):
        self.buffer, self.i = buffer, i

    def store(self, value):
        self.buffer[self.i] = value

    def load(self, layout=None):
        return self.buffer[self.i]


class _InterpretedSharedMemory:
    """``allocate_shared_memory(dtype, [slots, ...], layout)`` under the interpreter: slots indexed by ``index``."""

    def __init__(self, slots):
        self.slots = [None] * slots

    def index(self, i):
        if hasattr(i, "handle"):  # an interpreted scalar tensor
            i = i.handle.data.item()
        return _InterpretedSharedSlot(self.slots, int(i))


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
        return _InterpretedSharedMemory(int(shape[0]))

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
