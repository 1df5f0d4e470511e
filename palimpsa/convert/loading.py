"""Read a source model for a conversion: an instance, a local directory or a Hub id, checked before use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Type, Union

from transformers import AutoConfig, PreTrainedModel

Source = Union[PreTrainedModel, str, os.PathLike]


def load_checkpoint(source: Source, model_class: Type[PreTrainedModel], model_type: str, what: str) -> PreTrainedModel:
    """Return ``source`` as a ``model_class`` instance, loading it when it is a path or a Hub id.

    Raises TypeError for an instance of another class; ValueError when the checkpoint is not a ``model_type``
    checkpoint, or when weights are missing, unexpected or mis-shaped (nothing is silently re-initialised).
    """
    if isinstance(source, PreTrainedModel):
        if not isinstance(source, model_class):
            raise TypeError(f"source must be a {model_class.__name__} ({what}), got {type(source).__name__}")
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a {model_class.__name__}, a directory or a Hub id, "
                        f"got {type(source).__name__}")
    looks_like_path = str(source).startswith((".", "/", "~")) or str(source).count("/") > 1
    if not os.path.exists(os.path.expanduser(str(source))) and (isinstance(source, os.PathLike) or looks_like_path):
        raise FileNotFoundError(f"{source}: no such directory (expected a {what} checkpoint directory or a Hub id)")
    if isinstance(source, os.PathLike) or os.path.exists(source):
        path = Path(source)
        if not path.is_dir():
            raise ValueError(f"{source} is not a directory holding a {what} checkpoint")
        if not (path / "config.json").is_file():
            raise ValueError(f"{source} is not a {what} checkpoint: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{source} is not a readable {what} checkpoint: {err}") from err
    if getattr(config, "model_type", None) != model_type:
        raise ValueError(f"{source} is not a {what} checkpoint: its model_type is "
                         f"{getattr(config, 'model_type', None)!r}, expected {model_type!r}")
    try:
        # mismatched shapes are reported in ``info`` (and refused below) rather than raised without names
        model, info = model_class.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"could not load the {what} weights of {source}: {err}") from err
    problems = []
    for key in ("missing_keys", "unexpected_keys"):
        if info.get(key):
            problems.append(f"{key.replace('_', ' ')}: {sorted(map(str, info[key]))[:5]}")
    for entry in sorted(info.get("mismatched_keys") or (), key=str)[:5]:
        name, found, expected = (tuple(entry) + (None, None))[:3]
        shapes = f" has shape {tuple(found)}, expected {tuple(expected)}" if expected is not None else " mis-shaped"
        problems.append(f"weight {name}{shapes}")
    if problems:
        raise ValueError(f"the {what} checkpoint {source} does not match its config ({'; '.join(problems)})")
    return model
