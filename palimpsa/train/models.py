"""Build a causal language model from a preset name, a JSON config file or a Hugging Face config directory.

Any model registered with ``transformers``' Auto classes works: this project's (``palimpsa.models``
registers them on import) and, where installed, fla's.  Presets are the JSON files in ``palimpsa/configs``
(the paper's sizes) and ``palimpsa/train/presets`` (small sizes for demos and quick comparisons).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from torch import nn

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")  # small training sizes
VOCAB_MULTIPLE = 64


def _preset_paths() -> Dict[str, str]:
    paths = {}
    for directory in (PRESET_DIR, CONFIG_DIR):  # the paper's sizes win a name clash
        if os.path.isdir(directory):
            paths.update({name[:-5]: os.path.join(directory, name) for name in os.listdir(directory)
                          if name.endswith(".json")})
    return paths


def available_presets() -> List[str]:
    """Names accepted as ``model``: ``palimpsa/configs/*.json`` (paper sizes) and ``palimpsa/train/presets``."""
    return sorted(_preset_paths())


def _register_known_models() -> None:
    """Import the packages that register model types with the Auto classes."""
    try:
        import palimpsa.models  # noqa: F401  (palimpsa, meta_mamba2, gated_deltanet_lm)
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("palimpsa"):
            raise
    try:
        import fla  # noqa: F401  (optional: registers fla's models, e.g. gated_deltanet)
    except ImportError:
        pass


def load_model_config_dict(spec: str) -> Dict[str, Any]:
    """The config dict of a preset name or JSON file (directories: see :func:`build_model`)."""
    path = spec if os.path.isfile(spec) else _preset_paths().get(spec, "")
    if not os.path.isfile(path):
        raise ValueError(f"model {spec!r} is neither a JSON file, a config directory nor a preset "
                         f"(presets: {available_presets()})")
    with open(path, encoding="utf-8") as handle:
        values = json.load(handle)
    if "model_type" not in values:
        raise ValueError(f"model config {path} has no 'model_type' field")
    return values


def padded_vocab_size(tokenizer_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The tokenizer's size rounded up to a multiple of ``multiple`` (faster matmuls, same tokens)."""
    return -(-tokenizer_size // multiple) * multiple


def build_model_config(spec: str, vocab_size: Optional[int] = None, overrides: Optional[Dict[str, Any]] = None,
                       tokenizer=None):
    """A ``PretrainedConfig`` for ``spec`` with ``overrides`` applied, ``vocab_size`` set when given and the
    special token ids (bos, eos; pad = eos) taken from ``tokenizer`` when given."""
    from transformers import AutoConfig

    _register_known_models()
    if os.path.isdir(spec):
        config = AutoConfig.from_pretrained(spec)
    else:
        values = load_model_config_dict(spec)
        model_type = values.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **values)
        except ValueError as err:
            raise ValueError(f"model_type {model_type!r} of model {spec!r} is not registered "
                             "(is the package that defines it installed?)") from err
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"model_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    if tokenizer is not None:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return config


def build_model(spec: str, vocab_size: Optional[int] = None, overrides: Optional[Dict[str, Any]] = None,
                tokenizer=None) -> nn.Module:
    """A freshly initialised ``AutoModelForCausalLM`` for ``spec`` (see :func:`build_model_config`)."""
    from transformers import AutoModelForCausalLM

    config = build_model_config(spec, vocab_size, overrides, tokenizer)
    return AutoModelForCausalLM.from_config(config)
