"""Test fixtures as text: nested dicts, lists, tuples and tensors in JSON, exactly.

The repository tracks no binary files. Reference values and old-format checkpoints are
kept as JSON that this module turns back into the very objects ``torch.load`` gave: every
tensor with its dtype, shape and values (a float's ``repr`` round-trips, so float32 and
float64 come back bit for bit), dicts with their key types and order (``OrderedDict``
too), tuples apart from lists. Tests that need a ``.pt`` file write one into their tmp
folder (``materialize``).
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.float16,
          torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
          torch.bool)}  # fmt: skip


def encode(obj: Any) -> Any:
    """A JSON-able form of ``obj`` that ``decode`` turns back into an equal object."""
    if isinstance(obj, torch.Tensor):
        dtype = str(obj.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise TypeError(f"no text form for tensors of {obj.dtype}")
        values = obj.detach().cpu()
        if obj.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return {"tensor": dtype, "shape": list(obj.shape), "values": values.flatten().tolist()}
    if isinstance(obj, dict):
        kind = "OrderedDict" if isinstance(obj, OrderedDict) else "dict"
        return {kind: [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"no text form for {type(obj).__name__}")


def decode(data: Any) -> Any:
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "tensor" in data:
        dtype = DTYPES[data["tensor"]]
        source = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        values = torch.tensor(data["values"], dtype=source).to(dtype)
        return values.reshape(data["shape"])
    if "tuple" in data:
        return tuple(decode(v) for v in data["tuple"])
    (kind, pairs), *_ = data.items()
    out = OrderedDict() if kind == "OrderedDict" else {}
    for k, v in pairs:
        out[decode(k)] = decode(v)
    return out


def write(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(encode(obj), separators=(",", ":")) + "\n")


def read(path: Path) -> Any:
    return decode(json.loads(path.read_text()))


def materialize(source: Path, dest: Path) -> Path:
    """Copy the run folder ``source`` to ``dest``, each ``<name>.pt.json`` written as the
    ``<name>.pt`` that it stands for."""
    shutil.copytree(source, dest)
    for text in dest.rglob("*.pt.json"):
        torch.save(read(text), text.with_suffix(""))
        text.unlink()
    return dest
