"""Launch parameters of the Palimpsa Triton kernels (defaults chosen on an H100; see results/bench/)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional


@dataclasses.dataclass
class KernelConfig:
    """fwd_*: the output kernel; bwd_*: the reverse sweep (None: chosen from the tile size)."""

    fwd_block_v: int = 32
    fwd_num_warps: int = 4
    bwd_block_v: int = 16
    bwd_num_warps: Optional[int] = 4
    bwd_target_programs: int = 2048  # backward units are sized to give about this many programs


CONFIG = KernelConfig()


@contextlib.contextmanager
def kernel_config(**changes) -> Iterator[KernelConfig]:
    """Temporarily change launch parameters (benchmarks and tuning): ``with kernel_config(fwd_block_v=64):``."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(KernelConfig)}
    if unknown:
        raise ValueError(f"unknown kernel config fields {sorted(unknown)}")
    saved = dataclasses.replace(CONFIG)
    for name, value in changes.items():
        setattr(CONFIG, name, value)
    try:
        yield CONFIG
    finally:
        for field in dataclasses.fields(KernelConfig):
            setattr(CONFIG, field.name, getattr(saved, field.name))
