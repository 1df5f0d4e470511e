"""Compile the Palimpsa Triton kernels for Hopper (sm_90) without a GPU and report their resources.

    python -m palimpsa.bench.sass [--shape 760M-like] [--fwd-block-v 32] [--bwd-num-warps 4] [--gluon [--fwd-inputs auto|on|off]]

Triton's wheel ships ptxas and cuobjdump, so the kernels compile on any Linux machine; this prints, per
kernel, the registers, spill stack, shared memory and a count of the SASS instructions that matter for these
kernels (FP32 pipe, MUFU reciprocals and exponentials, shuffles and barriers of reductions, loads and stores), and
the occupancy its registers and shared memory allow.  --gluon adds the Gluon kernels of the per-channel op (output kernel, local
adjoints, reverse sweep; laid out and scheduled by ``config.sweep_tuning``), which run by default on an sm_90 GPU at
K = 48, 64, 96 or 128.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess
import tempfile
from typing import Dict, Optional

KEY_OPS = ("FFMA", "FMUL", "FADD", "MUFU", "SHFL", "BAR", "LDS", "STS", "LDG", "STG", "REDG", "HMMA", "HGMMA",
           "LDL", "STL", "IMAD")


def _tool(name: str) -> str:
    import triton

    paths = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    if not paths:
        raise FileNotFoundError(f"{name} not found in the triton wheel")
    return paths[0]


REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64  # Hopper
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024  # Hopper: shared memory per SM, of which each resident block also takes
SHARED_RESERVED_PER_BLOCK = 1024  # this much for the system


def occupancy(registers: int, num_warps: int, shared: int = 0) -> float:
    """Resident warps per SM over the maximum, as registers (allocated per warp in units of 256), shared memory
    (``shared`` bytes a block, plus the 1 kB the system reserves for each) and the limit of 32 resident blocks
    allow."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(REGISTERS_PER_SM // (per_warp * num_warps), MAX_BLOCKS_PER_SM)
    if shared:
        blocks = min(blocks, SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK))
    return min(blocks * num_warps, MAX_WARPS_PER_SM) / MAX_WARPS_PER_SM


def resource_report(compiled, num_warps: int, name: str) -> Dict[str, object]:
    """Registers, stack bytes (spills), shared memory bytes, occupancy (registers and shared memory) and SASS
    instruction counts of a kernel Triton compiled."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            ops[match.group(1)] += 1
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    shared = int(compiled.metadata.shared)
    return {"kernel": name, "num_warps": num_warps, "registers": registers,
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)), "shared": shared,
            "occupancy": occupancy(registers, num_warps, shared),
            "ops": {k: ops[k] for k in KEY_OPS if ops[k]}}


def compile_report(fn, args: Dict[str, object], num_warps: int, name: str, constexprs: Optional[Dict] = None,
                   num_stages: Optional[int] = None) -> Dict[str, object]:
    """Compile ``fn`` for sm_90. ``args`` maps every argument to a type string ('*bf16', 'i32', ...) or a
    constexpr value; ``constexprs`` gives constexpr values of arguments named in ``args`` (overriding their
    entries: for constexprs that are strings themselves, such as a product precision).
    Returns :func:`resource_report`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {**{a: v for a, v in args.items() if not isinstance(v, str)}, **(constexprs or {})}
    signature = {a: ("constexpr" if a in constexprs else v) for a, v in args.items()}  # the arguments' order
    options = {"num_warps": num_warps, **({} if num_stages is None else {"num_stages": num_stages})}
    compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    return resource_report(compiled, num_warps, name)


def gluon_reports(shape, sweep_warps: int):
    """:func:`resource_report` of the Gluon output kernel, local-adjoint pass and reverse sweep at ``shape``, laid
    out and scheduled as the op runs them at this key size (config.output_columns, config.output_inputs,
    config.sweep_tuning)."""
    from palimpsa.ops.triton import chunk_bwd_gluon, chunk_fwd_gluon
    from palimpsa.ops.triton.config import output_columns, output_inputs, sweep_tuning

    K, V = shape.K, shape.V
    tune = sweep_tuning(K)
    yield resource_report(chunk_fwd_gluon.compile_sm(K, V, cols=output_columns(K), inputs=output_inputs(K)),
                          chunk_fwd_gluon.gluon_warps(V), "gluon_output")
    yield resource_report(chunk_bwd_gluon.compile_sm(K, V, tune.lanes_k, kernel="local", cols=tune.cols), 1,
                          "gluon_local_adjoint")
    sweep = chunk_bwd_gluon.compile_sm(K, V, tune.lanes_k, warps=sweep_warps, stage=tune.stage, maxnreg=tune.maxnreg,
                                       unroll=tune.unroll, cols=tune.cols, inputs=tune.inputs)
    yield resource_report(sweep, sweep_warps, "gluon_sweep")


def kernel_args(shape, fwd_block_v: int, bwd_block_v: int) -> Dict[str, Dict[str, object]]:
    """Arguments of the main kernels for a benchmark shape (bf16 inputs, no optional outputs)."""
    from palimpsa.ops.triton.config import state_tuning
    from palimpsa.ops.triton.utils import k_parts, v_block

    H, K, V = shape.H, shape.K, shape.V
    KA, KB = k_parts(K)
    states = state_tuning(K, V)
    dt = "*bf16"
    common = dict(q=dt, k=dt, v=dt, g="*fp32", beta=dt, prior="*fp32", cu_seqlens=None, scale="fp32", T="i32",
                  H=H, K=K, V=V)
    f32 = "*fp32"
    return {
        "chunk_states": dict(k=dt, v=dt, g="*fp32", beta=dt, prior=f32, mu0=f32, imp0=f32, h_mean=f32, h_imp=f32,
                             final_mu=f32, final_imp=f32, cu_seqlens=None, chunk_offsets=None, T="i32", H=H, K=K,
                             V=V, C=64, BK=states.block_k, BV=states.block_v, HAS_INIT=False, STORE_STATES=True,
                             STORE_FINAL=False, IS_VARLEN=False, DOT_BF16=True),
        "chunk_fwd": dict(common, h_mean=f32, h_imp=f32, mu0=f32, imp0=f32, o=dt, var=dt, final_mu=f32,
                          final_imp=f32, chunk_indices=None, chunk_offsets=None, C=64, KA=KA, KB=KB,
                          BV=v_block(V, fwd_block_v), RECURRENT=False, HAS_INIT=False, STORE_FINAL=False,
                          HAS_VAR=False, IS_VARLEN=False, FAST=True),
        "unit_local_adjoint": dict(common, h_mean=f32, h_imp=f32, adj_mean=f32, adj_imp=f32, unit_decay=f32,
                                   do=dt, dvar=dt, unit_indices=None, unit_offsets=None, chunk_offsets=None, C=32,
                                   U=4, KA=KA, KB=KB, BV=v_block(V, bwd_block_v), HAS_DVAR=False, IS_VARLEN=False,
                                   FAST=True),
        "unit_bwd": dict(common, h_mean=f32, h_imp=f32, adj_mean=f32, adj_imp=f32, mu0=f32, imp0=f32, do=dt,
                         dvar=dt, dq=f32, dk=f32, dv=dt, dbeta=dt, dg_part=f32, dprior=f32, dmu0=f32, dimp0=f32,
                         unit_indices=None, unit_offsets=None, chunk_offsets=None, NTOK="i32", C=32, U=4, KA=KA,
                         KB=KB, BV=v_block(V, bwd_block_v), HAS_INIT=False, HAS_DVAR=False, IS_VARLEN=False,
                         FAST=True),
    }


def main(argv=None) -> int:
    from palimpsa.bench.ops import BENCH_SHAPES, shape_by_name
    from palimpsa.ops.triton import chunk_bwd, chunk_fwd, chunk_state
    from palimpsa.ops.triton.config import CONFIG, kernel_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="all")
    parser.add_argument("--fwd-block-v", type=int, default=CONFIG.fwd_block_v)
    parser.add_argument("--fwd-num-warps", type=int, default=CONFIG.fwd_num_warps)
    parser.add_argument("--bwd-block-v", type=int, default=CONFIG.bwd_block_v)
    parser.add_argument("--bwd-num-warps", type=int, default=CONFIG.bwd_num_warps or 4)
    parser.add_argument("--gluon", action="store_true", help="add the Gluon kernels of the per-channel op")
    parser.add_argument("--fwd-inputs", choices=("auto", "on", "off"), default="auto",
                        help="with --gluon: the output kernel with its q and k rows staged in shared memory (on), "
                             "not (off), or as the op runs it at this key size (auto, config.output_inputs)")
    args = parser.parse_args(argv)
    kernels = {"chunk_states": (chunk_state.chunk_states_kernel, 4),
               "chunk_fwd": (chunk_fwd.chunk_fwd_kernel, args.fwd_num_warps),
               "unit_local_adjoint": (chunk_bwd.unit_local_adjoint_kernel, args.bwd_num_warps),
               "unit_bwd": (chunk_bwd.unit_bwd_kernel, args.bwd_num_warps)}
    shapes = BENCH_SHAPES if args.shape == "all" else (shape_by_name(args.shape),)
    for shape in shapes:
        reports = [compile_report(kernels[name][0], kernel_arguments, kernels[name][1], name)
                   for name, kernel_arguments in kernel_args(shape, args.fwd_block_v, args.bwd_block_v).items()]
        if args.gluon:
            staged = {"auto": CONFIG.fwd_inputs, "on": True, "off": False}[args.fwd_inputs]
            with kernel_config(fwd_inputs=staged):
                reports += list(gluon_reports(shape, CONFIG.bwd_warps))
        for rep in reports:
            ops = " ".join(f"{k}={v}" for k, v in rep["ops"].items())
            print(f"{shape.name:10s} {rep['kernel']:19s} warps={rep['num_warps']} regs={rep['registers']:3d} "
                  f"stack={rep['stack']:4d} smem={rep['shared'] / 1024:5.1f}kB occupancy={rep['occupancy']:.0%} | {ops}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
