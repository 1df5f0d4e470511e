"""Checkpoint to checkpoint conversion (SRC directory or Hub id -> DST directory), verified, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

from palimpsa.convert.mamba2 import mamba2_to_meta_mamba2
from palimpsa.convert.metaplastic import CONVERTED_IMPORTANCE_SCALE, relative_logits_change
from palimpsa.convert.notpalimpsa import notpalimpsa_to_palimpsa
from palimpsa.convert.loading import load_checkpoint
from palimpsa.convert.writing import check_destination, save_atomically

# kind -> (converter, source model_type, name of the source in messages)
CONVERTERS = {
    "mamba2": (mamba2_to_meta_mamba2, "mamba2", "Mamba2"),
    "palimpsa": (notpalimpsa_to_palimpsa, "palimpsa", "NotPalimpsa"),
}

DEFAULT_TOLERANCE = 1e-5


def _source_class(kind: str):
    if kind == "mamba2":
        from transformers import Mamba2ForCausalLM

        return Mamba2ForCausalLM
    from palimpsa.models.palimpsa import PalimpsaForCausalLM

    return PalimpsaForCausalLM


def convert_checkpoint(
    kind: str,
    src: Union[str, os.PathLike],
    dst: Union[str, os.PathLike],
    importance_rank: Optional[int] = None,
    importance_scale: Union[float, str] = CONVERTED_IMPORTANCE_SCALE,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
    seed: int = 0,
    importance_groups: Optional[int] = None,
) -> Dict[str, object]:
    """Convert the checkpoint ``src`` (a directory or Hub id) of ``kind`` ("mamba2" or "palimpsa") into ``dst``.

    With ``verify`` the converted model's logits on random tokens are compared with the source's and the
    conversion fails (writing nothing) when max |difference| / max |logits| exceeds ``tolerance``.
    Tokenizer files are copied when present.  Every check runs before anything is written; ``dst`` is then
    written all at once (a temporary sibling directory renamed into place).

    Returns:
        {"kind", "src", "dst", "relative_logits_change" (None without verify), "importance_scale" (the c used)}.
    """
    if kind not in CONVERTERS:
        raise ValueError(f"kind must be one of {sorted(CONVERTERS)}, got {kind!r}")
    if not (tolerance > 0):
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    check_destination(dst, overwrite)  # fail early, before any loading
    converter, model_type, what = CONVERTERS[kind]
    source = load_checkpoint(src, _source_class(kind), model_type, what)
    model = converter(source, importance_rank=importance_rank, importance_scale=importance_scale, seed=seed,
                      importance_groups=importance_groups)
    importance_scale = model.config.importance_scale_init  # the value used (calibrated when "auto")
    change = None
    if verify:
        change = relative_logits_change(source, model, model.config.vocab_size)
        if not change <= tolerance:
            raise ValueError(f"the converted model's logits differ from the source's by {change:.3g} (relative), "
                             f"above the tolerance {tolerance:g}; pass a more negative importance_scale "
                             f"(now {importance_scale})")
    save_atomically(model, dst, tokenizer_source=src, overwrite=overwrite)
    return {"kind": kind, "src": str(src), "dst": str(Path(dst)), "relative_logits_change": change,
            "importance_scale": importance_scale}
