"""The records of a W&B run file (``run-<id>.wandb``), read independently of wandb's SDK.

The file is a LevelDB-style log (``:W&B`` header, then 32 KiB blocks of chunks with a
7-byte header: checksum, length, type) of ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def chunks(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a header
            position += BLOCK - position % BLOCK
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def read(path: Path) -> dict[str, Any]:
    """The run record, the history rows by step, the summary updates and the exit code."""
    from wandb.proto import wandb_internal_pb2 as pb

    found: dict[str, Any] = {"history": {}, "summary": {}, "run": None, "exit_code": None}
    for chunk in chunks(path):
        record = pb.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["run"] = record.run
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            found["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            for item in record.summary.update:
                found["summary"][item.key or "/".join(item.nested_key)] = json.loads(
                    item.value_json
                )
        elif kind == "exit":
            found["exit_code"] = record.exit.exit_code
    return found
