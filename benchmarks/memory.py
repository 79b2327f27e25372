"""The memory estimate (metacli.resources) against what runs use: each config runs
``metacli train`` for a few iterations in a process of its own, and its peak resident
memory, less that of a run whose parts are all tiny (the interpreter, torch, the
libraries), is set beside the estimate. Prints a markdown table for docs/memory.md.

    python benchmarks/memory.py            # about 4 minutes on 2 cores
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from metacli.build import resolve, resolve_device
from metacli.composition import compose
from metacli.resources import estimate, size

OMNIGLOT = os.environ.get("METACLI_OMNIGLOT", "../shared/data/omniglot")
SHORT = ["train.iterations=2", "train.val_every=2", "threads=1"]
TINY = ["val.num_tasks=1", "test.num_tasks=1", "train.meta_batch_size=1"]
CONFIGS = [
    ["train.meta_batch_size=4000", "val.num_tasks=1", "test.num_tasks=1"],
    ["train.meta_batch_size=20000", "val.num_tasks=1", "test.num_tasks=1"],
    ["algo=fomaml", "train.meta_batch_size=20000", "val.num_tasks=1", "test.num_tasks=1"],
    ["model.hidden=[2000,2000]", "val.num_tasks=1", "test.num_tasks=1"],
    ["test.num_tasks=300000", "test.batch_size=1000", "val.num_tasks=1"],
    ["val.batch_size=20000", "val.num_tasks=20000", "test.num_tasks=1"],
    # the validation's and the meta-test's tasks take turns: each alone is the peak
    [
        "val.num_tasks=150000",
        "test.num_tasks=150000",
        "val.batch_size=1000",
        "test.batch_size=1000",
    ],
    [
        "task=omniglot",
        "model=conv4",
        f"data.root={OMNIGLOT}",
        "val.num_tasks=20",
        "test.num_tasks=300",
        "test.batch_size=300",
    ],
    [
        "task=omniglot",
        "model=conv4",
        f"data.root={OMNIGLOT}",
        "algo.batching=vmap",
        "train.meta_batch_size=8",
        "val.num_tasks=8",
        "test.num_tasks=8",
        "test.batch_size=8",
    ],
]


# `metacli` in a process that says its peak resident memory as it exits: the kernel's
# VmHWM of the process's own memory (ru_maxrss would include the parent's, copied at fork)
PEAK = """
import atexit, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write(f"peak-kb {line.split()[1]}\\n")
atexit.register(peak)
from metacli.cli import entry
sys.argv = ["metacli", *sys.argv[1:]]
entry()
"""


def peak_rss(overrides: list[str], cwd: str | None = None) -> int:
    """Peak resident bytes of a ``metacli train`` process with these overrides."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-c", PEAK, "train", *SHORT, *overrides]
        done = subprocess.run(
            [*command, f"hydra.run.dir={folder}/run"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(overrides)} failed: {done.stderr}")
        return int(done.stderr.rsplit("peak-kb ", 1)[1].split()[0]) * 1024


def estimated(overrides: list[str]) -> int:
    resolved = resolve(compose("train", [*SHORT, *overrides]))
    needs = estimate(resolved, resolve_device(resolved.run.device))
    assert needs is not None
    return sum(need.bytes for need in needs)


def main() -> None:
    base = peak_rss(TINY)
    print(f"Baseline (a run with every part tiny): {size(base)} resident.\n")
    print("| config | estimate | used (peak less baseline) | used / estimate |")
    print("|---|---:|---:|---:|")
    for overrides in CONFIGS:
        used = peak_rss(overrides) - base
        guess = estimated(overrides)
        shown = " ".join(o for o in overrides if not o.startswith("data.root"))
        print(f"| `{shown}` | {size(guess)} | {size(used)} | {used / guess:.2f} |", flush=True)


if __name__ == "__main__":
    main()
