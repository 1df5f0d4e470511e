"""Atomic writes of checkpoints: a temporary file beside the target, flushed to disk, then renamed over it, so
that a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` (its folder is created) through a temporary file, fsync and os.replace."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
