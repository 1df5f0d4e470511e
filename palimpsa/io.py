"""Files that survive a crash: atomic writes (a temporary file beside the target, flushed to disk, then renamed
over it, so that a crash leaves either the old file or the new one, never half of one), strict JSON lines, and a
reader of JSON lines that tolerates the torn last line an interrupted append leaves."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Iterator

import torch


def _temporary_beside(path: str) -> tuple[int, str]:
    """An open (fd, name) of a fresh temporary file in ``path``'s folder (created), unique per call."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = os.fspath(path)
    handle, temporary = _temporary_beside(path)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` (its folder is created) through a temporary file, fsync and os.replace."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def json_line(record: dict, sort_keys: bool = False) -> str:
    """``record`` as one line of strict JSON (a NaN or infinity becomes null), newline included."""
    return json.dumps(_finite_or_none(record), sort_keys=sort_keys, allow_nan=False) + "\n"


def iter_json_lines(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a JSON-lines file, in order.

    A last line without its newline that does not parse is the torn end of an interrupted append: it is
    skipped.  Any other line that does not parse raises ValueError naming the file and the line.
    """
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            if number == len(lines):  # no newline after it: torn by a crash mid-write
                return
            raise ValueError(f"{os.fspath(path)} line {number} is not JSON ({error})") from None


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (see :func:`iter_json_lines`); [] when it does not exist."""
    return list(iter_json_lines(path)) if os.path.exists(path) else []
