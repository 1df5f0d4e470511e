"""``TrainConfig``: every knob of a language-model training run, in one dataclass (nanoGPT style)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

PARALLEL_STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("bf16", "fp32")


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

    Batch: one optimizer step consumes ``batch_size * grad_accum * world_size`` packs (the global batch);
    the loss is the mean over every predicted token of the global batch, whatever the split across ranks.

    Stopping early: ``stop_at_step`` or ``time_limit_s`` (wall clock of this invocation) end the run with a
    checkpoint; running the same command again resumes it.  The schedule always follows ``max_steps``.
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
    precision: str = "bf16"
    parallel: str = "ddp"
    compile: bool = False
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
        self.betas = tuple(self.betas)
        self.data = list(self.data)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        positive_ints = ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
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
        if not isinstance(self.model_overrides, dict):
            raise TypeError(f"model_overrides must be a dict, got {type(self.model_overrides).__name__}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be a bool, got {type(self.compile).__name__}")
        if not self.text_field:
            raise ValueError("text_field must be a non-empty column name")

    @property
    def packs_per_rank_step(self) -> int:
        """Packs one rank consumes per optimizer step."""
        return self.batch_size * self.grad_accum

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))
