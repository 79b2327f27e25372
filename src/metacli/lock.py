"""One writer per folder: an advisory lock that names its owner.

The operating system holds the lock (``flock`` on ``<folder>/.lock``) for as long as the
owning process lives, so a killed run never leaves a stale lock behind: its folder can be
resumed at once, while a live owner makes a second writer stop. The file itself records
who holds it (pid, host, start time, command), for the message the second writer prints.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import IO, Any

from metacli.errors import MetacliError

log = logging.getLogger(__name__)


def owner_text(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    return (
        f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} "
        f"(started {owner.get('started_at', '?')}: {owner.get('command', '?')})"
    )


class FolderLock:
    """``with FolderLock(path, what):`` -- exclusive ownership of ``path``'s lock file.

    ``wait=False`` raises a :class:`MetacliError` naming the owner when the lock is held;
    ``wait=True`` waits for it (a cache that another process is building).
    """

    def __init__(self, path: Path, command: str, wait: bool = False) -> None:
        self.path = path
        self.command = command
        self.wait = wait
        self.handle: IO[str] | None = None

    def read_owner(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "a+": never truncates the record of the owner we may find
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.wait:
                handle.close()
                raise MetacliError(self.busy_message()) from None
            log.info("Waiting for %s, which holds %s", owner_text(self.read_owner()), self.path)
            start = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("Got %s after %.1f s", self.path, time.monotonic() - start)
        record = {
            "pid": os.getpid(),
            "host": platform.node(),
            "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": self.command,
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        self.handle = handle

    def busy_message(self) -> str:
        return (
            f"{self.path.parent} is in use by {owner_text(self.read_owner())}; a folder has "
            f"one writer at a time. Wait for that process to end (or stop it), or give this "
            f"run another folder (hydra.run.dir=...)."
        )

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
