"""``TrainConfig``: every knob of a language-model training run, in one dataclass (nanoGPT style)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from palimpsa.train.precision import PRECISIONS

PARALLEL_STRATEGIES = ("auto", "ddp", "fsdp")
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Any: "any value"}


def _matches(value: Any, kind: Any) -> bool:
    """Whether ``value`` has the type ``kind`` (a field annotation); a bool is no number, an int is a float."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin is typing.Union:
        return any(_matches(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(item, args[0]) for item in value)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_matches, value, args))
    if origin is dict:
        return isinstance(value, dict) and all(_matches(key, args[0]) for key in value)
    raise NotImplementedError(f"no type check for {kind!r}")


def _describe(kind: Any) -> str:
    """How an error names the type ``kind``: 'a number', 'a list of strings', 'an integer or null', ..."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        return " or ".join("null" if arg is type(None) else _describe(arg) for arg in args)
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "an object (dict) with string keys"
    return _KIND_NAMES.get(kind, repr(kind))


@dataclass
class TrainConfig:
    """A training run.  Defaults give a small offline demo; the CLI exposes every field.

    Model: ``model`` is a preset name from ``palimpsa/configs`` (e.g. ``palimpsa-170m``), a path to a JSON
    model config (with ``model_type``), or a Hugging Face config directory; ``model_overrides`` replaces
    config fields (e.g. ``{"metaplasticity": false}``).  ``vocab_size`` is taken from the tokenizer.

    Data: ``data`` lists local files, directories or glob patterns (.txt/.md = one document per file,
    .jsonl/.json = one document per line in ``text_field``, .parquet = one per row), or one
    ``hf:NAME[:CONFIG]`` entry for a Hugging Face dataset read in streaming mode.  Documents are packed,
    in order, into packs of exactly ``seq_len`` tokens; a document that does not fit continues in the next
    pack as a new sequence.

    Held-out loss: with ``eval_data`` (entries as in ``data``, read with the same ``text_field`` and ``hf_split``),
    the mean next-token loss over its first ``eval_packs`` packs (the same packs every time) is logged as
    ``val_loss`` at the step where the run stops and, when ``eval_every`` > 0, every ``eval_every`` steps.

    Batch: one optimizer step consumes ``batch_size * grad_accum * world_size`` packs (the global batch);
    the loss is the mean over every predicted token of the global batch, whatever the split across ranks.

    Hardware: ``precision`` "auto" autocasts to bf16 on CUDA and trains in float32 on the CPU; "bf16" autocasts to
    bf16 on any device (on a CPU: slow, for debugging); "fp32" never autocasts.  ``parallel`` "auto" is DDP under
    torchrun and one process without it; "ddp" or "fsdp" (FSDP2) need torchrun.

    Stopping early: ``stop_at_step``, ``time_limit_s`` (wall clock of this invocation) or Ctrl-C end the run with
    a checkpoint; running the same command again resumes it.  The schedule always follows ``max_steps``.
    """

    # model
    model: str = "palimpsa-tiny"
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    # data
    data: List[str] = field(default_factory=list)
    text_field: str = "text"
    hf_split: str = "train"
    tokenizer: str = "byte"
    append_eos: bool = True
    seq_len: int = 2048
    # held-out evaluation
    eval_data: List[str] = field(default_factory=list)
    eval_every: int = 0
    eval_packs: int = 32
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    # hardware
    device: str = "auto"
    precision: str = "auto"
    parallel: str = "auto"
    compile: bool = True  # CUDA only: CPU runs stay plain PyTorch
    # output
    out_dir: str = "runs/train"
    log_every: int = 10
    save_every: int = 0
    resume: bool = True
    stop_at_step: Optional[int] = None
    time_limit_s: Optional[float] = None
    export_hf: bool = True
    progress: bool = True
    wandb_project: Optional[str] = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # JSON has no tuples
            self.betas = tuple(self.betas)
        if isinstance(self.data, tuple):
            self.data = list(self.data)
        if isinstance(self.eval_data, tuple):
            self.eval_data = list(self.eval_data)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field: its type (a bool is no number, a string no list; floats
        finite), then its value."""
        for name, kind in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if not _matches(value, kind):
                raise ValueError(f"{name} must be {_describe(kind)}, got {value!r}")
        positive_ints = ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_packs")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_every", "seed", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.eval_every and not self.eval_data:
            raise ValueError(f"eval_every={self.eval_every} needs eval_data (held-out files to evaluate on)")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one input and one target), got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.parallel not in PARALLEL_STRATEGIES:
            raise ValueError(f"parallel must be one of {PARALLEL_STRATEGIES}, got {self.parallel!r}")
        if self.stop_at_step is not None and (not isinstance(self.stop_at_step, int) or self.stop_at_step < 1):
            raise ValueError(f"stop_at_step must be a positive integer or None, got {self.stop_at_step!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 seconds or None, got {self.time_limit_s!r}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got "
                                 f"{self.device!r}") from error
        if not self.out_dir:
            raise ValueError("out_dir must be a non-empty folder name")
        if not self.text_field:
            raise ValueError("text_field must be a non-empty column name")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**values)
