"""Checkpoints that resume exactly, in one format for every trainer (the LM trainer and MQAR runs).

A checkpoint is one ``torch.save`` file of plain containers and tensors, written atomically
(:func:`palimpsa.io.atomic_torch_save`: a crash never leaves a half-written one) and read back with
``weights_only=True`` (nothing in it is unpickled as code).  Its header says what it is
(``format``, ``version``, ``kind``: "lm" or "mqar-run"), so a file of another kind or a foreign file is refused
with a one-line :class:`CheckpointError` naming it.

The LM trainer's checkpoint, ``<out_dir>/checkpoint.pt``, holds model, optimizer, scheduler, data position and
every rank's RNG; model and optimizer are full (unsharded) state dicts through
``torch.distributed.checkpoint.state_dict``, so a checkpoint written by one process, DDP or FSDP2 loads into any
of them.
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
FORMAT = "palimpsa-training-state"
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not a palimpsa training state, or of another run."""


def checkpoint_path(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINT_NAME)


def save_training_state(path: str | os.PathLike, kind: str, state: Dict[str, Any]) -> None:
    """Write ``state`` (plain containers, numbers, strings and tensors only) as a ``kind`` checkpoint, atomically."""
    atomic_torch_save({"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, **state}, path)


def load_training_state(path: str | os.PathLike, kind: str) -> Dict[str, Any]:
    """The state saved by :func:`save_training_state` at ``path`` (tensors on the CPU).

    Raises CheckpointError (one line, naming the file) when it cannot be read with ``weights_only=True``, is not
    a palimpsa training state of this format version, or is of another kind.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types here (UnpicklingError, RuntimeError, EOFError, ...)
        reason = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {os.fspath(path)} could not be read ({type(error).__name__}: {reason}); "
                              "delete it to start the run over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{os.fspath(path)} is not a palimpsa training checkpoint; move it away or use "
                              "another output folder")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {os.fspath(path)} has format version {state.get('version')!r}, this "
                              f"palimpsa reads version {FORMAT_VERSION}; delete it to start the run over")
    if state.get("kind") != kind:
        raise CheckpointError(f"checkpoint {os.fspath(path)} is a {state.get('kind')!r} checkpoint, not a {kind!r} "
                              "one; use another output folder")
    return state


def capture_rng_state() -> Dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (if used) CUDA generator states, as plain values and tensors."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
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
        save_training_state(path, "lm", {
            "step": step,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "data": dict(data_state),
            "rng": rng_states,
            "config": config,
        })
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    rank: int = 0, check_config: Optional[Callable[[Dict[str, Any]], None]] = None
                    ) -> Dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; return ``{"step", "data", "config"}``.

    ``check_config(saved_config)`` runs before anything is restored (raise there to refuse the checkpoint).
    CheckpointError when the file is not an LM training checkpoint (see :func:`load_training_state`).
    """
    state = load_training_state(path, "lm")
    if check_config is not None:
        check_config(state["config"])
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    restore_rng_state(rng[rank % len(rng)])  # a run resumed on another world size reuses states cyclically
    return {"step": int(state["step"]), "data": state["data"], "config": state["config"]}
