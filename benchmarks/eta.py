"""How far the training ETA is off: each config runs as a `metacli train` process whose
progress lines are read as they come; the ETA of the first line at or past 5% of the
iterations is set beside the time that training (validations included, the final
meta-test not) actually took from that line on. Prints a markdown table for
docs/threads.md.

    python benchmarks/eta.py               # about 5 minutes on 2 cores
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

CONFIGS = [
    ["threads=1"],  # make train's run
    ["threads=1", "algo=fomaml", "train.iterations=20000", "train.val_every=1000"],
    ["threads=1", "algo=metalstm", "train.iterations=300", "train.val_every=100"],
    [
        "task=synthetic",
        "model=conv4",
        "train.iterations=60",
        "train.val_every=20",
        "train.meta_batch_size=4",
        "val.num_tasks=20",
        "test.num_tasks=20",
    ],
]
LINE = re.compile(r"iter (\d+)/(\d+) .* eta (\d+):(\d\d):(\d\d)")
DONE = re.compile(r"iter (\d+): val")


def measure(overrides: list[str]) -> tuple[int, float, float]:
    """(iteration of the first line past 5%, its ETA, the seconds training took from it)."""
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen(
            [sys.executable, "-m", "metacli", "train", *overrides, f"hydra.run.dir={folder}/r"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert process.stdout is not None
        mark: tuple[int, float, float] | None = None
        last = 0.0
        for line in process.stdout:
            now = time.perf_counter()
            found = LINE.search(line)
            if found and mark is None:
                it, total = int(found[1]), int(found[2])
                if it >= 0.05 * total:
                    h, m, s = (int(found[k]) for k in (3, 4, 5))
                    mark = (it, float(h * 3600 + m * 60 + s), now)
            done = DONE.search(line)
            if found or (done and mark is not None):
                last = now
        process.wait()
        assert mark is not None, "no progress line past 5%"
        return mark[0], mark[1], last - mark[2]


def main() -> None:
    print("| config | at iteration | ETA said (s) | took (s) | took / ETA |")
    print("|---|---:|---:|---:|---:|")
    for overrides in CONFIGS:
        it, eta, took = measure(overrides)
        ratio = took / eta if eta else float("inf")
        print(
            f"| `{' '.join(overrides)}` | {it} | {eta:.0f} | {took:.0f} | {ratio:.2f} |", flush=True
        )


if __name__ == "__main__":
    main()
