"""Training metrics: JSON lines always; Weights & Biases or TensorBoard only when asked for (and installed)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from palimpsa.io import atomic_write_text, json_line, read_json_lines

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl file, in order (a torn last line, left by a crash mid-write, is skipped)."""
    return read_json_lines(path)


def _truncate_after(path: str, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a run resumes from) and a torn last line,
    atomically."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json_line(r) for r in kept))


class MetricsLogger:
    """Append one strict JSON object per logged step to ``<out_dir>/metrics.jsonl`` (rank 0 only; a non-finite
    number is written as null).

    Args:
        out_dir: run directory.
        resume_step: a resumed run's starting step (later records of the interrupted run are dropped);
            None starts a fresh file.
        wandb_project: log to this W&B project too (needs ``wandb``).
        tensorboard: log to ``<out_dir>/tensorboard`` too (needs ``tensorboard``).
        config: the run's configuration, given to W&B.
    """

    def __init__(self, out_dir: str, resume_step: Optional[int] = None, wandb_project: Optional[str] = None,
                 tensorboard: bool = False, config: Optional[Dict[str, Any]] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, METRICS_NAME)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            _truncate_after(self.path, resume_step)
        self._wandb = None
        self._tensorboard = None
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("wandb_project was given but wandb is not installed (pip install wandb)") from err
            self._wandb = wandb.init(project=wandb_project, config=config, dir=out_dir)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("tensorboard=True but tensorboard is not installed "
                                  "(pip install tensorboard)") from err
            self._tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json_line(record))
        step = record["step"]
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()
