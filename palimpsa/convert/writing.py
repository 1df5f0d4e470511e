"""Write a converted checkpoint atomically: everything goes to a temporary directory next to DST, then one rename."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Union

from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def check_destination(dst: Union[str, os.PathLike], overwrite: bool) -> Path:
    """Raise FileExistsError when ``dst`` exists (and is not an empty directory) unless ``overwrite``."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        if not dst.is_dir() or any(dst.iterdir()):
            raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    return dst


def copy_tokenizer(source: Union[str, os.PathLike], target_dir: Path) -> list:
    """Copy the tokenizer files of a local checkpoint directory, or save a Hub id's tokenizer when it has one.

    Returns the names written (empty when the source has no tokenizer).
    """
    if os.path.isdir(source):
        written = []
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, target_dir / name)
                written.append(name)
        return written
    try:  # a Hub id: the tokenizer is optional
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        logger.info("no tokenizer copied from %s: %s", source, err)
        return []
    return [Path(p).name for p in tokenizer.save_pretrained(target_dir)]


def save_atomically(model: PreTrainedModel, dst: Union[str, os.PathLike], tokenizer_source=None,
                    overwrite: bool = False) -> Path:
    """``model.save_pretrained`` into ``dst`` (plus the tokenizer of ``tokenizer_source``), all or nothing.

    The files are written into a temporary sibling directory that is renamed to ``dst`` at the end; on any error
    the temporary directory is removed and ``dst`` is left as it was.
    """
    dst = check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer_source is not None:
            copy_tokenizer(tokenizer_source, tmp)
        if dst.exists() and any(dst.iterdir()):
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)  # also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
