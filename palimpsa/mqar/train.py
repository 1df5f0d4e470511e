"""Train and evaluate one MQAR run (one model, setting, learning rate and seed).

Protocol (spec benchmarks.md section 2): AdamW with weight decay 0.1 (not on norms, biases, embeddings'
... see :func:`parameter_groups`), a cosine learning-rate schedule over all planned steps, cross-entropy on
the query positions only, validation after every ``eval_every`` steps (default: once per epoch) and an early
stop once validation accuracy exceeds ``early_stop_accuracy`` (0.99).  The test set is scored once, with the
weights of the best validation accuracy.  For the models built on the Palimpsa op the test pass also returns
the last layer's output variance, and :func:`palimpsa.mqar.report.variance_auroc` scores how well it flags
wrong answers (metaplastic models; their twins without metaplasticity, whose importance never moves, are the
control).

With a ``checkpoint_path`` a run saves its whole training state at every validation (atomically) and, when the
file exists at the start, continues from it: a run stopped by a deadline or killed with its machine resumes where
it last validated and follows exactly the trajectory it would have followed uninterrupted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from palimpsa.io import atomic_torch_save
from palimpsa.mqar.data import IGNORE_INDEX, make_splits
from palimpsa.mqar.models import (VARIANCE_MODELS, MQARModel, MQARModelConfig, count_parameters,
                                  palimpsa_op_backend, recurrent_state_bytes)
from palimpsa.mqar.report import variance_auroc

AMP_MODES = ("auto", "bf16", "off")
WARMUP_UNTIMED_STEPS = 5  # first steps (compilation, autotuning) left out of the step time
# A time-limited run times steps FIT_PROBE_START..FIT_AT_STEP, then fixes its length.  The probe starts late
# so that, in a sweep that starts many runs on one GPU at once, every run is past its compilation and data
# generation (which would otherwise make the GPU look idle and the step time short).
FIT_PROBE_START = 100
FIT_AT_STEP = 200
FIT_SAFETY = 0.95  # plan for this fraction of the time left


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run; its hash names the run (see :func:`run_id`).

    batch_size: examples per step.  epochs: passes over the training set; max_steps caps the total (the
    cosine schedule spans min(epochs * steps_per_epoch, max_steps)).  eval_every: steps between validations
    (None = once per epoch).  amp: "auto" (bf16 autocast on CUDA, none on CPU), "bf16" or "off".
    time_limit_s: fit the run into this many seconds of training and evaluation: once steps FIT_PROBE_START
    to FIT_AT_STEP are timed, the planned total is cut to the steps that fit (the record keeps the steps
    actually run, and with warmup_steps >= FIT_AT_STEP the schedule equals that of ``max_steps`` = those steps,
    so the run can be repeated exactly without a time limit).
    """

    model: str
    seq_len: int
    num_kv_pairs: int
    d_model: int = 128
    lr: float = 1e-3
    seed: int = 0
    n_layers: int = 2
    num_heads: int = 8
    head_k_dim: Optional[int] = None
    head_v_dim: Optional[int] = None
    mlp: bool = False
    vocab_size: int = 8192
    power_a: float = 0.01
    num_train: int = 100_000
    num_validation: int = 1_000
    num_test: int = 3_000
    batch_size: int = 128
    epochs: float = 60
    max_steps: Optional[int] = None
    weight_decay: float = 0.1
    warmup_steps: int = 0
    eval_every: Optional[int] = None
    early_stop_accuracy: float = 0.99
    amp: str = "auto"
    gdn_backend: str = "auto"
    time_limit_s: Optional[float] = None

    def __post_init__(self):
        # one spelling per value, so that the run's hash does not depend on 60 vs 60.0
        for name in ("lr", "epochs", "power_a", "weight_decay", "early_stop_accuracy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        for name in ("seq_len", "num_kv_pairs", "num_train", "num_validation", "num_test", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 or None, got {self.time_limit_s!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 or None, got {self.eval_every!r}")

    def model_config(self) -> MQARModelConfig:
        return MQARModelConfig(name=self.model, vocab_size=self.vocab_size, d_model=self.d_model,
                               n_layers=self.n_layers, num_heads=self.num_heads, head_k_dim=self.head_k_dim,
                               head_v_dim=self.head_v_dim, mlp=self.mlp, gdn_backend=self.gdn_backend)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown run config fields: {sorted(unknown)}")
        return cls(**values)


def run_id(config: RunConfig) -> str:
    """A stable name of a run: the hash of its whole config (two runs share it only if identical)."""
    text = json.dumps(asdict(config), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def planned_steps(config: RunConfig) -> tuple[int, int]:
    """(steps per epoch, total planned steps) of a run."""
    per_epoch = math.ceil(config.num_train / config.batch_size)
    total = max(1, math.ceil(config.epochs * per_epoch))
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return per_epoch, total


def cosine_lr(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (projections, embedding); none on vectors (norms, biases,
    A_log, dt_bias, D, gate scales) or on parameters marked ``_no_weight_decay``."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_context(amp: str, device: torch.device):
    """bf16 autocast on CUDA for amp "auto"/"bf16"; nothing on the CPU unless amp == "bf16"."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use else nullcontext()


@torch.no_grad()
def evaluate(model: MQARModel, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, amp: str,
             with_variance: bool = False) -> dict:
    """Accuracy on (inputs, labels) [N, L]: per example, the fraction of its query positions predicted
    exactly, then the mean over examples.

    Returns {"accuracy": float} and, with ``with_variance``, "variance_auroc": the AUROC of the last layer's
    output variance at the query positions (mean over heads and value channels) for flagging wrong answers.
    """
    model.eval()
    device = next(model.parameters()).device
    per_example, scores, wrong = [], [], []
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        mask = y != IGNORE_INDEX
        with autocast_context(amp, device):
            logits, variance = model(x, positions=mask, output_variance=True) if with_variance else \
                (model(x, positions=mask), None)
        correct = (logits.argmax(-1) == y[mask]).float()  # [M], row-major over the batch
        per_row = torch.zeros(x.shape[0], device=device).index_add_(0, mask.nonzero()[:, 0], correct)
        per_example.append(per_row / mask.sum(1).clamp_min(1))
        if with_variance and variance is not None:
            scores.append(variance.float().mean(dim=(-2, -1)).cpu())
            wrong.append((1 - correct).cpu())
    model.train()
    result = {"accuracy": torch.cat(per_example).mean().item()}
    if with_variance:
        result["variance_auroc"] = (variance_auroc(torch.cat(scores), torch.cat(wrong).bool()) if scores
                                    else None)
    return result


def _fit_total(config: RunConfig, step: int, total: int, eval_every: int, eval_seconds: float,
               seconds_per_step: float, elapsed: float) -> int:
    """The total steps of a time-limited run: the most that fit in what is left of ``config.time_limit_s``
    counting the validations every ``eval_every`` steps and the final test pass (each timed from one
    validation of ``eval_seconds``), never fewer than ``step`` nor more than ``total``."""
    test_seconds = eval_seconds * config.num_test / config.num_validation
    left = FIT_SAFETY * (config.time_limit_s - elapsed) - test_seconds
    per_step = seconds_per_step + eval_seconds / eval_every
    return max(step, min(total, step + int(left / per_step)))


def query_index(labels: torch.Tensor) -> Optional[torch.Tensor]:
    """[N, L] labels -> [N, Q] int64 positions of the labelled entries (ascending), when every row has the
    same number Q of them (MQAR: every key is queried once); else None (use the bool mask)."""
    mask = labels != IGNORE_INDEX
    counts = mask.sum(1)
    if counts.numel() == 0 or not bool((counts == counts[0]).all()):
        return None
    return mask.nonzero()[:, 1].reshape(labels.shape[0], int(counts[0]))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    """'cpu' or the CUDA device's name, e.g. 'NVIDIA H100 80GB HBM3'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_run(config: RunConfig, device: str | torch.device = "cpu", progress: bool = True,
              progress_position: int = 0, deadline: Optional[float] = None, op_backend: str = "auto",
              on_eval: Optional[Callable[[dict], None]] = None,
              checkpoint_path: Optional[str | os.PathLike] = None) -> dict:
    """Train one run and return its result record (see the module docstring for the protocol).

    ``deadline`` (a time.time() value) stops training early with stop_reason "deadline" (a sweep's budget).
    ``on_eval`` is called after every validation with {run_id, model, seq_len, lr, seed, step, planned_steps,
    loss, val_accuracy, seconds} (a sweep logs it, so that runs in progress can be watched).
    ``op_backend`` forces the Palimpsa op's backend ("torch" or "triton"; "auto": the op decides); it changes
    speed, not the math, so it is recorded but is not part of the run's identity.
    ``checkpoint_path``: save the training state there at every validation and resume from it when it exists
    (see the module docstring); the file is removed once the run ends, unless a deadline stopped it.

    Returns a dict with model, seq_len, num_kv_pairs, d_model, lr, seed, epochs (completed, fractional),
    steps, val_accuracy, test_accuracy, state_bytes (recurrent state per layer), seconds, device, and also
    run_id, planned_steps, stop_reason, num_parameters, variance_auroc (models in VARIANCE_MODELS; None
    when undefined), history ([step, train loss, validation accuracy] at each validation), seconds_per_step
    (training steps after the first 5, validations excluded), op_backend, resumed_at_steps (the steps it
    resumed from checkpoints at) and the whole config.
    """
    checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
    with palimpsa_op_backend(op_backend):
        record = _train(config, torch.device(device), progress, progress_position, deadline, on_eval,
                        checkpoint_path)
    record["op_backend"] = op_backend
    return record


CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a run's training state to ``path`` atomically."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, path)


def load_checkpoint(path: Path, config: RunConfig) -> dict:
    """The training state saved at ``path`` for the run ``config``; ValueError when the file cannot be read,
    has another format, or belongs to another run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # the generator state must stay on the CPU
    except Exception as error:
        raise ValueError(f"checkpoint {path} could not be read ({type(error).__name__}: {error}); "
                         f"delete it to restart the run from step 0") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a format-{CHECKPOINT_FORMAT} MQAR run checkpoint")
    if state.get("run_id") != run_id(config):
        raise ValueError(f"checkpoint {path} belongs to run {state.get('run_id')!r}, not to {run_id(config)!r}")
    return state


def _train(config: RunConfig, device: torch.device, progress: bool, progress_position: int,
           deadline: Optional[float], on_eval: Optional[Callable[[dict], None]],
           checkpoint_path: Optional[Path]) -> dict:
    """The body of :func:`train_run`."""
    started = time.time()
    splits = make_splits(config.vocab_size, config.seq_len, config.num_kv_pairs, config.num_train,
                         config.num_validation, config.num_test, config.seed, config.power_a)
    torch.manual_seed(config.seed)
    model = MQARModel(config.model_config()).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    per_epoch, total = planned_steps(config)
    eval_every = config.eval_every or per_epoch
    train_x, train_y = (t.to(device) for t in splits.train)
    # the query positions of every training example, found once: the steps then never wait for the device
    train_q = query_index(train_y)
    order_gen = torch.Generator().manual_seed(config.seed)

    best = {"accuracy": -1.0, "state": None, "step": 0}
    history = []  # (step, train loss of that step, validation accuracy)
    step, stop_reason, loss_value = 0, "planned_steps", float("nan")
    non_finite = None  # device flag: a non-finite training loss since the start
    train_started, fitted = time.time(), False
    resumed_at, resume_order, resume_start = [], None, 0
    probe_from, fit_at = FIT_PROBE_START, FIT_AT_STEP  # the time-limit probe's first step and the fit's step
    timed_start, eval_seconds = None, 0.0
    earlier_timed = (0.0, 0)  # (seconds, steps) of timed training before the last resume
    if checkpoint_path is not None and checkpoint_path.exists():
        saved = load_checkpoint(checkpoint_path, config)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        order_gen.set_state(saved["order_generator"])
        step, total, fitted = saved["step"], saved["total"], saved["fitted"]
        best, history, loss_value = saved["best"], [tuple(h) for h in saved["history"]], saved["loss"]
        resume_order, resume_start = saved["order"].to(device), saved["next_batch_start"]
        started -= saved["seconds"]  # the record's seconds count the earlier part too
        train_started -= saved["train_seconds"]
        resumed_at = saved["resumed_at_steps"] + [step]
        earlier_timed = (saved["timed_seconds"], saved["timed_steps"])
        if config.time_limit_s is not None and not fitted and step >= FIT_PROBE_START:
            # the probe had started before the stop: probe again once this process has warmed up (the
            # fit moves later by as much; before it the schedule is the warm-up when warmup_steps covers it)
            probe_from = step + WARMUP_UNTIMED_STEPS
            fit_at = max(FIT_AT_STEP, probe_from + FIT_AT_STEP - FIT_PROBE_START)
        if saved["device_type"] != device.type:
            warnings.warn(f"checkpoint {checkpoint_path} was saved on {saved['device_type']} and resumes on "
                          f"{device.type}: precision (amp={config.amp!r}) and kernels may differ from the first part",
                          stacklevel=3)
    bar = tqdm(total=total, initial=step, desc=f"{config.model} L={config.seq_len} kv={config.num_kv_pairs} "
               f"lr={config.lr:g} s={config.seed}", disable=not progress, position=progress_position,
               leave=progress_position == 0, dynamic_ncols=True, mininterval=1.0)
    timed_from = min(step + WARMUP_UNTIMED_STEPS, total - 1)
    while step < total:
        if resume_order is not None:  # finish the epoch the checkpoint was saved in
            order, first = resume_order, resume_start
            resume_order = None
        else:
            order, first = torch.randperm(config.num_train, generator=order_gen).to(device), 0
        for start in range(first, config.num_train, config.batch_size):
            if step >= total:
                break
            idx = order[start:start + config.batch_size]
            x, y = train_x[idx], train_y[idx]
            if train_q is not None:
                positions = train_q[idx]
                targets = y.gather(1, positions).reshape(-1)
            else:
                positions = y != IGNORE_INDEX
                targets = y[positions]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, config.lr, config.warmup_steps)
            with autocast_context(config.amp, device):
                logits = model(x, positions=positions)
            loss = F.cross_entropy(logits.float(), targets)
            # on the GPU a non-finite loss is noticed at the next validation (one device sync there, none per
            # step); the test pass then uses the best validated weights, which were finite
            finite = torch.isfinite(loss)
            non_finite = ~finite if non_finite is None else non_finite | ~finite
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0 or device.type != "cuda":
                if not bool(finite):
                    stop_reason = "non_finite_loss"
                    break
            optimizer.step()
            step += 1
            bar.update(1)
            if step == timed_from:
                _synchronize(device)
                timed_start = time.time()
            out_of_time = deadline is not None and time.time() > deadline
            if step == probe_from:
                _synchronize(device)
                probe_start, probe_eval_seconds = time.time(), eval_seconds
            fit_now = config.time_limit_s is not None and not fitted and step == fit_at and step < total
            # the validations every run makes; a deadline's extra one is scored for the stopped run's record
            # but kept out of the state it resumes from, so that the resumed run matches an uninterrupted one
            scheduled = step % eval_every == 0 or step == total or fit_now
            if scheduled or out_of_time:
                loss_value = loss.item()  # waits for the queued steps
                eval_started = time.time()
                if fit_now:  # training time of the probe steps, validations excluded
                    probe_train = eval_started - probe_start - (eval_seconds - probe_eval_seconds)
                if bool(non_finite):
                    stop_reason = "non_finite_loss"
                    break
                val = evaluate(model, *splits.validation, config.batch_size, config.amp)["accuracy"]
                resume_best, resume_history = best, list(history)  # before this validation
                if val > best["accuracy"]:
                    best = {"accuracy": val, "state": copy.deepcopy(model.state_dict()), "step": step}
                history.append((step, round(loss_value, 4), round(val, 4)))
                if timed_start is not None:
                    eval_seconds += time.time() - eval_started
                if on_eval is not None:
                    on_eval({"run_id": run_id(config), "model": config.model, "seq_len": config.seq_len,
                             "lr": config.lr, "seed": config.seed, "step": step, "planned_steps": total,
                             "loss": round(loss_value, 4), "val_accuracy": round(val, 4),
                             "seconds": round(time.time() - started, 1)})
                if fit_now:
                    total = _fit_total(config, step, total, eval_every, time.time() - eval_started,
                                       probe_train / (fit_at - probe_from), time.time() - train_started)
                    fitted = True
                    bar.total = total
                    bar.refresh()
                bar.set_postfix(loss=f"{loss_value:.3f}", val_acc=f"{val:.3f}")
                if checkpoint_path is not None:
                    if scheduled:
                        resume_best, resume_history = best, history
                    timed_now = (0.0, 0) if timed_start is None else (time.time() - timed_start - eval_seconds,
                                                                       step - timed_from)
                    save_checkpoint(checkpoint_path, {
                        "run_id": run_id(config), "device_type": device.type, "step": step, "total": total,
                        "fitted": fitted, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "order_generator": order_gen.get_state(), "order": order.cpu(),
                        "next_batch_start": start + config.batch_size, "best": resume_best,
                        "history": resume_history, "loss": loss_value, "seconds": time.time() - started,
                        "train_seconds": time.time() - train_started, "resumed_at_steps": resumed_at,
                        "timed_seconds": earlier_timed[0] + timed_now[0],
                        "timed_steps": earlier_timed[1] + timed_now[1]})
                if scheduled and val > config.early_stop_accuracy:
                    stop_reason = "early_stop"
                    break
                if out_of_time:
                    stop_reason = "deadline"
                    break
        if stop_reason != "planned_steps":
            break
    bar.close()
    _synchronize(device)
    timed_seconds, timed_steps = earlier_timed
    if timed_start is not None and step > timed_from:
        timed_seconds += time.time() - timed_start - eval_seconds
        timed_steps += step - timed_from
    seconds_per_step = timed_seconds / timed_steps if timed_steps > 0 else None

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    with_variance = config.model in VARIANCE_MODELS
    test = evaluate(model, *splits.test, config.batch_size, config.amp, with_variance=with_variance)
    if checkpoint_path is not None and stop_reason != "deadline":
        checkpoint_path.unlink(missing_ok=True)  # the run is over; a deadline-stopped run keeps it to resume
    return {
        "model": config.model,
        "seq_len": config.seq_len,
        "num_kv_pairs": config.num_kv_pairs,
        "d_model": config.d_model,
        "lr": config.lr,
        "seed": config.seed,
        "epochs": round(step / per_epoch, 4),
        "steps": step,
        "val_accuracy": max(best["accuracy"], 0.0) if best["state"] is not None else None,
        "test_accuracy": test["accuracy"],
        "state_bytes": recurrent_state_bytes(config.model_config(), config.seq_len),
        "seconds": round(time.time() - started, 2),
        "seconds_per_step": None if seconds_per_step is None else round(seconds_per_step, 5),
        "device": describe_device(device),
        "run_id": run_id(config),
        "planned_steps": total,
        "fitted_to_time_limit": fitted,
        "best_step": best["step"],
        "stop_reason": stop_reason,
        "final_train_loss": loss_value,
        "num_parameters": count_parameters(model),
        "variance_auroc": test.get("variance_auroc"),
        "history": history,
        "resumed_at_steps": resumed_at,
        "config": asdict(config),
    }
