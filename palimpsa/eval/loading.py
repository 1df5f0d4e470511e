"""Load a trained model and its tokenizer for evaluation (Hugging Face directory or a training run)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def resolve_model_dir(path: str) -> str:
    """``path`` itself if it holds a config.json, else ``<path>/model`` (what ``palimpsa train`` exports)."""
    for candidate in (path, os.path.join(path, "model")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise ValueError(f"model {path!r} is neither a Hugging Face model directory nor a training run directory "
                     "with an exported 'model/' folder")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model_and_tokenizer(path: str, tokenizer: Optional[str] = None, device: str = "auto",
                             dtype: str = "fp32"):
    """(model in eval mode on ``device``, tokenizer); ``tokenizer`` defaults to the model's directory."""
    from transformers import AutoModelForCausalLM

    from palimpsa.train.distributed import resolve_device
    from palimpsa.train.models import _register_known_models
    from palimpsa.train.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _register_known_models()
    model_dir = resolve_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    model.to(resolve_device(device)).eval()
    if tokenizer is None and not any(Path(model_dir, name).exists() for name in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer files in {model_dir}; pass --tokenizer (a Hugging Face tokenizer "
                         f"directory or id, or 'byte' for the byte-level tokenizer)")
    return model, load_tokenizer(tokenizer or model_dir)
