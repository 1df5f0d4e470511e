"""Checkpoints that resume exactly: model, optimizer, scheduler, data position and every rank's RNG.

One file, ``<out_dir>/checkpoint.pt``, written by rank 0 to a temporary name and moved into place with
``os.replace`` (a crash never leaves a half-written checkpoint).  Model and optimizer are saved as full
(unsharded) state dicts through ``torch.distributed.checkpoint.state_dict``, so a checkpoint written by
one process, DDP or FSDP2 loads into any of them.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from palimpsa.io import atomic_torch_save

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def checkpoint_path(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINT_NAME)


def capture_rng_state() -> Dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (if used) CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective when distributed)."""
    mine = capture_rng_state()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    states: List[Optional[Dict[str, Any]]] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states  # type: ignore[return-value]


def full_model_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on every rank (collective under FSDP2)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int,
                    data_state: Dict[str, int], config: Dict[str, Any], is_main: bool) -> None:
    """Write the training state after ``step`` optimizer steps.  Every rank must call it (collectives)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    rng_states = _gather_rng_states()
    if is_main:
        atomic_torch_save({
            "format_version": FORMAT_VERSION,
            "step": step,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "data": dict(data_state),
            "rng": rng_states,
            "config": config,
        }, path)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    rank: int = 0, check_config: Optional[Callable[[Dict[str, Any]], None]] = None
                    ) -> Dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; return ``{"step", "data", "config"}``.

    ``check_config(saved_config)`` runs before anything is restored (raise there to refuse the checkpoint).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format_version')!r}")
    if check_config is not None:
        check_config(state["config"])
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    restore_rng_state(rng[rank % len(rng)])  # a run resumed on another world size reuses states cyclically
    return {"step": int(state["step"]), "data": state["data"], "config": state["config"]}
