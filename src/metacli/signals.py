"""Ctrl-C and SIGTERM: stop between two iterations, or at once when asked again.

During meta-training the first signal is a request, acknowledged at once and honoured
at the end of the iteration, after ``last.pt`` is written. A second signal, or any signal
in another phase (building, the meta-test), stops at once with :class:`StopNow`, which
the run folder records as ``interrupted`` (no traceback). Exit codes follow the shell's
convention: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from metacli import distributed
from metacli.errors import MetacliError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def exit_code(signum: int) -> int:
    return EXIT_CODES.get(signal.Signals(signum), 128 + signum)


class StopNow(KeyboardInterrupt):
    """A signal that stops the command at once (a BaseException: nothing swallows it)."""

    def __init__(self, signum: int, phase: str = "setup") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.phase = phase  # what it interrupted


class Interrupted(MetacliError):
    """The user (Ctrl-C) or the scheduler (SIGTERM) stopped the run between two iterations."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class Stopper:
    """The process's signal policy; ``phase`` says what a stop interrupts."""

    def __init__(self) -> None:
        self.requested: int | None = None  # a pending stop request (its signal)
        self.graceful = False  # inside the training loop: a first signal only requests
        self.stopping = False
        self.phase = "setup"

    def handler(self, signum: int, frame: Any) -> None:
        if self.stopping:  # already on the way out: let the cleanup finish
            return
        if self.graceful and self.requested is None:
            self.requested = signum
            name = signal.Signals(signum).name
            if not distributed.from_env().writer:  # a distributed run: rank 0 says it
                return
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
            print(
                f"\nmetacli: {name} received: stopping after this iteration, once "
                f"checkpoints/last.pt holds it ({again} to stop now).",
                file=sys.stderr,
                flush=True,
            )
            return
        self.stopping = True
        raise StopNow(signum, self.phase)

    @contextmanager
    def installed(self) -> Iterator[Stopper]:
        """Handle SIGINT and SIGTERM for the duration (main thread only)."""
        self.requested, self.graceful, self.stopping, self.phase = None, False, False, "setup"
        try:
            previous = {s: signal.signal(s, self.handler) for s in EXIT_CODES}
        except ValueError:  # not the main thread (some launchers): leave signals alone
            yield self
            return
        try:
            yield self
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    @contextmanager
    def during(self, phase: str, graceful: bool = False) -> Iterator[None]:
        """A phase of the command (``training``, ``the meta-test``), named in messages."""
        before = self.phase, self.graceful
        self.phase, self.graceful = phase, graceful
        try:
            yield
        except Exception as err:  # the innermost phase, for the message of an error
            if not hasattr(err, "phase"):
                err.phase = phase  # type: ignore[attr-defined]
            raise
        finally:
            self.phase, self.graceful = before


STOPPER = Stopper()
