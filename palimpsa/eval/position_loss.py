"""Loss against token position over long documents: does the model use what it read long ago?

A model with a useful long memory keeps lowering its loss deep into a document; one that forgets levels
off early.  Each document contributes its first ``length`` tokens; documents shorter than that are skipped.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def per_position_loss(model, documents: Iterable[np.ndarray], length: int, *, batch_size: int = 1,
                      max_documents: Optional[int] = None, device: Optional[torch.device] = None) -> Dict:
    """Mean next-token loss at each position of the first ``length`` tokens of long documents.

    Args:
        model: causal LM returning ``.logits`` [B, T, vocab].
        documents: token id arrays [L_i] (documents with L_i < length are skipped).
        length: tokens per document window; positions 0..length-2 predict tokens 1..length-1.
        batch_size: documents per forward pass.
        max_documents: stop after this many documents.
        device: where to run (default: the model's device).

    Returns:
        {"length", "num_documents", "loss": [length - 1] list of mean losses (nats) per position}.
    """
    if length < 2:
        raise ValueError(f"length must be at least 2, got {length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = device or next(model.parameters()).device
    use_bf16 = device.type == "cuda"
    total = torch.zeros(length - 1, dtype=torch.float64, device=device)
    count = 0

    def run(batch: List[np.ndarray]) -> None:
        ids = torch.from_numpy(np.stack(batch)).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=ids).logits
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        total.add_(losses.view(len(batch), length - 1).sum(0).double())

    pending: List[np.ndarray] = []
    for tokens in documents:
        if len(tokens) < length:
            continue
        pending.append(np.asarray(tokens[:length], dtype=np.int64))
        count += 1
        if len(pending) == batch_size:
            run(pending)
            pending = []
        if max_documents is not None and count >= max_documents:
            break
    if pending:
        run(pending)
    if count == 0:
        raise ValueError(f"no document has at least {length} tokens")
    return {"length": length, "num_documents": count, "loss": (total / count).tolist()}


def binned(loss: List[float], bins: int = 32) -> Dict[str, List[float]]:
    """Mean loss in log-spaced position bins (positions 1-based): {"position", "loss"} for plotting."""
    positions = np.arange(1, len(loss) + 1)
    edges = np.unique(np.geomspace(1, len(loss) + 1, bins + 1).astype(int))
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (positions >= lo) & (positions < hi)
        if mask.any():
            centres.append(float(np.exp(np.log(positions[mask]).mean())))
            means.append(float(np.asarray(loss)[mask].mean()))
    return {"position": centres, "loss": means}


def plot_position_loss(curves: Dict[str, List[float]], path: str, title: str = "Loss by token position") -> str:
    """One line per model (log-binned), saved atomically to ``path`` (png/pdf/svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, loss in curves.items():
        points = binned(loss)
        axis.plot(points["position"], points["loss"], marker=".", label=name)
    axis.set_xscale("log")
    axis.set_xlabel("token position")
    axis.set_ylabel("next-token loss (nats)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, extension = os.path.splitext(path)
    temporary = f"{root}.tmp{os.getpid()}{extension}"
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def write_position_loss(result: Dict, out_dir: str, name: str = "position_loss", label: str = "model") -> Dict[str, str]:
    """``<name>.json`` (per-position losses and log bins) and ``<name>.png``, both atomic."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    temporary = f"{json_path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({**result, "binned": binned(result["loss"])}, handle, indent=1)
    os.replace(temporary, json_path)
    plot = plot_position_loss({label: result["loss"]}, os.path.join(out_dir, f"{name}.png"))
    return {"json": json_path, "plot": plot}
