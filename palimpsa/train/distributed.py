"""Distributed training through PyTorch's own engine: torchrun sets the environment, we wrap the model.

Launch: ``torchrun --nproc-per-node N -m palimpsa train ...``.  Without torchrun's variables the run is a
single process.  ``ddp`` replicates the model (DistributedDataParallel); ``fsdp`` shards parameters,
gradients and optimizer state with FSDP2's ``fully_shard`` (each block, then the root).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    """Where this process stands: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this rank's GPU when CUDA is available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU), or run as one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=resolved if resolved.type == "cuda" else None)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def block_modules(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks to shard one by one: the elements of the model's largest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(biggest)


def wrap_model(model: nn.Module, context: DistributedContext, strategy: str) -> nn.Module:
    """DDP ("ddp", or "auto") or FSDP2 ("fsdp") wrapping for a multi-process run; the model itself otherwise."""
    if not context.is_distributed:
        return model
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in block_modules(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"parallel strategy must be 'auto', 'ddp' or 'fsdp', got {strategy!r}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool):
    """Context manager: skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks (``value`` itself in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
