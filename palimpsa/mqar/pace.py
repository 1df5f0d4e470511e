"""How long one MQAR training step takes, alone on a device, and where its device time goes.

    python -m palimpsa.mqar.pace --models palimpsa palimpsa_g1 --head-k-dim 16 --head-v-dim 32 --out pace.md

For every model: the step (forward, loss, backward, fused AdamW under the run's autocast) is timed end to end
with a device synchronisation per step (median of ``--steps``), eager and, with ``--compile``, with the blocks
through ``torch.compile``; then one profiled window of eager steps lists the kernels that take the most device
time, so that a slow step can be traced to its cause.  The data are the run's own (an MQAR training split of
``--num-train`` examples).  Markdown goes to stdout and, with ``--out``, to a file written as it goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from palimpsa.layers.modules import compiled_blocks
from palimpsa.mqar.data import make_splits
from palimpsa.mqar.models import MQARModel
from palimpsa.mqar.train import RunConfig, _batch, _synchronize, _training_step, query_index
from palimpsa.train.optim import build_optimizer


def _run_setup(config: RunConfig, device: torch.device):
    """A run's model, fused AdamW (on CUDA) and training data on ``device``, as ``train_run`` builds them:
    (model, optimizer, (inputs, labels, query positions))."""
    splits = make_splits(config.vocab_size, config.seq_len, config.num_kv_pairs, config.num_train, 8, 8,
                         config.seed, config.power_a)
    torch.manual_seed(config.seed)
    model = MQARModel(config.model_config()).to(device)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, betas=(0.9, 0.95), fused=device.type == "cuda")
    train_x, train_y = (t.to(device) for t in splits.train)
    return model, optimizer, (train_x, train_y, query_index(train_y))


def time_steps(config: RunConfig, device: torch.device, steps: int, warmup: int, compile_blocks: bool) -> dict:
    """Seconds per training step of ``config``'s model: {"median", "min", "max", "first"} (first = the first
    warm-up step, compilation included)."""
    model, optimizer, train = _run_setup(config, device)
    gen = torch.Generator().manual_seed(0)
    times = []
    with compiled_blocks(compile_blocks):
        for i in range(warmup + steps):
            idx = torch.randint(0, config.num_train, (config.batch_size,), generator=gen).to(device)
            batch = _batch(*train, idx)
            _synchronize(device)
            started = time.perf_counter()
            _training_step(model, optimizer, batch, config.lr, config.amp, device, check_finite=False)
            _synchronize(device)
            times.append(time.perf_counter() - started)
    timed = times[warmup:]
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "first": times[0]}


def profile_steps(config: RunConfig, device: torch.device, steps: int, top: int) -> tuple[float, list[tuple]]:
    """(device seconds per step, [(kernel, device ms per step, calls per step)] of the ``top`` dearest kernels) of
    eager steps on ``device`` (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, train = _run_setup(config, device)
    batch = _batch(*train, torch.arange(config.batch_size, device=device))
    for _ in range(3):
        _training_step(model, optimizer, batch, config.lr, config.amp, device, check_finite=False)
    _synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            _training_step(model, optimizer, batch, config.lr, config.amp, device, check_finite=False)
        _synchronize(device)
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:  # (a profiler that files kernels under the operators that launched them)
        kernels = [e for e in averages if e.self_device_time_total > 0]
    total_us = sum(e.self_device_time_total for e in kernels)  # microseconds
    dearest = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return total_us / steps / 1e6, [(e.key, e.self_device_time_total / steps / 1e3, e.count / steps)
                                    for e in dearest]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["palimpsa", "palimpsa_g4", "palimpsa_g1", "notpalimpsa"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-kv-pairs", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--head-k-dim", type=int, default=16)
    parser.add_argument("--head-v-dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--top", type=int, default=8, help="kernels listed per model (CUDA only; 0: no profile)")
    parser.add_argument("--compile", action="store_true", help="also time the steps with compiled blocks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here, as it goes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(args.out)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit(f"# MQAR step pace on {name} (torch {torch.__version__})")
    emit()
    emit(f"L={args.seq_len}, {args.num_kv_pairs} pairs, d_model {args.d_model}, {args.num_heads} heads of "
         f"K={args.head_k_dim}, V={args.head_v_dim}, batch {args.batch_size}; median of {args.steps} steps after "
         f"{args.warmup} warm-up, one synchronisation per step")
    emit()
    emit("| model | eager ms/step (min-max) | first step s | compiled ms/step (min-max) | first compiled step s |")
    emit("|---|---|---|---|---|")
    configs = {}
    for model in args.models:
        config = RunConfig(model=model, seq_len=args.seq_len, num_kv_pairs=args.num_kv_pairs, d_model=args.d_model,
                           num_heads=args.num_heads, head_k_dim=args.head_k_dim, head_v_dim=args.head_v_dim,
                           batch_size=args.batch_size, num_train=args.num_train, num_validation=8, num_test=8,
                           lr=1e-3)
        configs[model] = config
        eager = time_steps(config, device, args.steps, args.warmup, False)
        row = (f"| {model} | {eager['median'] * 1e3:.1f} ({eager['min'] * 1e3:.1f}-{eager['max'] * 1e3:.1f}) "
               f"| {eager['first']:.1f} ")
        if args.compile and device.type == "cuda":
            compiled = time_steps(config, device, args.steps, args.warmup, True)
            row += (f"| {compiled['median'] * 1e3:.1f} ({compiled['min'] * 1e3:.1f}-{compiled['max'] * 1e3:.1f}) "
                    f"| {compiled['first']:.1f} |")
        else:
            row += "| — | — |"
        emit(row)
    if device.type == "cuda" and args.top > 0:
        for model, config in configs.items():
            try:
                seconds, dearest = profile_steps(config, device, 5, args.top)
            except Exception as error:  # (the timings above stand without a profile)
                emit()
                emit(f"## {model}: profiling failed: {type(error).__name__}: {error}")
                continue
            emit()
            emit(f"## {model}: {seconds * 1e3:.2f} ms of kernels per eager step")
            emit()
            emit("| kernel | ms per step | calls per step |")
            emit("|---|---|---|")
            for kernel, ms, calls in dearest:
                emit(f"| `{kernel[:90]}` | {ms:.3f} | {calls:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
