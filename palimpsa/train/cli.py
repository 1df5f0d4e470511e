"""``palimpsa train``: every TrainConfig field as a flag, optionally on top of a JSON run config.

Multi-GPU: ``torchrun --nproc-per-node N -m palimpsa train --parallel ddp|fsdp ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from palimpsa.train.config import TrainConfig

HELP = {
    "model": "preset name (palimpsa/train/presets: tiny/small sizes; palimpsa/configs: the paper's), "
             "JSON model config or HF config directory",
    "model_overrides": "JSON object of model config fields to replace, e.g. '{\"metaplasticity\": false}'",
    "data": "local files/directories/globs, or hf:NAME[:CONFIG] (streaming)",
    "eval_data": "held-out local files/directories/globs (or hf:NAME[:CONFIG]): val_loss over their first "
                 "eval_packs packs is logged when the run stops (and every eval_every steps if > 0)",
    "eval_every": "also log val_loss every N steps (0: only when the run stops; needs eval_data)",
    "eval_packs": "packs of seq_len tokens of eval_data that val_loss averages over",
    "text_field": "the text column of .jsonl/.json/.parquet documents and hf: datasets",
    "hf_split": "split of an hf: dataset",
    "tokenizer": "'byte' (offline byte-level) or an HF tokenizer directory / hub id",
    "append_eos": "end every document with the tokenizer's end-of-sequence token",
    "seq_len": "tokens per pack (documents are packed, boundaries passed as cu_seqlens)",
    "batch_size": "packs per micro-batch per rank",
    "grad_accum": "micro-batches per optimizer step",
    "parallel": "auto (DDP under torchrun, else one process), or ddp / fsdp (FSDP2 fully_shard): need torchrun",
    "precision": "auto (bf16 autocast on CUDA, float32 on CPU), bf16 (autocast on any device; slow on CPU) or fp32",
    "device": "auto (the GPU of this rank when there is one, else the CPU), cpu, cuda or cuda:N",
    "max_steps": "optimizer steps of the run (the schedule's length)",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine schedule ends at lr * min_lr_ratio",
    "warmup_steps": "steps of linear warm-up before the cosine decay",
    "weight_decay": "AdamW weight decay (matrices only)",
    "betas": "AdamW betas",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "seed": "seed of the weights and the data order",
    "out_dir": "run folder: checkpoint, metrics, the exported model in OUT_DIR/model",
    "log_every": "log the loss every N steps",
    "resume": "continue from OUT_DIR's checkpoint when there is one",
    "stop_at_step": "stop (and checkpoint) after this step; resume later with the same command",
    "time_limit_s": "stop (and checkpoint) after this many seconds; resume later with the same command",
    "export_hf": "save a Hugging Face model (and tokenizer) in OUT_DIR/model when the run finishes",
    "progress": "show a progress bar",
    "wandb_project": "also log to this Weights & Biases project",
    "tensorboard": "also write TensorBoard logs",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "compile": "torch.compile the models' decoder blocks on CUDA (faster and leaner: the README's training "
               "table; --no-compile runs eager PyTorch; CPU runs never compile)",
}


def _field_kwargs(f: dataclasses.Field, hints) -> dict:
    kind = hints[f.name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kwargs = {"help": HELP.get(f.name, "") + f" (default: {default!r})", "default": argparse.SUPPRESS}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.name in ("data", "eval_data"):
        kwargs["nargs"] = "+"
    elif f.name == "betas":
        kwargs.update(nargs=2, type=float)
    elif f.name == "model_overrides":
        kwargs["type"] = json.loads
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        kwargs["type"] = type(default)
    elif typing.get_origin(kind) is typing.Union:  # Optional[int] / Optional[str]
        inner = [a for a in typing.get_args(kind) if a is not type(None)][0]
        kwargs["type"] = inner
    return kwargs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a language model (torchrun for DDP/FSDP2)",
                                   description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="JSON file of TrainConfig fields; flags given here override it "
                                         "(default: none)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_field_kwargs(f, hints))
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {}
    if getattr(args, "config", None):
        with open(args.config, encoding="utf-8") as handle:
            values.update(json.load(handle))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from palimpsa.train.distributed import shutdown_distributed
    from palimpsa.train.loop import NonFiniteLossError, train

    config = config_from_args(args)
    try:
        result = train(config)
    except NonFiniteLossError as error:
        print(f"palimpsa train: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.already_complete:
        print(f"run in {result.out_dir} already complete at step {result.final_step} (its checkpoint.pt); nothing "
              "to train: raise --max-steps / --stop-at-step, or use another --out-dir for a new run", file=sys.stderr)
        return 0
    print(json.dumps({"final_step": result.final_step, "resumed_from_step": result.start_step,
                      "last_loss": result.losses[-1] if result.losses else None, "out_dir": result.out_dir}))
    return 0
