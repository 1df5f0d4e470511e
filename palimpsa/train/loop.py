"""The training loop, top to bottom: set up, then step, log and checkpoint until ``max_steps``.

A non-finite loss stops the run with :class:`NonFiniteLossError` before anything is saved or exported (the last
checkpoint holds finite weights).  Ctrl-C stops it after the step in progress with a checkpoint and raises
:class:`palimpsa.train.interrupt.Interrupted`, which says from which step the same command resumes.

Global batch and loss: every rank builds the same packs for a step (the data stream is deterministic) and
takes its share; the loss is the sum of token losses divided by the number of predicted tokens in the
*global* batch, so 1 process, gradient accumulation, DDP and FSDP2 give the same step for the same packs.
"""

from __future__ import annotations

import inspect
import os
import sys
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
from palimpsa.train.interrupt import Interrupted, resume_message, stop_on_interrupt, stop_requested
from palimpsa.train.data import (
    IGNORE_INDEX,
    DocumentSource,
    Pack,
    PackedBatch,
    PackedStream,
    collate_packs,
    held_out_packs,
    make_encoder,
)
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
from palimpsa.train.precision import autocast_context
from palimpsa.train.tokenizer import load_tokenizer

ModelFactory = Callable[[int], nn.Module]
# Fields that fix what a step sees: a checkpoint can only resume a run that agrees on them.
RESUME_FIELDS = ("model", "model_overrides", "data", "text_field", "hf_split", "tokenizer", "append_eos", "seq_len")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the run stops before saving or exporting those weights."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run did: its logged losses and where it started and stopped.

    ``start_step`` > 0 for a resumed run; ``already_complete``: the checkpoint was already at the last step, so
    nothing was trained; ``saved_step``: the step of the newest checkpoint."""

    steps: List[int] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    final_step: int = 0
    out_dir: str = ""
    start_step: int = 0
    already_complete: bool = False
    saved_step: int = 0


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


def batch_loss(model: nn.Module, batch: PackedBatch, device: torch.device, precision: str) -> torch.Tensor:
    """The summed token loss (float32 scalar) of one packed micro-batch, the forward under autocast."""
    with autocast_context(device, precision):
        return packed_loss_sum(model, batch)


@torch.no_grad()
def held_out_loss(model: nn.Module, packs: List[Pack], batch_size: int, device: torch.device,
                  precision: str) -> float:
    """Mean next-token loss (nats per predicted token) of ``model`` in eval mode over ``packs``, ``batch_size``
    packs per forward; every rank computes it over all the packs (same forwards on every rank, as FSDP2 needs)."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        targets = 0
        for first in range(0, len(packs), batch_size):
            batch = collate_packs(packs[first:first + batch_size]).to(device)
            total += batch_loss(model, batch, device, precision).double()
            targets += batch.num_targets
    finally:
        model.train(was_training)
    return total.item() / targets


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks stop at the same step)."""
    if not torch.distributed.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0)


def _all_finite(model: nn.Module, device: torch.device) -> bool:
    """Whether every parameter is finite, on every rank (one device sync)."""
    bad = torch.zeros((), device=device)
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP2 shard
        bad += (~torch.isfinite(local.detach())).sum()
    return not _any_rank(bool(bad.item()), device)


def _check_launch(config: TrainConfig) -> None:
    """--parallel ddp|fsdp needs torchrun's environment; without it the run would silently be one process."""
    if config.parallel != "auto" and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"parallel={config.parallel!r} needs torchrun (torchrun --nproc-per-node N -m palimpsa "
                         f"train --parallel {config.parallel} ...); for one process leave parallel at 'auto'")


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
    ``config.compile`` compiles the models' decoder blocks on CUDA for this run
    (:func:`palimpsa.layers.modules.compiled_blocks`).
    """
    with compiled_blocks(config.compile):
        return _train(config, model_factory)


def _train(config: TrainConfig, model_factory: Optional[ModelFactory] = None) -> TrainResult:
    _check_launch(config)
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
    # fused AdamW on CUDA, as `palimpsa bench train` times it (FSDP2's sharded parameters keep the default)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas,
                                fused=device.type == "cuda" and config.parallel != "fsdp")
    scheduler = build_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    encode = make_encoder(tokenizer, config.append_eos)
    stream = PackedStream(DocumentSource(config.data, config.text_field, config.hf_split), encode, config.seq_len)
    held_out = held_out_packs(DocumentSource(config.eval_data, config.text_field, config.hf_split), encode,
                              config.seq_len, config.eval_packs) if config.eval_data else []

    start_step = 0
    ckpt = checkpoint_path(config.out_dir)
    if config.resume and os.path.exists(ckpt):
        restored = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, rank=context.rank,
                                   check_config=lambda saved: _check_resumable(saved, config, ckpt))
        start_step = restored["step"]
        stream.load_state_dict(restored["data"])
    else:
        torch.manual_seed(config.seed + 1 + context.rank)  # per-rank stream for anything random in training
    last_step = config.max_steps if config.stop_at_step is None else min(config.max_steps, config.stop_at_step)
    result = TrainResult(final_step=start_step, out_dir=config.out_dir, start_step=start_step,
                         already_complete=start_step >= last_step)
    if result.already_complete:
        return result
    if start_step and context.is_main:
        print(f"resuming from step {start_step} ({ckpt})", file=sys.stderr)
    logger = None
    if context.is_main:
        logger = MetricsLogger(config.out_dir, resume_step=start_step if start_step else None,
                               wandb_project=config.wandb_project, tensorboard=config.tensorboard,
                               config=config.to_dict())
    try:
        with stop_on_interrupt():
            _train_steps(config, context, model, optimizer, scheduler, stream, held_out, logger, result, last_step,
                         started)
    except KeyboardInterrupt as interrupt:  # a second Ctrl-C: the state saved last is where a rerun resumes
        if isinstance(interrupt, Interrupted):
            raise
        raise Interrupted(resume_message(result.saved_step), result.saved_step) from None
    finally:
        if logger is not None:
            logger.close()
    if config.export_hf and result.final_step == config.max_steps:
        _export(model, model_class, tokenizer, config.out_dir, context)
    return result


def _train_steps(config: TrainConfig, context: DistributedContext, model: nn.Module, optimizer, scheduler,
                 stream: PackedStream, held_out: List[Pack], logger: Optional[MetricsLogger], result: TrainResult,
                 last_step: int, started: float) -> None:
    """Steps ``result.final_step + 1`` to ``last_step``: train, log every ``log_every`` steps (with the loss on the
    ``held_out`` packs, when there are some, every ``eval_every`` steps and at the stop) and checkpoint; stop
    early at the time limit or on Ctrl-C (then raise Interrupted, after the checkpoint)."""
    device = context.device
    world, accum, per_micro = context.world_size, config.grad_accum, config.batch_size
    tokens_per_step = world * accum * per_micro * config.seq_len
    ckpt = checkpoint_path(config.out_dir)
    result.saved_step = result.final_step
    progress = tqdm(total=config.max_steps, initial=result.final_step, unit="step", dynamic_ncols=True,
                    disable=not (context.is_main and config.progress))
    model.train()
    interval_loss = torch.zeros((), device=device)
    non_finite = torch.zeros((), dtype=torch.bool, device=device)  # since the last check; no sync per step
    interval_steps, interval_start = 0, time.perf_counter()

    for step in range(result.final_step + 1, last_step + 1):
        step_packs = [stream.next_pack() for _ in range(world * accum * per_micro)]
        global_targets = sum(pack.num_targets for pack in step_packs)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            first = (micro * world + context.rank) * per_micro
            batch = collate_packs(step_packs[first:first + per_micro]).to(device)
            with gradient_sync(model, enabled=micro == accum - 1):
                loss_sum = batch_loss(model, batch, device, config.precision)
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

        reduced_loss = all_reduce_sum(step_loss) / global_targets
        non_finite |= ~torch.isfinite(reduced_loss)
        interval_loss += reduced_loss
        interval_steps += 1
        out_of_time = config.time_limit_s is not None and _any_rank(
            time.perf_counter() - started > config.time_limit_s, device)
        # Ctrl-C: seen at once by one process; by all ranks together at log steps (no collective every step)
        interrupted = stop_requested() if world == 1 else (step % config.log_every == 0
                                                            and _any_rank(stop_requested(), device))
        stopping = step == last_step or out_of_time or interrupted
        saving = (config.save_every and step % config.save_every == 0) or stopping
        evaluating = bool(held_out) and (stopping or bool(config.eval_every) and step % config.eval_every == 0)
        if step % config.log_every == 0 or stopping or evaluating:
            loss = interval_loss.item() / interval_steps
            elapsed = time.perf_counter() - interval_start  # training only: tokens/s leaves the evaluation out
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "tokens": step * tokens_per_step,
                      "tokens_per_s": interval_steps * tokens_per_step / max(elapsed, 1e-9)}
            if evaluating:
                eval_started = time.perf_counter()
                record["val_loss"] = held_out_loss(model, held_out, config.batch_size, device, config.precision)
                record["eval_s"] = time.perf_counter() - eval_started
            record["elapsed_s"] = time.perf_counter() - started
            result.steps.append(step)
            result.losses.append(loss)
            if logger is not None:
                logger.log(record)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.3g}")
            interval_loss.zero_()
            interval_steps, interval_start = 0, time.perf_counter()
        if (step % config.log_every == 0 or saving) and (bool(non_finite) or saving and not _all_finite(model, device)):
            progress.close()
            raise NonFiniteLossError(
                f"the training loss (or a weight) became NaN or infinite by step {step}; stopped without saving or "
                f"exporting (the checkpoint of step {result.saved_step} in {config.out_dir} holds finite weights, "
                "if any): try a lower lr, a longer warmup_steps or precision fp32")
        progress.update(1)
        result.final_step = step
        if saving:
            save_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                            data_state=stream.state_dict(), config=config.to_dict(), is_main=context.is_main)
            result.saved_step = step
        if stopping:
            break
    progress.close()
    if interrupted:
        raise Interrupted(resume_message(step), step)
