"""``palimpsa mqar``: run (or resume) an MQAR sweep, then print and save its summary table and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from palimpsa.mqar.data import check_task
from palimpsa.mqar.presets import PRESETS, preset_grid, preset_workers_per_device
from palimpsa.mqar.report import write_report
from palimpsa.mqar.sweep import ERRORS_FILE, RESULTS_FILE, UNFINISHED_FILE, run_sweep
from palimpsa.mqar.models import MODEL_NAMES, parse_model_name

# RunConfig fields settable from the command line: (flag, type, help)
FIXED_OPTIONS = (
    ("batch_size", int, "examples per step (overrides the preset's per-length batch sizes)"),
    ("epochs", float, "passes over the training set"),
    ("max_steps", int, "cap on optimiser steps per run (the cosine schedule spans the capped length)"),
    ("num_train", int, "training examples"),
    ("num_validation", int, "validation examples (learning-rate selection, early stop)"),
    ("num_test", int, "test examples"),
    ("vocab_size", int, "vocabulary size V (keys [1, V/2), values [V/2, V))"),
    ("n_layers", int, "layers"),
    ("num_heads", int, "heads per mixer"),
    ("head_k_dim", int, "key (Mamba2: state) size per head; default d_model / num_heads"),
    ("head_v_dim", int, "value (Mamba2: head) size per head; default 2 * head_k_dim"),
    ("weight_decay", float, "AdamW weight decay"),
    ("warmup_steps", int, "linear warm-up steps before the cosine decay"),
    ("eval_every", int, "steps between validations (default once per epoch)"),
    ("early_stop_accuracy", float, "stop once validation accuracy exceeds this"),
    ("power_a", float, "power-law exponent of the query placement"),
    ("time_limit_s", float, "fit each run into this many seconds, and before the end of --time-budget (its step count "
                            "is set after a short timing)"),
)


def _pairs(text: str) -> tuple[int, int]:
    try:
        L, kv = text.split(":")
        return int(L), int(kv)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is SEQ_LEN:NUM_KV_PAIRS, e.g. 512:128, got {text!r}")


def model_name_argument(text: str) -> str:
    """argparse type of a model name (see :func:`palimpsa.mqar.models.parse_model_name`)."""
    try:
        parse_model_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    return text


def add_parser(subparsers) -> None:
    """Add the ``mqar`` verb."""
    p = subparsers.add_parser(
        "mqar", help="multi-query associative recall benchmark (resumable sweep, table, plots)",
        description="Run an MQAR sweep (finished runs in OUT/results.jsonl are skipped), then write "
                    "OUT/summary.md, OUT/accuracy_vs_state_size.png, OUT/accuracy_vs_step.png and, when the "
                    "sweep has several sequence lengths, OUT/accuracy_vs_seq_len.png.",
    )
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="named grid (default: quick)")
    p.add_argument("--out", default=None, help="output folder (default: runs/mqar/<preset>)")
    p.add_argument("--models", nargs="+", type=model_name_argument, metavar="MODEL",
                   help=f"models to train (default: the preset's): {', '.join(MODEL_NAMES)}; palimpsa_g<G> or "
                        "meta_mamba2_g<G> is the model with G importance gates per head and token, each shared by V/G "
                        "value channels (G divides V; the plain name is the paper's model, one gate per channel)")
    p.add_argument("--settings", nargs="+", type=_pairs, metavar="L:KV",
                   help="(sequence length, kv pairs) pairs (default: the preset's)")
    p.add_argument("--d-models", nargs="+", type=int, help="model widths (default: the preset's)")
    p.add_argument("--lrs", nargs="+", type=float, help="learning rates (default: the preset's)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (model init and data; default: the preset's)")
    for name, typ, text in FIXED_OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text + " (default: the preset's)")
    p.add_argument("--mlp", action="store_true", default=None, help="add a SwiGLU MLP to every block")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default=None,
                   help="mixed precision (auto: bf16 autocast on CUDA only; default: the preset's, else auto)")
    p.add_argument("--gdn-backend", choices=("auto", "torch", "fla"), default=None,
                   help="Gated DeltaNet delta-rule backend (default: the preset's, else auto)")
    p.add_argument("--op-backend", choices=("auto", "torch", "triton"), default="auto",
                   help="backend of the Palimpsa op in the Palimpsa / Meta-Mamba2 layers "
                        "(default: auto, Triton on CUDA)")
    p.add_argument("--torch-op-for", nargs="+", type=model_name_argument, default=[], metavar="MODEL",
                   help="models whose Palimpsa op runs on the PyTorch backend whatever --op-backend says (e.g. those "
                        "whose `python -m palimpsa.mqar.backend_check` failed on this device; default: none)")
    p.add_argument("--equal-steps", action="store_true",
                   help="train every run at once and in lockstep, so that with --time-limit-s all end with the same "
                        "number of steps, the smallest any of them fits (each run waits while it is ahead of the "
                        "slowest; needs --workers-per-device x devices >= runs; use --warmup-steps >= 200 so that "
                        "the fitted length changes no learning rate already used)")
    p.add_argument("--compile", action="store_true",
                   help="run every block through torch.compile on CUDA (fewer, fused kernels; the math is unchanged; "
                        "each process compiles once per model shape)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default: cores shared evenly among CPU workers)")
    p.add_argument("--devices", nargs="+", default=None, help="e.g. cuda:0 cuda:1 (default: all GPUs, else cpu)")
    p.add_argument("--workers-per-device", type=int, default=None,
                   help="runs in parallel on each device (default: the preset's, 2 for quick, else 1)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="keep no OUT/checkpoints/<run>.pt (by default each run in progress saves its state at every "
                        "validation, and an interrupted run continues from there when the command is run again; with "
                        "this flag existing checkpoints are neither used nor removed)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; no run starts after it and runs still going stop and are not recorded (they go to "
                        "OUT/unfinished.jsonl; the same command continues them); the exit status is 1 when any run "
                        "failed, with or without a budget; default: none)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the table and plots")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=main)


def build_grid(args: argparse.Namespace):
    """The preset's grid with the command line's overrides."""
    grid = preset_grid(args.preset)
    for name in ("models", "settings", "d_models", "lrs", "seeds"):
        value = getattr(args, name)
        if value:
            setattr(grid, name, list(value))
    for name, _, _ in FIXED_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            grid.fixed[name] = value
            if name == "batch_size":
                grid.batch_size_by_seq_len = {}
    for name in ("mlp", "amp", "gdn_backend"):
        if getattr(args, name) is not None:
            grid.fixed[name] = getattr(args, name)
    grid.__post_init__()
    vocab_size = grid.fixed.get("vocab_size", 8192)
    for seq_len, num_kv_pairs in grid.settings:  # fail before any run starts, not inside every worker
        check_task(vocab_size, seq_len, num_kv_pairs)
    return grid


def main(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/mqar/{args.preset}")
    grid = build_grid(args)
    runs = grid.runs()
    if args.dry_run:
        for config in runs:
            print(config)
        print(f"{len(runs)} runs", file=sys.stderr)
        return 0
    if not args.report_only:
        workers = args.workers_per_device or preset_workers_per_device(args.preset)
        stats = run_sweep(runs, out, devices=args.devices, workers_per_device=workers,
                          progress=not args.no_progress, time_budget_s=args.time_budget,
                          op_backend=args.op_backend, threads=args.threads,
                          checkpoints=not args.no_checkpoints,
                          op_backend_by_model={model: "torch" for model in args.torch_op_for},
                          equal_steps=args.equal_steps, compile_blocks=args.compile)
        print(f"{stats['planned']} runs planned, {stats['skipped']} already done, {stats['recorded']} recorded "
              f"now -> {out / RESULTS_FILE}", file=sys.stderr)
    table, written = write_report(out / RESULTS_FILE, out)
    print(table if table.count("\n") > 2 else "no finished runs yet")
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if args.report_only:
        return 0
    if stats["unfinished"]:
        print(f"{stats['unfinished']} runs stopped by the time budget (OUT/{UNFINISHED_FILE}); run the same command "
              "again to continue them", file=sys.stderr)
    missing = stats["planned"] - stats["skipped"] - stats["recorded"]
    if stats["failed"] or (args.time_budget is None and missing):
        print(f"{stats['failed'] or missing} planned runs failed (see the errors above and {out / ERRORS_FILE})",
              file=sys.stderr)
        return 1
    return 0
