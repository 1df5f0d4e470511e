"""Train and evaluate one MQAR run (one model, setting, learning rate and seed).

Protocol (spec benchmarks.md section 2): AdamW with weight decay 0.1 on matrices only (see
:func:`palimpsa.train.optim.parameter_groups`), a cosine learning-rate schedule over all planned steps, cross-entropy on
the query positions only, validation after every ``eval_every`` steps (default: once per epoch) and an early
stop once validation accuracy exceeds ``early_stop_accuracy`` (0.99).  The test set is scored once, with the
weights of the best validation accuracy.  For the models built on the Palimpsa op the test pass also returns
the last layer's output variance, and :func:`palimpsa.mqar.report.variance_auroc` scores how well it flags
wrong answers (metaplastic models; their twins without metaplasticity, whose importance never moves, are the
control).

With a ``checkpoint_path`` a run saves its whole training state at every validation (atomically) and, when the
file exists at the start, continues from it: a run stopped by a deadline or killed with its machine resumes where
it last validated and follows exactly the trajectory it would have followed uninterrupted.  Ctrl-C (inside
:func:`palimpsa.train.interrupt.stop_on_interrupt`) stops a run like a deadline, with stop_reason "interrupted".

Optimiser, schedule, autocast and the checkpoint format are the LM trainer's (``palimpsa.train``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from palimpsa.layers.modules import compiled_blocks
from palimpsa.mqar.data import IGNORE_INDEX, make_splits
from palimpsa.mqar.lockstep import LockstepMember
from palimpsa.mqar.models import (VARIANCE_MODELS, MQARModel, MQARModelConfig, count_parameters,
                                  palimpsa_op_backend, recurrent_state_bytes)
from palimpsa.mqar.report import variance_auroc
from palimpsa.train.checkpoint import CheckpointError, load_training_state, save_training_state
from palimpsa.train.interrupt import stop_requested
from palimpsa.train.optim import build_optimizer, warmup_cosine_factor
from palimpsa.train.precision import autocast_context

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
    to FIT_AT_STEP are timed, the planned total is cut to the steps that fit, and that end before the deadline
    of a run given one (a sweep's time budget; the record keeps the steps
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

        self.model_config()  # a bad model name or importance_groups fails here, not inside a worker

    def model_config(self) -> MQARModelConfig:
        """The architecture; ``model`` may name importance groups (e.g. "palimpsa_g1", see parse_model_name)."""
        return MQARModelConfig.from_model_name(self.model, vocab_size=self.vocab_size, d_model=self.d_model,
                                               n_layers=self.n_layers, num_heads=self.num_heads,
                                               head_k_dim=self.head_k_dim, head_v_dim=self.head_v_dim, mlp=self.mlp,
                                               gdn_backend=self.gdn_backend)

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
        with autocast_context(device, amp):
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
              checkpoint_path: Optional[str | os.PathLike] = None,
              lockstep: Optional[LockstepMember] = None, compile_blocks: bool = False) -> dict:
    """Train one run and return its result record (see the module docstring for the protocol).

    ``deadline`` (a time.time() value) stops training early with stop_reason "deadline" (a sweep's budget).
    ``on_eval`` is called after every validation with {run_id, model, seq_len, lr, seed, step, planned_steps,
    loss, val_accuracy, seconds} (a sweep logs it, so that runs in progress can be watched).
    ``op_backend`` forces the Palimpsa op's backend ("torch" or "triton"; "auto": the op decides); it changes
    speed, not the math, so it is recorded but is not part of the run's identity.
    ``checkpoint_path``: save the training state there at every validation and resume from it when it exists
    (see the module docstring); the file is removed once the run ends, unless a deadline stopped it.
    ``lockstep``: this run's place in a group of runs training at once (see :mod:`palimpsa.mqar.lockstep`): it
    keeps pace with the group after every step, and a time-limited run takes the group's fitted length.
    ``compile_blocks``: run every block through ``torch.compile`` on CUDA (fewer, fused kernels: a step of these
    small models is mostly kernel launches); like op_backend it changes speed, not the math, and is recorded
    ("compile") but is not part of the run's identity.

    Returns a dict with model, seq_len, num_kv_pairs, d_model, lr, seed, epochs (completed, fractional),
    steps, val_accuracy, test_accuracy, state_bytes (recurrent state per layer), importance_groups (G of a
    metaplastic model, V for the paper's one gate per value channel; None for the others), seconds, device, and also
    run_id, planned_steps, stop_reason, num_parameters, variance_auroc (models in VARIANCE_MODELS; None
    when undefined), history ([step, train loss, validation accuracy] at each validation), seconds_per_step
    (training steps after the first 5, validations excluded), op_backend, resumed_at_steps (the steps it
    resumed from checkpoints at), lockstep_runs (the size of its lockstep group, None without one) and the whole
    config.
    """
    checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
    try:
        with palimpsa_op_backend(op_backend), contextlib.ExitStack() as stack:
            if compile_blocks:
                stack.enter_context(compiled_blocks(True))
            record = _train(config, torch.device(device), progress, progress_position, deadline, on_eval,
                            checkpoint_path, lockstep)
    finally:
        if lockstep is not None:  # a failed run must not be waited for
            lockstep.finish()
    record["op_backend"] = op_backend
    record["compile"] = compile_blocks
    return record


CHECKPOINT_KIND = "mqar-run"


def load_checkpoint(path: Path, config: RunConfig) -> dict:
    """The training state saved at ``path`` for the run ``config``; CheckpointError (a ValueError) when the file
    cannot be read, is not an MQAR run checkpoint, or belongs to another run."""
    state = load_training_state(path, CHECKPOINT_KIND)
    if state.get("run_id") != run_id(config):
        raise CheckpointError(f"checkpoint {path} belongs to run {state.get('run_id')!r}, not to {run_id(config)!r}")
    return state


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves and a resumed run restores."""

    step: int
    total: int  # planned steps (a time-limited run cuts it once, see TimeLimitFit)
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "state": None, "step": 0})
    history: list = field(default_factory=list)  # (step, train loss of that step, validation accuracy)
    loss: float = float("nan")  # training loss at the last validation
    resumed_at: list = field(default_factory=list)  # steps this run resumed from checkpoints at


@dataclass
class Clock:
    """Wall-clock starts of the record's seconds and of training (both moved back by a resumed run's past)."""

    started: float = field(default_factory=time.time)
    train_started: float = field(default_factory=time.time)


@dataclass
class StepTimer:
    """Seconds per training step: the steps after this process's first WARMUP_UNTIMED_STEPS (compilation,
    autotuning), validations excluded, summed over every part of a resumed run."""

    timed_from: int = 0
    started: Optional[float] = None
    eval_seconds: float = 0.0  # validation time since ``started``
    earlier_seconds: float = 0.0  # timed training before the last resume
    earlier_steps: int = 0

    def begin(self, step: int, total: int) -> None:
        self.timed_from = min(step + WARMUP_UNTIMED_STEPS, total - 1)

    def after_step(self, step: int, device: torch.device) -> None:
        if step == self.timed_from:
            _synchronize(device)
            self.started = time.time()

    def add_validation(self, seconds: float) -> None:
        if self.started is not None:
            self.eval_seconds += seconds

    def totals(self, step: int) -> tuple[float, int]:
        """(seconds, steps) of timed training up to ``step``, earlier parts included."""
        if self.started is None or step <= self.timed_from:
            return self.earlier_seconds, self.earlier_steps
        return (self.earlier_seconds + time.time() - self.started - self.eval_seconds,
                self.earlier_steps + step - self.timed_from)


@dataclass
class TimeLimitFit:
    """Fitting a time-limited run into ``time_limit_s``: steps ``probe_from`` to ``fit_at`` are timed, then the
    planned total is cut to the steps that fit (once; ``fitted``)."""

    time_limit_s: Optional[float]
    probe_from: int
    fit_at: int
    fitted: bool = False
    probe_start: float = 0.0
    probe_eval_seconds: float = 0.0  # StepTimer.eval_seconds when the probe started

    def restart_after_resume(self, step: int) -> None:
        """A run stopped inside the probe probes again once this process has warmed up (the fit moves later by
        as much; before it the schedule is the warm-up when warmup_steps covers it)."""
        if self.time_limit_s is not None and not self.fitted and step >= FIT_PROBE_START:
            self.probe_from = step + WARMUP_UNTIMED_STEPS
            self.fit_at = max(FIT_AT_STEP, self.probe_from + FIT_AT_STEP - FIT_PROBE_START)

    def after_step(self, step: int, device: torch.device, eval_seconds: float) -> None:
        if step == self.probe_from:
            _synchronize(device)
            self.probe_start, self.probe_eval_seconds = time.time(), eval_seconds

    def due(self, step: int, total: int) -> bool:
        return self.time_limit_s is not None and not self.fitted and step == self.fit_at and step < total

    def fit(self, config: RunConfig, step: int, total: int, eval_every: int, probe_end: float, eval_seconds: float,
            validation_seconds: float, elapsed: float, deadline_left: Optional[float] = None) -> int:
        """The new total: the most steps that fit in what is left of the time limit (and before the deadline,
        ``deadline_left`` seconds away, when there is one), counting the validations every ``eval_every`` steps
        and the final test pass (each timed from this one validation of ``validation_seconds``), never fewer than
        ``step`` nor more than ``total``.  ``probe_end``: when the probe's training ended; ``eval_seconds``:
        StepTimer.eval_seconds then."""
        probe_train = probe_end - self.probe_start - (eval_seconds - self.probe_eval_seconds)
        seconds_per_step = probe_train / (self.fit_at - self.probe_from)
        self.fitted = True
        test_seconds = validation_seconds * config.num_test / config.num_validation
        time_left = self.time_limit_s - elapsed
        if deadline_left is not None:  # a run that would still be going at the deadline would not be recorded
            time_left = min(time_left, deadline_left)
        left = FIT_SAFETY * time_left - test_seconds
        per_step = seconds_per_step + validation_seconds / eval_every
        return max(step, min(total, step + int(left / per_step)))


def _batch_positions(config: RunConfig, order_gen: torch.Generator, device: torch.device,
                     resumed_epoch: Optional[tuple[torch.Tensor, int]]):
    """Endless (order, start): the batch ``order[start:start + batch_size]`` of each step.  A new random order
    each epoch; a resumed run first finishes the epoch its checkpoint was saved in (``resumed_epoch``)."""
    if resumed_epoch is not None:
        order, first = resumed_epoch
        for start in range(first, config.num_train, config.batch_size):
            yield order, start
    while True:
        order = torch.randperm(config.num_train, generator=order_gen).to(device)
        for start in range(0, config.num_train, config.batch_size):
            yield order, start


def _batch(train_x: torch.Tensor, train_y: torch.Tensor, train_q: Optional[torch.Tensor], idx: torch.Tensor):
    """Inputs [B, L], query positions ([B, Q] index or [B, L] bool mask) and their targets [B*Q] of rows ``idx``."""
    x, y = train_x[idx], train_y[idx]
    if train_q is not None:
        positions = train_q[idx]
        return x, positions, y.gather(1, positions).reshape(-1)
    positions = y != IGNORE_INDEX
    return x, positions, y[positions]


def _training_step(model: MQARModel, optimizer: torch.optim.Optimizer, batch: tuple, lr: float, amp: str,
                   device: torch.device, check_finite: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Forward, loss and backward of one batch, then the optimiser step at ``lr``.  Returns (loss, isfinite(loss),
    stepped): with ``check_finite`` (one device sync) a non-finite loss skips the optimiser step."""
    x, positions, targets = batch
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast_context(device, amp):
        logits = model(x, positions=positions)
    loss = F.cross_entropy(logits.float(), targets)
    finite = torch.isfinite(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if check_finite and not bool(finite):
        return loss, finite, False
    optimizer.step()
    return loss, finite, True


def _validate(model: MQARModel, validation: tuple, config: RunConfig, run: RunState) -> tuple[float, tuple]:
    """Validation accuracy at ``run.step``; keeps the best weights and the history in ``run``.  Returns
    (accuracy, (best, history) as they were before this validation)."""
    accuracy = evaluate(model, *validation, config.batch_size, config.amp)["accuracy"]
    before = (run.best, list(run.history))
    if accuracy > run.best["accuracy"]:
        run.best = {"accuracy": accuracy, "state": copy.deepcopy(model.state_dict()), "step": run.step}
    run.history.append((run.step, round(run.loss, 4), round(accuracy, 4)))
    return accuracy, before


def _resume(path: Path, config: RunConfig, device: torch.device, model: MQARModel,
            optimizer: torch.optim.Optimizer, order_gen: torch.Generator, run: RunState, fit: TimeLimitFit,
            timer: StepTimer, clock: Clock) -> tuple[torch.Tensor, int]:
    """Restore a run from its checkpoint; returns the (order, next batch start) of the epoch it was saved in."""
    saved = load_checkpoint(path, config)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    order_gen.set_state(saved["order_generator"])
    run.step, run.total, run.best, run.loss = saved["step"], saved["total"], saved["best"], saved["loss"]
    run.history = [tuple(h) for h in saved["history"]]
    run.resumed_at = saved["resumed_at_steps"] + [run.step]
    fit.fitted = saved["fitted"]
    fit.restart_after_resume(run.step)
    clock.started -= saved["seconds"]  # the record's seconds count the earlier part too
    clock.train_started -= saved["train_seconds"]
    timer.earlier_seconds, timer.earlier_steps = saved["timed_seconds"], saved["timed_steps"]
    if saved["device_type"] != device.type:
        warnings.warn(f"checkpoint {path} was saved on {saved['device_type']} and resumes on {device.type}: "
                      f"precision (amp={config.amp!r}) and kernels may differ from the first part", stacklevel=4)
    tqdm.write(f"{_describe(config)}: resumed from step {run.step} ({path})", file=sys.stderr)
    return saved["order"].to(device), saved["next_batch_start"]


def _save(path: Path, config: RunConfig, device: torch.device, run: RunState, kept: tuple, model: MQARModel,
          optimizer: torch.optim.Optimizer, order_gen: torch.Generator, order: torch.Tensor, next_batch_start: int,
          fit: TimeLimitFit, timer: StepTimer, clock: Clock) -> None:
    """Checkpoint the run after ``run.step``; ``kept`` = (best, history) to resume with."""
    timed_seconds, timed_steps = timer.totals(run.step)
    save_training_state(path, CHECKPOINT_KIND, {
        "run_id": run_id(config), "device_type": device.type, "step": run.step, "total": run.total,
        "fitted": fit.fitted, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "order_generator": order_gen.get_state(), "order": order.cpu(), "next_batch_start": next_batch_start,
        "best": kept[0], "history": kept[1], "loss": run.loss, "seconds": time.time() - clock.started,
        "train_seconds": time.time() - clock.train_started, "resumed_at_steps": run.resumed_at,
        "timed_seconds": timed_seconds, "timed_steps": timed_steps})


def _describe(config: RunConfig) -> str:
    return f"{config.model} L={config.seq_len} kv={config.num_kv_pairs} lr={config.lr:g} s={config.seed}"


def _train(config: RunConfig, device: torch.device, progress: bool, progress_position: int,
           deadline: Optional[float], on_eval: Optional[Callable[[dict], None]],
           checkpoint_path: Optional[Path], lockstep: Optional[LockstepMember]) -> dict:
    """The body of :func:`train_run`, top to bottom: set up (or resume), then step and validate until the run
    ends, then test the best validated weights."""
    clock = Clock()
    splits = make_splits(config.vocab_size, config.seq_len, config.num_kv_pairs, config.num_train,
                         config.num_validation, config.num_test, config.seed, config.power_a)
    torch.manual_seed(config.seed)
    model = MQARModel(config.model_config()).to(device)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, betas=(0.9, 0.95),
                                fused=device.type == "cuda")
    per_epoch, total = planned_steps(config)
    eval_every = config.eval_every or per_epoch
    train_x, train_y = (t.to(device) for t in splits.train)
    # the query positions of every training example, found once: the steps then never wait for the device
    train_q = query_index(train_y)
    order_gen = torch.Generator().manual_seed(config.seed)

    run = RunState(step=0, total=total)
    clock.train_started = time.time()
    fit = TimeLimitFit(config.time_limit_s, FIT_PROBE_START, FIT_AT_STEP)
    timer = StepTimer()
    resumed_epoch = None
    if checkpoint_path is not None and checkpoint_path.exists():
        resumed_epoch = _resume(checkpoint_path, config, device, model, optimizer, order_gen, run, fit, timer,
                                clock)
    bar = tqdm(total=run.total, initial=run.step, desc=_describe(config), disable=not progress,
               position=progress_position, leave=progress_position == 0, dynamic_ncols=True, mininterval=1.0)
    timer.begin(run.step, run.total)
    if lockstep is not None:
        lockstep.start(run.step, will_fit=fit.time_limit_s is not None and not fit.fitted and run.total > fit.fit_at)
    batches = _batch_positions(config, order_gen, device, resumed_epoch)
    stop_reason = "planned_steps"
    non_finite = None  # device flag: a non-finite training loss since the start
    while run.step < run.total:
        order, start = next(batches)
        lr = config.lr * warmup_cosine_factor(run.step, config.warmup_steps, run.total, 0.0)
        # on the GPU a non-finite loss is noticed at the next validation (one device sync there, none per step);
        # the test pass then uses the best validated weights, which were finite
        batch = _batch(train_x, train_y, train_q, order[start:start + config.batch_size])
        loss, finite, stepped = _training_step(model, optimizer, batch, lr, config.amp, device,
                                               check_finite=run.step == 0 or device.type != "cuda")
        non_finite = ~finite if non_finite is None else non_finite | ~finite
        if not stepped:
            stop_reason = "non_finite_loss"
            break
        run.step += 1
        bar.update(1)
        timer.after_step(run.step, device)
        interrupted = stop_requested()
        out_of_time = deadline is not None and time.time() > deadline
        fit.after_step(run.step, device, timer.eval_seconds)
        fit_now = fit.due(run.step, run.total)
        if lockstep is not None:
            lockstep.after_step(run.step)
        # the validations every run makes; a deadline's (or Ctrl-C's) extra one is scored for the stopped run's
        # record but kept out of the state it resumes from, so that the resumed run matches an uninterrupted one
        scheduled = run.step % eval_every == 0 or run.step == run.total or fit_now
        if not (scheduled or out_of_time or interrupted):
            continue
        run.loss = loss.item()  # waits for the queued steps
        eval_started = time.time()
        eval_seconds_at_probe_end = timer.eval_seconds
        if bool(non_finite):
            stop_reason = "non_finite_loss"
            break
        val, before = _validate(model, splits.validation, config, run)
        timer.add_validation(time.time() - eval_started)
        if on_eval is not None:
            on_eval({"run_id": run_id(config), "model": config.model, "seq_len": config.seq_len, "lr": config.lr,
                     "seed": config.seed, "step": run.step, "planned_steps": run.total, "loss": round(run.loss, 4),
                     "val_accuracy": round(val, 4), "seconds": round(time.time() - clock.started, 1)})
        if fit_now:
            run.total = fit.fit(config, run.step, run.total, eval_every, eval_started, eval_seconds_at_probe_end,
                                time.time() - eval_started, time.time() - clock.train_started,
                                None if deadline is None else deadline - time.time())
            if lockstep is not None:
                run.total = lockstep.agree(run.total)
            bar.total = run.total
            bar.refresh()
        bar.set_postfix(loss=f"{run.loss:.3f}", val_acc=f"{val:.3f}")
        if checkpoint_path is not None:
            kept = (run.best, run.history) if scheduled else before
            _save(checkpoint_path, config, device, run, kept, model, optimizer, order_gen, order,
                  start + config.batch_size, fit, timer, clock)
        if scheduled and val > config.early_stop_accuracy:
            stop_reason = "early_stop"
            break
        if interrupted or out_of_time:
            stop_reason = "interrupted" if interrupted else "deadline"
            break
    bar.close()
    if lockstep is not None:
        lockstep.finish()
    _synchronize(device)
    timed_seconds, timed_steps = timer.totals(run.step)

    if run.best["state"] is not None:
        model.load_state_dict(run.best["state"])
    with_variance = config.model_config().name in VARIANCE_MODELS
    test = evaluate(model, *splits.test, config.batch_size, config.amp, with_variance=with_variance)
    if checkpoint_path is not None and stop_reason not in ("deadline", "interrupted"):
        checkpoint_path.unlink(missing_ok=True)  # the run is over; a stopped run keeps it to resume
    return {
        "model": config.model,
        "seq_len": config.seq_len,
        "num_kv_pairs": config.num_kv_pairs,
        "d_model": config.d_model,
        "lr": config.lr,
        "seed": config.seed,
        "epochs": round(run.step / per_epoch, 4),
        "steps": run.step,
        "val_accuracy": max(run.best["accuracy"], 0.0) if run.best["state"] is not None else None,
        "test_accuracy": test["accuracy"],
        "state_bytes": recurrent_state_bytes(config.model_config(), config.seq_len),
        "importance_groups": config.model_config().groups,
        "seconds": round(time.time() - clock.started, 2),
        "seconds_per_step": None if timed_steps == 0 else round(timed_seconds / timed_steps, 5),
        "device": describe_device(device),
        "run_id": run_id(config),
        "planned_steps": run.total,
        "fitted_to_time_limit": fit.fitted,
        "best_step": run.best["step"],
        "stop_reason": stop_reason,
        "final_train_loss": run.loss,
        "num_parameters": count_parameters(model),
        "variance_auroc": test.get("variance_auroc"),
        "history": run.history,
        "resumed_at_steps": run.resumed_at,
        "lockstep_runs": lockstep.size if lockstep is not None else None,
        "config": asdict(config),
    }
