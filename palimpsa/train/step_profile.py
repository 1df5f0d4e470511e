"""One training step under the PyTorch profiler, split as ``palimpsa bench train`` splits its step: the kernels by
kind and the top kernels on a GPU (:func:`palimpsa.bench.breakdown.summarize_step`), so that a run's step can be
set beside the benchmark's (``scripts/gpu_train_throughput_check.sh`` does).  ``--profile-step N`` of
``palimpsa train`` writes it to ``OUT_DIR/profile_step.json``."""

from __future__ import annotations

import json
import os
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile

from palimpsa.bench.breakdown import summarize_step
from palimpsa.io import atomic_write_text

PROFILE_NAME = "profile_step.json"


def start_step_profile(device: torch.device) -> profile:
    """A started profiler (CPU, and CUDA on a GPU, whose queue is drained first so that the step starts alone)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(activities=activities, record_shapes=True)
    profiler.start()
    return profiler


def finish_step_profile(profiler: profile, device: torch.device, step: int, out_dir: str) -> Dict[str, object]:
    """Stop ``profiler`` after the step's work has finished; write and return its summary (with ``step``)."""
    on_device = device.type == "cuda"
    if on_device:
        torch.cuda.synchronize(device)
    profiler.stop()
    result = {"step": step, **summarize_step(profiler.events(), on_device)}
    atomic_write_text(os.path.join(out_dir, PROFILE_NAME), json.dumps(result, indent=2) + "\n")
    return result
