"""The training loop, top to bottom: set up, then step, log and checkpoint until ``max_steps``.

Global batch and loss: every rank builds the same packs for a step (the data stream is deterministic) and
takes its share; the loss is the sum of token losses divided by the number of predicted tokens in the
*global* batch, so 1 process, gradient accumulation, DDP and FSDP2 give the same step for the same packs.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from palimpsa.layers.modules import compiled_blocks
from palimpsa.train.checkpoint import (
    checkpoint_path,
    full_model_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from palimpsa.train.config import TrainConfig
from palimpsa.train.data import IGNORE_INDEX, DocumentSource, PackedBatch, PackedStream, collate_packs, make_encoder
from palimpsa.train.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    gradient_sync,
    init_distributed,
    unwrap_model,
    wrap_model,
)
from palimpsa.train.metrics import MetricsLogger
from palimpsa.train.models import build_model, padded_vocab_size
from palimpsa.train.optim import build_optimizer, build_scheduler
from palimpsa.train.tokenizer import load_tokenizer

ModelFactory = Callable[[int], nn.Module]
# Fields that fix what a step sees: a checkpoint can only resume a run that agrees on them.
RESUME_FIELDS = ("model", "model_overrides", "data", "text_field", "hf_split", "tokenizer", "append_eos", "seq_len")


@dataclass
class TrainResult:
    """What a finished (or stopped) run did: its logged losses and where it stopped."""

    steps: List[int] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    final_step: int = 0
    out_dir: str = ""


def packed_logits(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Logits [1, T, vocab] of a packed batch; the model gets the sequence boundaries as ``cu_seqlens``."""
    output = model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens)
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (float32) over positions whose target is not -100.

    logits: [1, T, vocab]; targets: [1, T].
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def takes_shift_labels(model: nn.Module) -> bool:
    """Whether the model's forward computes its own loss from already-shifted targets (``shift_labels``), as
    this project's models do with their chunked cross-entropy (no [T, vocab] logits kept for the backward)."""
    return "shift_labels" in inspect.signature(unwrap_model(model).forward).parameters


def packed_loss_sum(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Summed next-token loss (float32) of a packed batch: the model's own lean loss when it has one
    (:func:`takes_shift_labels`), else :func:`summed_token_loss` of :func:`packed_logits`."""
    if takes_shift_labels(model):
        output = model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens, shift_labels=batch.targets,
                       num_items_in_batch=1)
        return output.loss.float()
    return summed_token_loss(packed_logits(model, batch), batch.targets)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on GPU; CPU runs stay in float32 (CPU bf16 is slow and only for debugging here)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks stop at the same step)."""
    if not torch.distributed.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0)


def _check_resumable(saved: dict, config: TrainConfig, path: str) -> None:
    current = config.to_dict()
    differing = [name for name in RESUME_FIELDS if saved.get(name) != current.get(name)]
    if differing:
        raise ValueError(f"cannot resume from {path}: its run differs in {differing}; "
                         "use another out_dir or resume=False")


def _export(model: nn.Module, model_class: type, tokenizer, out_dir: str, context: DistributedContext) -> None:
    """Save the trained model (Hugging Face format) and tokenizer to ``<out_dir>/model``."""
    if not hasattr(model_class, "save_pretrained"):
        return
    state = full_model_state_dict(model)  # collective under FSDP2
    if context.is_main:
        config = unwrap_model(model).config
        export = model_class(config)  # a plain (unwrapped, unsharded) copy for save_pretrained
        export.load_state_dict(state)
        target = os.path.join(out_dir, "model")
        export.save_pretrained(target)
        tokenizer.save_pretrained(target)
    barrier()


def train(config: TrainConfig, model_factory: Optional[ModelFactory] = None) -> TrainResult:
    """Train ``config.model`` (or ``model_factory(vocab_size)``) on ``config.data``; see TrainConfig.

    Run under torchrun for DDP/FSDP2; the process group is joined here and left to the caller to destroy.
    ``config.compile`` compiles the models' element-wise blocks on CUDA for this run
    (:func:`palimpsa.layers.modules.compiled_blocks`).
    """
    with compiled_blocks(config.compile):
        return _train(config, model_factory)


def _train(config: TrainConfig, model_factory: Optional[ModelFactory] = None) -> TrainResult:
    started = time.perf_counter()
    context = init_distributed(config.device)
    device = context.device
    tokenizer = load_tokenizer(config.tokenizer)
    vocab_size = padded_vocab_size(len(tokenizer))

    # Same seed on every rank: identical initial weights, which FSDP2 shards and DDP checks.
    torch.manual_seed(config.seed)
    if model_factory is not None:
        model = model_factory(vocab_size)
    else:
        model = build_model(config.model, vocab_size, config.model_overrides, tokenizer)
    model_class = type(model)
    model = wrap_model(model.to(device), context, config.parallel)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas)
    scheduler = build_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    stream = PackedStream(DocumentSource(config.data, config.text_field, config.hf_split),
                          make_encoder(tokenizer, config.append_eos), config.seq_len)

    start_step = 0
    ckpt = checkpoint_path(config.out_dir)
    if config.resume and os.path.exists(ckpt):
        restored = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, rank=context.rank,
                                   check_config=lambda saved: _check_resumable(saved, config, ckpt))
        start_step = restored["step"]
        stream.load_state_dict(restored["data"])
    else:
        torch.manual_seed(config.seed + 1 + context.rank)  # per-rank stream for anything random in training
    logger = None
    if context.is_main:
        logger = MetricsLogger(config.out_dir, resume_step=start_step if start_step else None,
                               wandb_project=config.wandb_project, tensorboard=config.tensorboard,
                               config=config.to_dict())

    world, accum, per_micro = context.world_size, config.grad_accum, config.batch_size
    tokens_per_step = world * accum * per_micro * config.seq_len
    last_step = config.max_steps if config.stop_at_step is None else min(config.max_steps, config.stop_at_step)
    result = TrainResult(final_step=start_step, out_dir=config.out_dir)
    progress = tqdm(total=config.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=not (context.is_main and config.progress))
    model.train()
    interval_loss = torch.zeros((), device=device)
    interval_steps, interval_start = 0, time.perf_counter()

    for step in range(start_step + 1, last_step + 1):
        step_packs = [stream.next_pack() for _ in range(world * accum * per_micro)]
        global_targets = sum(pack.num_targets for pack in step_packs)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            first = (micro * world + context.rank) * per_micro
            batch = collate_packs(step_packs[first:first + per_micro]).to(device)
            with gradient_sync(model, enabled=micro == accum - 1):
                with autocast_context(device, config.precision):
                    loss_sum = packed_loss_sum(model, batch)
                # DDP/FSDP average gradients over ranks: scale by world so the result is sum / global count.
                (loss_sum * (world / global_targets)).backward()
            step_loss += loss_sum.detach()
        if config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        else:
            grad_norm = torch.zeros((), device=device)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        interval_loss += all_reduce_sum(step_loss) / global_targets
        interval_steps += 1
        out_of_time = config.time_limit_s is not None and _any_rank(
            time.perf_counter() - started > config.time_limit_s, device)
        stopping = step == last_step or out_of_time
        if step % config.log_every == 0 or stopping:
            loss = interval_loss.item() / interval_steps
            elapsed = time.perf_counter() - interval_start
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "tokens": step * tokens_per_step,
                      "tokens_per_s": interval_steps * tokens_per_step / max(elapsed, 1e-9),
                      "elapsed_s": time.perf_counter() - started}
            result.steps.append(step)
            result.losses.append(loss)
            if logger is not None:
                logger.log(record)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.3g}")
            interval_loss.zero_()
            interval_steps, interval_start = 0, time.perf_counter()
        progress.update(1)
        result.final_step = step
        if (config.save_every and step % config.save_every == 0) or stopping:
            save_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                            data_state=stream.state_dict(), config=config.to_dict(), is_main=context.is_main)
        if stopping:
            break
    progress.close()
    if logger is not None:
        logger.close()
    if config.export_hf and result.final_step == config.max_steps and last_step > start_step:
        _export(model, model_class, tokenizer, config.out_dir, context)
    return result
