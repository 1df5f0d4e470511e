"""Where a training step's time goes, by component, from one step under the PyTorch profiler.

How a profiled operator is assigned a component (robust to any model built from ``nn.Module``\\ s):

1. Forward: every module gets a ``record_function`` range for the duration of its forward, named after its
   component (:func:`module_component`: class names with "MLP", "Conv", "Norm", ``nn.Linear`` projections,
   ``nn.Embedding``, the output head / loss modules, the token mixer itself, ``other`` for blocks).  The
   token-mixing op (functions named ``chunk_*``, ``fused_recurrent_*`` or ``naive_*`` in the layer modules of
   :data:`OP_MODULES`) gets an ``op`` range by wrapping those functions for the profiled step only (and
   :data:`CONV_FUNCTIONS` a ``convolutions`` range).  The
   optimizer step is one ``optimizer`` range.  An operator belongs to its innermost range, except that
   ``op``, ``mlp``, ``loss`` and ``optimizer`` ranges claim everything inside them (an MLP's projections
   count as MLP).  What runs in the model's own forward outside every sub-module (our chunked loss) counts as
   ``loss``; what runs in a mixer outside its sub-modules and op counts as ``gates``.
2. Backward: autograd records, for every backward node it evaluates, the sequence number of the forward
   operator that made it; the node's operators get that forward operator's component.
3. Time: per operator, its own device (CUDA kernel) time on a GPU, its own CPU time on a CPU.  Accumulating
   gradients and anything else unmatched is ``other``; kernels the profiler could not tie to an operator are
   reported as ``unattributed``.

Compiled blocks hide their modules from the profiler (their fused kernels land in ``other`` or
``unattributed``), so on a GPU the same step is also split by *kernel kind*, from kernel names alone
(:func:`kernel_kinds`): the op's kernels (those defined in ``palimpsa.ops.triton`` and ``fla.ops``), matrix
products, the fused kernels of ``torch.compile``, other element-wise and reduction kernels, the short
convolutions, the optimizer.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

COMPONENTS = ("op", "gates", "projections", "convolutions", "norms", "mlp", "embedding", "loss", "optimizer",
              "other")
ABSORBING = ("op", "mlp", "loss", "optimizer")  # these claim every operator inside them
PREFIX = "bench::"
#: modules whose ``chunk_*`` / ``fused_recurrent_*`` / ``naive_*`` functions are the token-mixing ops
OP_MODULES = ("palimpsa.layers.palimpsa", "palimpsa.layers.meta_mamba2", "palimpsa.layers.gated_deltanet",
              "fla.layers.gated_deltanet", "fla.ops.gated_delta_rule")
OP_PREFIXES = ("chunk_", "fused_recurrent_", "naive_")
CONV_FUNCTIONS = ("causal_depthwise_conv",)  # convolutions a layer calls as functions (Meta-Mamba2's)
MIXER_NAMES = ("mixer", "attn")  # attribute names of token mixers in our blocks and in fla's


def module_component(name: str, module: nn.Module, root: nn.Module) -> Optional[str]:
    """The component of a module's own work (outside its sub-modules)."""
    cls = type(module).__name__
    leaf = name.rsplit(".", 1)[-1]
    if module is root:
        return "loss~"  # the model's own forward outside its sub-modules: head and loss (not absorbing)
    if leaf == "lm_head" or "CrossEntropy" in cls or cls.endswith("Loss"):
        return "loss"
    if "MLP" in cls:
        return "mlp"
    if "Conv" in cls:
        return "convolutions"
    if "Norm" in cls:
        return "norms"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "projections"
    if leaf in MIXER_NAMES:
        return "gates"
    return "other"  # blocks, backbones: residual additions and the like


@contextlib.contextmanager
def component_ranges(model: nn.Module):
    """Forward hooks that open a ``bench::<component>`` range around each classified module's forward."""
    handles, stack = [], []

    def enter(name):
        def hook(module, args):
            rf = record_function(PREFIX + name)
            rf.__enter__()
            stack.append(rf)
        return hook

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        component = module_component(name, module, model)
        if component is not None:
            handles.append(module.register_forward_pre_hook(enter(component)))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while stack:
            stack.pop().__exit__(None, None, None)


def _wrap(fn: Callable, component: str) -> Callable:
    def wrapped(*args, **kwargs):
        with record_function(PREFIX + component):
            return fn(*args, **kwargs)
    wrapped.__wrapped__ = fn
    return wrapped


def _function_component(name: str) -> Optional[str]:
    if name.startswith(OP_PREFIXES):
        return "op"
    if name in CONV_FUNCTIONS:
        return "convolutions"
    return None


@contextlib.contextmanager
def function_ranges():
    """Wrap the token-mixing ops (and convolution functions) of :data:`OP_MODULES` that are imported in ranges."""
    patched = []
    for module_name in OP_MODULES:
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
        for attr, value in list(vars(module).items()):
            component = _function_component(attr)
            if component is not None and callable(value) and not isinstance(value, type):
                patched.append((module, attr, value))
                setattr(module, attr, _wrap(value, component))
    try:
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)


def _category(event) -> Optional[str]:
    """The component of a forward operator: its innermost range, unless an absorbing range encloses it."""
    chain, node = [], event  # range names, innermost first
    while node is not None:
        if node.name.startswith(PREFIX):
            chain.append(node.name[len(PREFIX):])
        node = node.cpu_parent
    for name in reversed(chain):  # outermost absorbing range first
        if name in ABSORBING:
            return name
    if not chain:
        return None
    return "loss" if chain[0] == "loss~" else chain[0]


def _backward_node(event):
    node = event
    while node is not None:
        if node.name.startswith("autograd::engine::evaluate_function"):
            return node
        node = node.cpu_parent
    return None


def _self_time_us(event, on_device: bool) -> float:
    if on_device:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.self_cpu_time_total)


def device_kernels(events) -> List[object]:
    """The CUDA kernels (and copies) among a profiler's ``events()``: not the ranges of ``record_function``, which
    the profiler also shows on the device's timeline (as user annotations, named like the range)."""
    return [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
            and not getattr(e, "is_user_annotation", False) and not e.name.startswith(PREFIX)]


def attribute(events, on_device: bool) -> Dict[str, float]:
    """Milliseconds per component (see the module docstring) from a profiler's ``events()``."""
    cpu_events = [e for e in events if str(getattr(e, "device_type", "CPU")).endswith("CPU")]
    forward_component: Dict[int, str] = {}
    categories: List[Optional[str]] = []
    for event in cpu_events:
        backward = _backward_node(event)
        if backward is None:
            category = _category(event)
            if category is not None and event.sequence_nr >= 0 and not event.name.startswith(PREFIX):
                forward_component[event.sequence_nr] = category  # the last one made the autograd node
            categories.append(category)
        else:
            categories.append(None)
    totals = {name: 0.0 for name in COMPONENTS}
    for event, category in zip(cpu_events, categories):
        if category is None:
            backward = _backward_node(event)
            if backward is not None:
                category = forward_component.get(backward.sequence_nr)
        totals[category if category in totals else "other"] += _self_time_us(event, on_device) / 1e3
    if on_device:
        kernels = sum(float(getattr(e, "device_time_total", 0.0)) for e in device_kernels(events))
        totals["unattributed"] = max(0.0, kernels / 1e3 - sum(totals.values()))
    return totals


KERNEL_KINDS = ("op", "matmul", "compiled", "elementwise", "convolution", "optimizer", "other")
_MATMUL_MARKS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")


def _is_kernel_wrapper(value) -> bool:
    """Whether ``value`` is Triton's autotuner or heuristics wrapper of a kernel, or a subclass of one (fla's
    ``CachedAutotuner``), by class name so that no Triton import is needed."""
    return any(cls.__name__ in ("Autotuner", "Heuristics") for cls in type(value).__mro__)


def op_kernel_names() -> frozenset:
    """Names of the kernels of the token-mixing ops: every jitted function in the imported modules of
    ``palimpsa.ops.triton`` and ``fla.ops`` (a kernel's profiler name is its function's name), and the CUDA C++
    kernels of ``palimpsa.ops.cuda``."""
    from palimpsa.ops.cuda import KERNEL_NAMES

    names = set(KERNEL_NAMES)
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("palimpsa.ops.triton", "fla.ops")):
            continue
        for attr, value in list(vars(module).items()):
            inner = value
            while _is_kernel_wrapper(inner):  # @triton.autotune / @triton.heuristics, or a subclass (fla's)
                inner = inner.fn
            # Triton's kernels, Gluon's (GluonJITFunction) and the interpreter's
            if type(inner).__name__ in ("JITFunction", "GluonJITFunction", "InterpretedFunction"):
                names.add(getattr(getattr(inner, "fn", None), "__name__", attr))
    return frozenset(names)


def kernel_kind(name: str, op_kernels: frozenset) -> str:
    """The kind of one CUDA kernel, from its name (see :data:`KERNEL_KINDS`)."""
    if name in op_kernels:
        return "op"
    lowered = name.lower()
    if name.startswith("triton_"):  # torch.compile's (inductor's) generated kernels
        return "compiled"
    if any(mark in lowered for mark in _MATMUL_MARKS):
        return "matmul"
    if "multi_tensor_apply" in lowered or "adam" in lowered:
        return "optimizer"
    if "conv" in lowered:
        return "convolution"
    if any(mark in lowered for mark in ("elementwise", "reduce_kernel", "copy", "catarray", "index", "softmax",
                                        "norm", "scatter", "gather", "fill")):
        return "elementwise"
    return "other"


def _launcher(event) -> str:
    """What launched a kernel, from the CPU operator ``event`` that holds it: its name, its parent's, and the
    shapes of its first two inputs when the profiler recorded them."""
    label = event.name
    parent = getattr(event, "cpu_parent", None)
    if parent is not None:
        label += f" < {parent.name}"
    shapes = [tuple(s) for s in (getattr(event, "input_shapes", None) or [])[:2] if s]
    return label + (f" {shapes}" if shapes else "")


def top_kernels(events, count: int = 12) -> List[List[object]]:
    """The ``count`` CUDA kernels of most device time in a profiler's ``events()``: ``[name, ms, calls, launcher]``,
    names cut to 90 characters; ``launcher``: the CPU operator that launched most of that kernel's time (see
    :func:`_launcher`), or "" when the profiler tied none to it."""
    totals: Dict[str, List[float]] = {}
    for event in device_kernels(events):
        entry = totals.setdefault(event.name[:90], [0.0, 0])
        entry[0] += _self_time_us(event, True) / 1e3
        entry[1] += 1
    launchers: Dict[str, Dict[str, float]] = {}
    for event in events:
        if str(getattr(event, "device_type", "CPU")).endswith("CPU"):
            kernels = getattr(event, "kernels", None) or []
            label = _launcher(event) if kernels else ""
            for kernel in kernels:
                by_op = launchers.setdefault(kernel.name[:90], {})
                by_op[label] = by_op.get(label, 0.0) + float(kernel.duration)
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [[name, round(ms, 3), calls, max(launchers[name], key=launchers[name].get) if launchers.get(name) else ""]
            for name, (ms, calls) in ranked]


def kernel_kinds(events, op_kernels: Optional[frozenset] = None) -> Dict[str, float]:
    """Milliseconds of device time per kernel kind from a profiler's ``events()`` (CUDA kernels only)."""
    op_kernels = op_kernel_names() if op_kernels is None else op_kernels
    totals = {kind: 0.0 for kind in KERNEL_KINDS}
    for event in device_kernels(events):
        totals[kernel_kind(event.name, op_kernels)] += _self_time_us(event, True) / 1e3
    return totals


def profile_step(model: nn.Module, step: Callable[[], None], device: torch.device,
                 ranges: bool = True) -> Dict[str, object]:
    """Run ``step()`` once under the profiler; return ``{"ms": {component: ms}, "total_ms": ...}`` (and on a GPU
    ``"kernels": {kind: ms}``, see :func:`kernel_kinds`, and ``"top_kernels"``, see :func:`top_kernels`).

    ``ranges``: put the component ranges in place (the "ms" split).  They change what ``torch.compile`` traces (a
    range inside a function that a compiled block checkpoints breaks the graph there, so that function runs
    eagerly: on an H200 such a profiled NotPalimpsa step took 348 ms of kernels against 289 ms for the whole
    timed step), so a compiled model is profiled without them (``ranges=False``: "ms" is None, the step is
    split by kernel kind only).  With ranges, ``step`` runs once with them in place before the profiled run, so
    that a recompilation (with inductor's first-run tuning of its kernels) does not land in the profiled step.
    ``step`` must call the optimizer inside ``record_function("bench::optimizer")`` (see :func:`optimizer_range`).
    """
    activities = [ProfilerActivity.CPU]
    on_device = device.type == "cuda"
    if on_device:
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with contextlib.ExitStack() as stack:
        if ranges:
            stack.enter_context(component_ranges(model))
            stack.enter_context(function_ranges())
            step()
            if on_device:
                torch.cuda.synchronize(device)
        with profile(activities=activities, record_shapes=True) as prof:
            step()
            if on_device:
                torch.cuda.synchronize(device)
    events = prof.events()
    result = summarize_step(events, on_device)
    if ranges:
        ms = attribute(events, on_device)
        result.update(ms=ms, total_ms=sum(ms.values()))
    return result


def summarize_step(events, on_device: bool) -> Dict[str, object]:
    """A profiled step without component ranges: ``{"ms": None, "total_ms", "clock"}``, and on a GPU its kernels
    by kind (:func:`kernel_kinds`) and the top kernels (:func:`top_kernels`).  ``events``: ``prof.events()``."""
    total = sum(_self_time_us(e, on_device) for e in (device_kernels(events) if on_device else events))
    result = {"ms": None, "total_ms": total / 1e3, "clock": "device (CUDA kernels)" if on_device else "CPU"}
    if on_device:
        result["kernels"] = kernel_kinds(events)
        result["top_kernels"] = top_kernels(events)
    return result


def optimizer_range():
    """The range :func:`attribute` counts as ``optimizer``."""
    return record_function(PREFIX + "optimizer")
