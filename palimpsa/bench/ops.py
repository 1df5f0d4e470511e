"""Kernel speed of the Palimpsa op on a GPU (benchmarks.md section 1).

For each shape: our forward, forward+backward and peak memory; the same for fla's ``chunk_simple_gla``
(Mamba2's kernel: the cost of no metaplasticity) and ``chunk_gated_delta_rule`` when fla is installed;
the per-channel op's floors (:meth:`Shape.floor_ms`: the reciprocal and FP32 issue bounds of an H100/H200) and
our ratios to them;
and one decoding step of a 760M-like layer at B = 1.

Timings are ``triton.testing.do_bench`` medians of the op on prepared inputs (input validation, which
scans the inputs on the host side, is not timed).  Inputs are bf16, states float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

from palimpsa.bench.fla_compat import TIMING_ONLY_NOTE, fla_available, hopper_check_bypassed

# Issue rates of an H100 SXM / H200 (132 SMs at 1.98 GHz): per SM and clock, 128 FP32 lanes (an FMA is one
# instruction) and 16 MUFU lanes (reciprocal, exp).
SMS, CLOCK_HZ, FP32_LANES, MUFU_LANES = 132, 1.98e9, 128, 16
# Work per state element and token of the exact per-channel op: one reciprocal (1 / I) and about 5-6 FP32
# instructions forward; one reciprocal and about 16-18 FP32 instructions for an ideal backward (one reverse
# element-wise sweep per chunk, the carries between chunks on tensor cores).
FLOOR_WORK = {"fwd": (1, 6), "bwd": (1, 17)}  # (reciprocals, FP32 instructions)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark shape: batch B, tokens T, heads H, key size K, value size V."""

    name: str
    B: int
    T: int
    H: int
    K: int
    V: int

    @property
    def elements(self) -> int:
        """State elements touched per token, summed over the batch: B * T * H * K * V."""
        return self.B * self.T * self.H * self.K * self.V

    def floor_ms(self, part: str = "fwd") -> float:
        """Lower bound of the per-channel op's ``part`` ("fwd", "bwd" or "fwd_bwd") in ms: per pass the larger of
        its reciprocal (MUFU) and FP32 issue times (:data:`FLOOR_WORK`)."""
        if part == "fwd_bwd":
            return self.floor_ms("fwd") + self.floor_ms("bwd")
        reciprocals, fp32 = FLOOR_WORK[part]
        per_clock = SMS * CLOCK_HZ
        return 1e3 * self.elements * max(reciprocals / (MUFU_LANES * per_clock), fp32 / (FP32_LANES * per_clock))


BENCH_SHAPES = (
    Shape("170M-like", 8, 2048, 16, 48, 48),
    Shape("760M-like", 4, 4096, 16, 96, 192),
    Shape("d64", 8, 2048, 16, 64, 64),
    Shape("d128", 4, 4096, 8, 128, 128),
)

TARGETS_MS = {"170M-like": (0.5, 2.0), "760M-like": (2.0, 8.0)}
DECODE_TARGET_US = 30.0


def shape_by_name(name: str) -> Shape:
    for shape in BENCH_SHAPES:
        if shape.name == name:
            return shape
    raise ValueError(f"unknown shape {name!r}; choose from {[s.name for s in BENCH_SHAPES]}")


def make_inputs(shape: Shape, dtype: torch.dtype, device, seed: int = 0, T: Optional[int] = None,
                H: Optional[int] = None, B: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Random inputs like the Palimpsa layer's: unit-norm q, k; log decays from dt * A; beta in (0, 1).

    q, k [B, T, H, K]; v, beta [B, T, H, V]; g [B, T, H] (float32, as the layer computes it).
    """
    B = shape.B if B is None else B
    T = shape.T if T is None else T
    H = shape.H if H is None else H
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size):
        return torch.rand(*size, generator=gen)

    def randn(*size):
        return torch.randn(*size, generator=gen)

    q = torch.nn.functional.normalize(randn(B, T, H, shape.K), dim=-1)
    k = torch.nn.functional.normalize(randn(B, T, H, shape.K), dim=-1)
    v = randn(B, T, H, shape.V)
    # dt in [1e-3, 0.1] (log-uniform) times A in [1, 16]: per-token decays from 0.9999 to 0.2
    dt = torch.exp(rand(B, T, H) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3)))
    A = 1.0 + 15.0 * rand(H)
    g = -(dt * A)
    beta = rand(B, T, H, shape.V) * dt[..., None]
    out = dict(q=q, k=k, v=v, g=g, beta=beta)
    return {name: x.to(device=device, dtype=torch.float32 if name == "g" else dtype) for name, x in out.items()}


def _bench(fn: Callable[[], object], grad_to_none=None) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _peak_mb(fn: Callable[[], object]) -> float:
    """Peak memory allocated by ``fn`` beyond what was allocated before it, in MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def _measure(forward: Callable[..., torch.Tensor], inputs: Dict[str, torch.Tensor], grad_names) -> Dict[str, float]:
    """fwd ms, fwd+bwd ms, peak MB of one fwd+bwd, for ``forward(**inputs) -> o``."""
    leaves = {n: (x.detach().clone().requires_grad_(n in grad_names)) for n, x in inputs.items()}
    do = torch.randn_like(forward(**leaves).detach())

    def fwd():
        with torch.no_grad():
            return forward(**leaves)

    def fwd_bwd():
        forward(**leaves).backward(do)

    grads = [x for x in leaves.values() if x.requires_grad]
    result = {"fwd_ms": _bench(fwd), "fwd_bwd_ms": _bench(fwd_bwd, grad_to_none=grads)}
    for x in grads:
        x.grad = None
    result["peak_mb"] = _peak_mb(fwd_bwd)
    if do.is_cuda:
        result["fwd_bwd_device_ms"] = _device_ms(fwd_bwd, grads)
        result["fwd_bwd_host_ms"] = host_ms(fwd_bwd, grads)
    return result


def host_ms(fn: Callable[[], object], grads=(), iters: int = 20) -> float:
    """The host's time to issue one ``fn()`` (Python, autograd, launches), in ms: ``iters`` calls back to back
    with no synchronise, timed until the last is issued (mean).  While the GPU's queue has room the host never
    waits on it, so where this exceeds the kernels' device time the wall time is the host's."""
    def call():
        fn()
        for x in grads:
            x.grad = None

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    return 1e3 * (issued - start) / iters


def _device_ms(fn: Callable[[], object], grads, repeats: int = 5) -> float:
    """Kernel time of one ``fn()`` on the GPU, in ms: the sum of its CUDA kernels' durations under the PyTorch
    profiler (mean of ``repeats``).  Unlike the do_bench wall time it leaves out the host's Python and launch
    time, which at small shapes is longer than the kernels themselves."""
    from torch.profiler import ProfilerActivity, profile

    from palimpsa.bench.breakdown import device_kernels

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # as gpu_profile_ops.py
        for _ in range(repeats):
            fn()
            for x in grads:
                x.grad = None
        torch.cuda.synchronize()
    return sum(float(getattr(e, "device_time_total", 0.0)) for e in device_kernels(prof.events())) / 1e3 / repeats


def palimpsa_forward(q, k, v, g, beta):
    """Our chunked op on prepared inputs (what a compiled layer runs): o [B, T, H, V]."""
    from palimpsa.ops.checks import prepare_inputs
    from palimpsa.ops.triton import chunk_palimpsa_triton

    x = prepare_inputs(q, k, v, g, beta, 1.0, None, None, None, check_values=False)
    return chunk_palimpsa_triton(x, False, False)[0]


def grouped_forward(q, k, v, g, beta):
    """The grouped (GLA-shaped) path on prepared inputs: beta [B, T, H, G] with G < V, or None."""
    from palimpsa.ops.checks import prepare_inputs
    from palimpsa.ops.grouped import grouped_palimpsa

    x = prepare_inputs(q, k, v, g, beta, 1.0, None, None, None, check_values=False)
    return grouped_palimpsa(x, False, False, None, use_triton=True)[0]


def g1_inputs(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inputs with one importance gate per head and token (beta [B, T, H, 1]), made before timing: the
    G = 1 layer's projection gives that shape, so slicing it inside the timed call would add a copy forward and
    a [B, T, H, V] zero fill backward that the layer never runs."""
    return {**inputs, "beta": inputs["beta"][..., :1].contiguous()}


def _not_palimpsa(q, k, v, g, beta):
    return grouped_forward(q, k, v, g, None)


def _fla_simple_gla(q, k, v, g, beta):
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g)[0]


def _fla_gated_delta_rule(q, k, v, g, beta):
    """fla's gated delta rule with beta [B, T, H] (see :func:`gdn_inputs`)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, g, beta)[0]


def gdn_inputs(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inputs with the delta rule's scalar beta per head and token [B, T, H], made before timing."""
    return {**inputs, "beta": inputs["beta"][..., 0].contiguous()}


def _try_measure(forward, inputs, grad_names) -> Dict[str, object]:
    """Measure, or record why the kernel did not run (fla's backward refuses some triton/GPU pairs)."""
    out: Dict[str, object] = {}
    try:
        leaves = {n: x.detach() for n, x in inputs.items()}
        with torch.no_grad():
            forward(**leaves)
        out["fwd_ms"] = _bench(lambda: forward(**leaves))
    except Exception as err:  # noqa: BLE001 - report any failure of an optional baseline
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    try:
        out.update(_measure(forward, inputs, grad_names))
    except Exception as err:  # noqa: BLE001
        out["bwd_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return out


FLA_KERNELS = ("simple_gla", "gated_delta_rule")


def bench_shape(shape: Shape, with_fla: bool = True, device="cuda", grouped: bool = True,
                fla_bypass_check: bool = False, fla_kernels=FLA_KERNELS) -> Dict[str, object]:
    """All timings of one shape (bf16 inputs).

    ``grouped``: also time grouped importance with G = 1 and no metaplasticity (the GLA-shaped path).
    ``fla_bypass_check``: time fla's backward with its Hopper check bypassed (timing only, marked).
    ``fla_kernels``: which of fla's kernels (:data:`FLA_KERNELS`) to time beside ours.
    """
    unknown = sorted(set(fla_kernels) - set(FLA_KERNELS))
    if unknown:
        raise ValueError(f"fla_kernels: unknown {unknown}; expected some of {list(FLA_KERNELS)}")
    inputs = make_inputs(shape, torch.bfloat16, device)
    grad_names = ("q", "k", "v", "g", "beta")
    row: Dict[str, object] = {"shape": dataclasses.asdict(shape), "floor_ms": shape.floor_ms("fwd"),
                              "floor_fwd_bwd_ms": shape.floor_ms("fwd_bwd")}
    row["ours"] = _measure(palimpsa_forward, inputs, grad_names)
    row["ours"]["fwd_over_floor"] = row["ours"]["fwd_ms"] / row["floor_ms"]
    row["ours"]["fwd_bwd_over_floor"] = row["ours"]["fwd_bwd_ms"] / row["floor_fwd_bwd_ms"]
    if grouped:
        row["grouped_g1"] = _measure(grouped_forward, g1_inputs(inputs), grad_names)
        row["not_palimpsa"] = _measure(_not_palimpsa, inputs, ("q", "k", "v", "g"))
    if with_fla and fla_available():
        with hopper_check_bypassed(fla_bypass_check) as bypassed:
            if "simple_gla" in fla_kernels:
                row["fla_chunk_simple_gla"] = _try_measure(_fla_simple_gla, inputs, ("q", "k", "v", "g"))
            if "gated_delta_rule" in fla_kernels:
                row["fla_chunk_gated_delta_rule"] = _try_measure(_fla_gated_delta_rule, gdn_inputs(inputs),
                                                                 ("q", "k", "v", "g", "beta"))
        if bypassed:
            for name in ("fla_chunk_simple_gla", "fla_chunk_gated_delta_rule"):
                if name in row:
                    row[name]["note"] = TIMING_ONLY_NOTE
    return row


def bench_decode_step(device="cuda") -> Dict[str, float]:
    """One decoding step of a 760M-like layer (B = 1, H = 16, K = 96, V = 192), state updated in place.

    ``call_us``: the public ``palimpsa_step`` called back to back (includes Python and launch overhead);
    ``graph_us``: the same step replayed from a CUDA graph (the GPU time).
    """
    from palimpsa.ops import palimpsa_step

    shape = shape_by_name("760M-like")
    x = make_inputs(shape, torch.bfloat16, device, B=1, T=1)
    q, k, v, g, beta = (x[n][:, 0] for n in ("q", "k", "v", "g", "beta"))
    mu = torch.zeros(1, shape.H, shape.K, shape.V, device=device)
    imp = torch.ones_like(mu)

    def step():
        return palimpsa_step(q, k, v, g, beta, (mu, imp), prior=1.0, backend="triton", check_values=False)

    step()
    call_ms = _bench(step)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph_ms = _bench(graph.replay)
    return {"call_us": call_ms * 1e3, "graph_us": graph_ms * 1e3}


def environment() -> Dict[str, str]:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "installed")
    except Exception:
        info["fla"] = "not installed"
    return info


def run_benchmark(shapes=BENCH_SHAPES, with_fla: bool = True, decode: bool = True, grouped: bool = True,
                  fla_bypass_check: bool = False, fla_kernels=FLA_KERNELS) -> Dict[str, object]:
    rows: List[Dict[str, object]] = [bench_shape(shape, with_fla, grouped=grouped, fla_bypass_check=fla_bypass_check,
                                                 fla_kernels=fla_kernels)
                                     for shape in shapes]
    result: Dict[str, object] = {"environment": environment(), "rows": rows}
    if decode:
        result["decode_step"] = bench_decode_step()
    return result


def _cell(entry: Optional[Dict[str, object]], key: str, fmt: str = "{:.3f}") -> str:
    if entry is None:
        return "n/a"
    if "error" in entry:
        return "failed"
    if key not in entry:
        return "refused" if "bwd_error" in entry and key != "fwd_ms" else "n/a"
    return fmt.format(entry[key])


def _floor_cell(row: Dict[str, object], ours: Dict[str, float]) -> str:
    if "floor_fwd_bwd_ms" not in row:  # results written before the backward floor was recorded
        return "n/a | n/a"
    return f"{row['floor_fwd_bwd_ms']:.3f} | {ours['fwd_bwd_over_floor']:.1f}x"


def _ratio(ours: Dict[str, object], theirs: Optional[Dict[str, object]], key: str) -> str:
    if not theirs or key not in theirs or key not in ours:
        return "n/a"
    return f"{ours[key] / theirs[key]:.2f}x"


def format_table(result: Dict[str, object]) -> str:
    """Markdown table of a ``run_benchmark`` result."""
    env = result["environment"]
    lines = [f"Device: {env.get('device', 'n/a')}; torch {env['torch']}, triton {env['triton']}, fla {env['fla']}. "
             "Milliseconds (do_bench medians), bf16 inputs, float32 states; peak = extra memory of one fwd+bwd.",
             "",
             "Floors: the per-channel op's reciprocal and FP32 issue bounds on an H100/H200 (palimpsa/bench/ops.py).",
             "",
             "| shape | ours fwd | ours fwd+bwd | ours peak MB | floor fwd | fwd / floor | floor fwd+bwd | "
             "fwd+bwd / floor | simple_gla fwd | simple_gla fwd+bwd | simple_gla peak MB | GDN fwd | GDN fwd+bwd | "
             "GDN peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ours = row["ours"]
        sgla = row.get("fla_chunk_simple_gla")
        gdn = row.get("fla_chunk_gated_delta_rule")
        lines.append(
            f"| {row['shape']['name']} | {ours['fwd_ms']:.3f} | {ours['fwd_bwd_ms']:.3f} | {ours['peak_mb']:.0f} | "
            f"{row['floor_ms']:.3f} | {ours['fwd_over_floor']:.1f}x | {_floor_cell(row, ours)} | "
            f"{_cell(sgla, 'fwd_ms')} | "
            f"{_cell(sgla, 'fwd_bwd_ms')} | {_cell(sgla, 'peak_mb', '{:.0f}')} | {_cell(gdn, 'fwd_ms')} | "
            f"{_cell(gdn, 'fwd_bwd_ms')} | {_cell(gdn, 'peak_mb', '{:.0f}')} |")
    notes = []
    for row in result["rows"]:
        for name in ("fla_chunk_simple_gla", "fla_chunk_gated_delta_rule"):
            entry = row.get(name) or {}
            for key in ("error", "bwd_error"):
                if key in entry:
                    notes.append(f"- {row['shape']['name']} {name} {key.replace('_', ' ')}: {entry[key]}")
    if any("grouped_g1" in row for row in result["rows"]):
        lines += ["", "Grouped importance (G = 1, one importance gate per head and token) and no metaplasticity "
                      "(NotPalimpsa), both exact, on the GLA-shaped path; fla's chunk_simple_gla beside them:",
                  "", "| shape | G=1 fwd | G=1 fwd+bwd | G=1 peak MB | NotPalimpsa fwd | NotPalimpsa fwd+bwd | "
                      "simple_gla fwd | simple_gla fwd+bwd | G=1 / simple_gla fwd+bwd | device: G=1 fwd+bwd | "
                      "device: NotPalimpsa | device: simple_gla | device: G=1 / simple_gla | host: G=1 | "
                      "host: NotPalimpsa | host: simple_gla |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            g1, notp, sgla = row["grouped_g1"], row["not_palimpsa"], row.get("fla_chunk_simple_gla")
            lines.append(
                f"| {row['shape']['name']} | {g1['fwd_ms']:.3f} | {g1['fwd_bwd_ms']:.3f} | {g1['peak_mb']:.0f} | "
                f"{notp['fwd_ms']:.3f} | {notp['fwd_bwd_ms']:.3f} | {_cell(sgla, 'fwd_ms')} | "
                f"{_cell(sgla, 'fwd_bwd_ms')} | {_ratio(g1, sgla, 'fwd_bwd_ms')} | "
                f"{_cell(g1, 'fwd_bwd_device_ms')} | {_cell(notp, 'fwd_bwd_device_ms')} | "
                f"{_cell(sgla, 'fwd_bwd_device_ms')} | {_ratio(g1, sgla, 'fwd_bwd_device_ms')} | "
                f"{_cell(g1, 'fwd_bwd_host_ms')} | {_cell(notp, 'fwd_bwd_host_ms')} | "
                f"{_cell(sgla, 'fwd_bwd_host_ms')} |")
        lines += ["", "device: the kernels' own time (PyTorch profiler, mean of 5), without the host's Python and "
                      "launches. host: the host's time to issue one fwd+bwd (mean of 20, no synchronise); where it "
                      "exceeds the device time, the do_bench wall time is the host's."]
    if any((row.get("fla_chunk_simple_gla") or {}).get("note") for row in result["rows"]):
        lines += ["", f"fla backward numbers: {TIMING_ONLY_NOTE}."]
    if "decode_step" in result:
        d = result["decode_step"]
        lines += ["", f"Decoding step, 760M-like layer, B=1: {d['call_us']:.1f} us per call "
                      f"(Python and launch included), {d['graph_us']:.1f} us replayed from a CUDA graph."]
    if notes:
        lines += ["", "fla notes (deduplicated):"] + sorted(set(notes))
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def save_result(result: Dict[str, object], markdown_path: str) -> None:
    """The table as markdown and the raw numbers as JSON beside it (same name, .json)."""
    write_atomic(markdown_path, format_table(result))
    write_atomic(os.path.splitext(markdown_path)[0] + ".json", json.dumps(result, indent=2) + "\n")
