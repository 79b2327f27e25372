"""Files written so that a kill at any instant leaves either the old or the new file.

Every file a run depends on is written to a temporary file in the same folder, flushed,
fsynced and renamed over the old one, never torn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def write_text(path: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    atomic_write(path, lambda handle: handle.write(data))


def save_tensors(path: Path, data: dict[str, Any]) -> None:
    """A dict of tensors and plain values, loadable with ``weights_only=True``."""
    atomic_write(path, lambda handle: torch.save(data, handle))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None if the file is missing, torn or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
