"""``palimpsa bench train``: one full training step of each model, side by side, in one process on one device.

A step is forward, backward and AdamW (fused on CUDA) under bf16 autocast on CUDA (float32 on a CPU), on
B x T random tokens.  Per model: parameters, step time (median of the timed steps), tokens/s, peak memory
(weights, gradients, optimizer state and activations, from just before the model is built) and where one
step's time goes by component (:mod:`palimpsa.bench.breakdown`).  Models run one after another; each is freed
before the next is built.  Before timing, each model runs one small fwd + bwd step ("smoke step") so that a
broken model fails at once, with its error in the table.

Models (``--models``): palimpsa, palimpsa-g1 (one importance gate per head and token, ``importance_groups=1``),
notpalimpsa (the same with metaplasticity off), meta-mamba2, meta-mamba2-g1 (``importance_groups=1``),
gated-deltanet
(this project's baseline, :mod:`palimpsa.models.gated_deltanet`) and fla-gated-deltanet (fla's
``GatedDeltaNetForCausalLM``, when fla is importable).  Sizes (``--sizes``): the shipped configs
``palimpsa/configs/palimpsa-{170m,340m,760m}.json``; Meta-Mamba2 uses ``meta-mamba2-170m.json`` at 170m and,
at the larger sizes, the same shape widened to Palimpsa's width with twice its layers (a Mamba2 block has no
MLP); both Gated DeltaNets use fla's shapes (heads of 256, expand_v 2; 760m: d 1536, 6 heads, 21 layers, as
benchmarks.md; 170m and 340m: the layer count closest to Palimpsa's parameters, :data:`GDN_SHAPES`).
``tiny`` runs on a CPU in seconds (for tests).

fla 0.6 refuses the backward of its gated chunk kernels on Hopper GPUs with Triton >= 3.4 (its issue 640):
the row then says "refused".  ``--fla-bypass-check`` times fla with that one check switched off
(:func:`palimpsa.bench.fla_compat.hopper_check_bypassed`); such rows are marked "timing only, numerics
unchecked".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from palimpsa.bench.breakdown import COMPONENTS, KERNEL_KINDS, optimizer_range, profile_step
from palimpsa.bench.fla_compat import TIMING_ONLY_NOTE, hopper_check_bypassed, is_hopper_refusal
from palimpsa.io import atomic_write_text

SIZES = ("tiny", "170m", "340m", "760m")
MODELS = ("palimpsa", "palimpsa-g1", "notpalimpsa", "meta-mamba2", "meta-mamba2-g1", "gated-deltanet",
          "fla-gated-deltanet")
PRECISIONS = ("bf16", "fp32")
VOCAB_SIZE = 32000  # the shipped configs' vocabulary
TINY_VOCAB_SIZE = 256
SMOKE_TOKENS = 128
# (hidden size, heads of 256, layers) of fla-style Gated DeltaNets: 760m as benchmarks.md; at 170m and 340m the
# layer count that brings the parameters closest to Palimpsa's at that size (176M vs 172M, 340M vs 345M)
GDN_SHAPES = {"170m": (768, 3, 16), "340m": (1024, 4, 18), "760m": (1536, 6, 21)}
TINY_GDN = dict(hidden_size=64, num_heads=4, head_dim=16, num_hidden_layers=2, expand_v=2, hidden_ratio=2)


def fla_importable() -> bool:
    """Whether fla (flash-linear-attention) can be imported here (without importing it)."""
    return importlib.util.find_spec("fla") is not None


# ---------------------------------------------------------------------------------------------- model configs
def _preset_config(name: str, vocab_size: int, overrides: Optional[dict] = None):
    from palimpsa.train.models import build_model_config

    return build_model_config(name, vocab_size, overrides)


def _meta_mamba2_config(size: str, vocab_size: int, overrides: Optional[dict] = None):
    if size in ("tiny", "170m"):
        return _preset_config(f"meta-mamba2-{size}", vocab_size, overrides)
    palimpsa = _preset_config(f"palimpsa-{size}", vocab_size)
    d = palimpsa.hidden_size
    return _preset_config("meta-mamba2-170m", vocab_size, {
        "hidden_size": d, "num_hidden_layers": 2 * palimpsa.num_hidden_layers, "num_heads": 2 * d // 64,
        "importance_rank": math.ceil(d / 16), **(overrides or {})})


def _gdn_shape(size: str) -> dict:
    if size == "tiny":
        return dict(TINY_GDN)
    hidden, heads, layers = GDN_SHAPES[size]
    return dict(hidden_size=hidden, num_heads=heads, head_dim=256, num_hidden_layers=layers, expand_v=2,
                hidden_ratio=4)


def build_bench_model(name: str, size: str, vocab_size: Optional[int] = None) -> nn.Module:
    """A freshly initialised model ``name`` (see :data:`MODELS`) at ``size`` (see :data:`SIZES`), on the CPU, with
    ``vocab_size`` tokens (default: the shipped configs' 32000, 256 at the tiny size)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if vocab_size is not None and vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    vocab = vocab_size or (TINY_VOCAB_SIZE if size == "tiny" else VOCAB_SIZE)
    from transformers import AutoModelForCausalLM

    if name in ("palimpsa", "palimpsa-g1", "notpalimpsa"):
        overrides = {"palimpsa": {}, "palimpsa-g1": {"importance_groups": 1},
                     "notpalimpsa": {"metaplasticity": False}}[name]
        return AutoModelForCausalLM.from_config(_preset_config(f"palimpsa-{size}", vocab, overrides))
    if name in ("meta-mamba2", "meta-mamba2-g1"):
        overrides = {"importance_groups": 1} if name == "meta-mamba2-g1" else None
        return AutoModelForCausalLM.from_config(_meta_mamba2_config(size, vocab, overrides))
    shape = _gdn_shape(size)
    if name == "gated-deltanet":
        from palimpsa.models.gated_deltanet import GatedDeltaNetForCausalLM, GatedDeltaNetLMConfig

        return GatedDeltaNetForCausalLM(GatedDeltaNetLMConfig(vocab_size=vocab, tie_word_embeddings=True, **shape))
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM as FlaGatedDeltaNetForCausalLM

    accepted = inspect.signature(GatedDeltaNetConfig.__init__).parameters
    options = dict(vocab_size=vocab, tie_word_embeddings=True, **shape)
    unknown = sorted(k for k in options if k not in accepted)
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        raise RuntimeError(f"this fla's GatedDeltaNetConfig takes none of {unknown}")
    return FlaGatedDeltaNetForCausalLM(GatedDeltaNetConfig(**options))


# ---------------------------------------------------------------------------------------------------- timing
def _autocast(device: torch.device, precision: str):
    from palimpsa.train.loop import autocast_context

    return autocast_context(device, precision)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_step(model: nn.Module, optimizer, tokens: torch.Tensor, device: torch.device,
              precision: str) -> Callable[[], torch.Tensor]:
    """One training step on ``tokens`` [B, T]: loss (labels = the tokens), backward, optimizer step."""

    def step() -> torch.Tensor:
        with _autocast(device, precision):
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        with optimizer_range():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def smoke_step(model: nn.Module, vocab: int, seq_len: int, device: torch.device, precision: str) -> None:
    """A small forward + backward (no update) that must give a finite loss and some gradient."""
    tokens = torch.randint(0, vocab, (1, min(seq_len, SMOKE_TOKENS)), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    with _autocast(device, precision):
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    if loss is None or not torch.isfinite(loss):
        raise RuntimeError(f"smoke step: the loss is {loss}, expected a finite number")
    loss.backward()
    if not any(p.grad is not None for p in model.parameters()):
        raise RuntimeError("smoke step: no parameter received a gradient")
    model.zero_grad(set_to_none=True)


def bench_model(name: str, size: str, *, batch: int, seq_len: int, device: torch.device, precision: str,
                steps: int, warmup: int, profile: bool, compile_blocks: bool, fla_bypass: bool,
                vocab_size: Optional[int] = None) -> Dict:
    """Time one model (see the module docstring).  Returns its row; failures are recorded in ``status``."""
    from palimpsa.layers.modules import compiled_blocks
    from palimpsa.train.optim import parameter_groups

    row: Dict = {"model": name, "size": size, "status": "ok", "notes": []}
    uses_fla = name == "fla-gated-deltanet" or (name == "gated-deltanet" and device.type == "cuda"
                                               and fla_importable())
    if name == "fla-gated-deltanet" and not fla_importable():
        row["status"] = "skipped: fla is not importable"
        return row
    bypass = fla_bypass and uses_fla and device.type == "cuda"
    if name == "gated-deltanet" and uses_fla:
        row["notes"].append("runs fla's chunk_gated_delta_rule")
    model = optimizer = step = None
    _free_memory(device)
    if compile_blocks:
        # every model compiles its blocks afresh: Palimpsa's variants share one block class, and the graphs,
        # guards and dynamic-shape choices of an earlier model would otherwise carry over to the next (on an
        # H200, NotPalimpsa timed after the G = 1 model lost 13 % of its speed and took 3.8 GB more)
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with contextlib.ExitStack() as stack:
            if bypass and stack.enter_context(hopper_check_bypassed()):
                row["notes"].append(TIMING_ONLY_NOTE)
            stack.enter_context(compiled_blocks(compile_blocks and device.type == "cuda"))
            torch.manual_seed(0)
            model = build_bench_model(name, size, vocab_size).to(device).train()
            vocab = model.config.vocab_size
            row["params"] = sum(p.numel() for p in model.parameters())
            optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95),
                                          fused=device.type == "cuda")
            with compiled_blocks(False):  # fail fast without compiling a graph for the smoke step's shape
                smoke_step(model, vocab, seq_len, device, precision)
            tokens = torch.randint(0, vocab, (batch, seq_len), device=device,
                                   generator=torch.Generator(device=device).manual_seed(0))
            step = make_step(model, optimizer, tokens, device, precision)
            for _ in range(warmup):
                step()
            times = []
            for _ in range(steps):
                _synchronize(device)
                start = time.perf_counter()
                loss = step()
                _synchronize(device)
                times.append(time.perf_counter() - start)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss became {loss.item()} during the timed steps")
            row["step_s"] = statistics.median(times)
            row["step_s_min"], row["step_s_max"] = min(times), max(times)
            row["tokens_per_s"] = batch * seq_len / row["step_s"]
            if device.type == "cuda":
                row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                row["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
            if profile:
                # our compiled blocks are profiled without component ranges (they would change the graphs)
                compiled = compile_blocks and device.type == "cuda" and not uses_fla
                row["breakdown"] = profile_step(model, step, device, ranges=not compiled)
    except Exception as error:  # one model's failure must not lose the others' numbers
        if device.type == "cuda" and isinstance(error, torch.cuda.OutOfMemoryError):
            row["status"] = "out of memory"
        elif is_hopper_refusal(error):
            row["status"] = ("refused: fla's gated chunk backward refuses this Triton on Hopper (fla issue 640); "
                             "--fla-bypass-check times it anyway")
        else:
            row["status"] = f"failed: {type(error).__name__}: {error}"
            traceback.print_exc(file=sys.stderr)
    finally:
        del model, optimizer, step
        _free_memory(device)
    return row


# ---------------------------------------------------------------------------------------------- environment
def environment(device: torch.device) -> Dict[str, Optional[str]]:
    """Versions and the device, for the record."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device)}
    for package in ("triton", "transformers", "fla"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "unknown")
        except ImportError:
            info[package] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


# ------------------------------------------------------------------------------------------------- reporting
def _fmt_tokens(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _ms_table(title: str, rows: List[Dict], key: str, columns) -> List[str]:
    """Markdown lines: ``title``, then one row per model of ``row["breakdown"][key]`` (ms per column) and a total."""
    lines = ["", title, "", "| model | size | " + " | ".join(columns) + " | total |",
             "|---|---|" + "---|" * (len(columns) + 1)]
    for row in rows:
        ms = row["breakdown"][key]
        cells = [f"{ms.get(c, 0.0):.1f}" for c in columns]
        lines.append(f"| {row['model']} | {row['size']} | " + " | ".join(cells) + f" | {sum(ms.values()):.1f} |")
    return lines


def format_tables(result: Dict) -> str:
    """The summary table and the per-component breakdown (markdown)."""
    s = result["settings"]
    lines = [f"Training step (fwd + bwd + AdamW), B={s['batch']} x T={s['seq_len']}, {s['precision']}"
             f"{' autocast' if s['precision'] == 'bf16' and s['device'].startswith('cuda') else ''}, "
             f"compiled blocks {'on' if s['compile_effective'] else 'off'}, {s['warmup']} warm-up + "
             f"{s['steps']} timed steps, {result['environment']['device_name']}.", "",
             "| model | size | params | tokens/s | step | peak memory | status |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        params = f"{row['params'] / 1e6:.0f}M" if "params" in row else "-"
        tokens = _fmt_tokens(row["tokens_per_s"]) if "tokens_per_s" in row else "-"
        step = f"{row['step_s'] * 1e3:.1f} ms" if "step_s" in row else "-"
        memory = f"{row['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in row else "-"
        status = "; ".join([row["status"], *row["notes"]])
        lines.append(f"| {row['model']} | {row['size']} | {params} | {tokens} | {step} | {memory} | {status} |")
    profiled = [r for r in result["rows"] if "breakdown" in r]
    by_component = [r for r in profiled if r["breakdown"].get("ms") is not None]
    if by_component:
        clock = by_component[0]["breakdown"]["clock"]
        lines += _ms_table(f"One profiled step by component, milliseconds of {clock} time (palimpsa/bench/"
                           "breakdown.py says how operators are assigned):", by_component, "ms",
                           [*COMPONENTS, "unattributed"])
    if len(by_component) < len(profiled):
        lines += ["", "Models with compiled blocks are profiled without the component ranges, which would change "
                  "what torch.compile traces: their step is split by kernel kind only."]
    by_kind = [r for r in profiled if "kernels" in r["breakdown"]]
    if by_kind:
        lines += _ms_table("The same step by kernel kind, milliseconds of device time (names only: sees inside "
                           "compiled blocks; 'compiled' = torch.compile's fused kernels):", by_kind, "kernels",
                           KERNEL_KINDS)
    with_top = [r for r in profiled if r["breakdown"].get("top_kernels")]
    if with_top:
        lines += ["", "The kernels of most device time in that step (ms, calls):", ""]
        for row in with_top:
            top = ", ".join(_top_kernel_cell(entry) for entry in row["breakdown"]["top_kernels"][:8])
            lines.append(f"- {row['model']} {row['size']}: {top}")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _top_kernel_cell(entry: List) -> str:
    """One kernel of ``top_kernels``: its name, ms, calls and (when known) the operator that launched it."""
    name, ms, calls = entry[:3]
    launcher = entry[3] if len(entry) > 3 else ""
    return f"`{name}` {ms:.1f} ({calls})" + (f" from `{launcher}`" if launcher else "")


def save_result(result: Dict, out_dir: str) -> List[str]:
    """``out_dir/train_bench.json`` and ``out_dir/train_bench.md``, written atomically; returns the paths."""
    paths = [os.path.join(out_dir, "train_bench.json"), os.path.join(out_dir, "train_bench.md")]
    atomic_write_text(paths[0], json.dumps(result, indent=2) + "\n")
    atomic_write_text(paths[1], format_tables(result))
    return paths


# ----------------------------------------------------------------------------------------------------- entry
def _csv(value: str, allowed, what: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if items == ["all"]:
        return list(allowed)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of {list(allowed)} or 'all', "
                                         f"got {value!r}")
    return items


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="760m", type=lambda v: _csv(v, SIZES, "--sizes"),
                        help=f"comma-separated sizes from {list(SIZES)} (tiny: a CPU-sized model for tests)")
    parser.add_argument("--models", default="all", type=lambda v: _csv(v, MODELS, "--models"),
                        help=f"comma-separated models from {list(MODELS)}, or 'all'")
    parser.add_argument("--batch", type=_positive, default=4, help="sequences per step (B)")
    parser.add_argument("--seq-len", type=_positive, default=4096, help="tokens per sequence (T)")
    parser.add_argument("--vocab-size", type=_positive, default=None,
                        help="vocabulary of every model (default: the shipped configs' 32000; 256 at the tiny size); "
                             "set it to a tokenizer's to compare with `palimpsa train`")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="bf16: autocast on CUDA (a CPU stays in float32); fp32: no autocast")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile every decoder block (the grouped path is a graph break) and the "
                             "final norm; CUDA only")
    parser.add_argument("--steps", type=_positive, default=8, help="timed steps per model")
    parser.add_argument("--warmup", type=_non_negative, default=3, help="untimed steps per model before timing")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile one more step per model for the per-component breakdown")
    parser.add_argument("--fla-bypass-check", action="store_true",
                        help="time fla's gated kernels with its Hopper backward refusal switched off (rows are "
                             "marked 'timing only, numerics unchecked')")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cuda', 'cuda:N' or 'cpu'")
    parser.add_argument("--out", default=None,
                        help="folder for train_bench.json and train_bench.md (default: runs/bench/train-<time>)")


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> int:
    """Benchmark every (size, model); print and write the tables.  Returns 1 when a model failed."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    out_dir = args.out or os.path.join("runs", "bench", time.strftime("train-%Y%m%d-%H%M%S"))
    command = "palimpsa bench train " + " ".join(argv if argv is not None else sys.argv[3:])
    settings = {"sizes": args.sizes, "models": args.models, "batch": args.batch, "seq_len": args.seq_len,
                "vocab_size": args.vocab_size or "default",
                "precision": args.precision, "compile": args.compile,
                "compile_effective": args.compile and device.type == "cuda", "steps": args.steps,
                "warmup": args.warmup, "profile": args.profile, "fla_bypass_check": args.fla_bypass_check,
                "device": str(device), "optimizer": "AdamW" + (" (fused)" if device.type == "cuda" else "")}
    result = {"settings": settings, "environment": environment(device), "command": command.strip(), "rows": []}
    for size in args.sizes:
        for name in args.models:
            print(f"[bench train] {name} {size} ...", file=sys.stderr, flush=True)
            row = bench_model(name, size, batch=args.batch, seq_len=args.seq_len, device=device,
                              precision=args.precision, steps=args.steps, warmup=args.warmup,
                              profile=args.profile, compile_blocks=args.compile,
                              fla_bypass=args.fla_bypass_check, vocab_size=args.vocab_size)
            result["rows"].append(row)
            print(f"[bench train] {name} {size}: {row['status']}"
                  + (f", {row['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in row else ""),
                  file=sys.stderr, flush=True)
            save_result(result, out_dir)  # partial results survive a later crash
    print(format_tables(result), end="")
    paths = save_result(result, out_dir)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 1 if any(r["status"].startswith("failed") for r in result["rows"]) else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m palimpsa.bench.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
