"""The default thread count (metacli.machine) against one thread and every core, on an idle
machine and on one where another process keeps a core busy. Each cell is a whole
``metacli train`` process (start, training, validation, meta-test); the training rate is
the run's own ``it_per_s`` from summary.json. Prints a markdown table for docs/threads.md.

    python benchmarks/threads.py           # about 4 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

WORKLOADS = {
    "sinusoid MAML (mlp, `make train`'s)": ["train.iterations=1000", "train.val_every=500"],
    "synthetic 5-way MAML (conv4)": [
        "task=synthetic",
        "model=conv4",
        "train.iterations=10",
        "train.val_every=10",
        "train.meta_batch_size=4",
        "val.num_tasks=4",
        "test.num_tasks=4",
    ],
}
CHOICES = {"metacli's choice": [], "1 thread": ["threads=1"], "every core": []}


def busy() -> subprocess.Popen[bytes]:
    """Another user's job: a process that keeps one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(overrides: list[str], every_core: bool) -> tuple[float, float, str]:
    """Wall seconds, training it/s and the recorded thread choice of one train process."""
    with tempfile.TemporaryDirectory() as folder:
        extra = [f"threads={os.cpu_count()}"] if every_core else []
        began = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "metacli",
                "train",
                *overrides,
                *extra,
                f"hydra.run.dir={folder}/run",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - began
        with open(f"{folder}/run/summary.json") as f:
            summary = json.load(f)
        return wall, summary["it_per_s"], str(summary.get("threads_chosen", summary["threads"]))


def main() -> None:
    print(f"{os.cpu_count()} cores. Wall seconds of the whole process, training it/s.\n")
    print("| workload | machine | threads | wall s | it/s | recorded choice |")
    print("|---|---|---|---:|---:|---|")
    for workload, overrides in WORKLOADS.items():
        for machine in ("idle", "one core busy"):
            other = busy() if machine != "idle" else None
            try:
                time.sleep(1.0 if other else 0.0)  # the busy process is running
                for choice, extra in CHOICES.items():
                    wall, rate, why = run([*overrides, *extra], choice == "every core")
                    print(
                        f"| {workload} | {machine} | {choice} | {wall:.1f} | {rate:.1f} | {why} |",
                        flush=True,
                    )
            finally:
                if other:
                    other.kill()
                    other.wait()


if __name__ == "__main__":
    main()
