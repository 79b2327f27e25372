"""Atomic files and the checkpoint dict.

Every file a run depends on is written to a temporary file in the same folder, flushed,
fsynced and renamed over the old one, so a kill at any instant leaves either the old
or the new file, never a torn one.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from metacli.errors import MetacliError

FORMAT_VERSION = 1


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


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on the CPU with ``weights_only=True``: a checkpoint never runs code."""
    path = Path(path)
    if not path.is_file():
        raise MetacliError(
            f"No checkpoint at {path}. Set ckpt_path (or resume) to an existing "
            f"file, e.g. outputs/train/<date>/<time>/checkpoints/best.pt."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise MetacliError(f"Cannot read checkpoint {path}: {err}".splitlines()[0]) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "metacli":
        raise MetacliError(f"{path} is not a metacli checkpoint (no 'format': 'metacli' entry).")
    return checkpoint


def capture_rng(train_generator: torch.Generator) -> dict[str, Any]:
    """Every random state the run draws from, in types ``weights_only`` loading accepts."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "train_tasks": train_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        keys64 = torch.from_numpy(np.asarray(keys).astype("int64"))
        state["numpy"] = (name, keys64, pos, has_gauss, cached)
    except ImportError:
        pass
    return state


def restore_rng(state: dict[str, Any], train_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    train_generator.set_state(state["train_tasks"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np

            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        except ImportError:
            pass
