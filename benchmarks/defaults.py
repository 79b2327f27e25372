"""Every algorithm's defaults on the default task (the sinusoid), seeds 0, 1 and 2: each
run is `metacli train algo=<name> seed=<s> threads=1`, nothing else set. Reports how each
ended (finished, refused with the reason, failed with the error), the meta-test MSE
before and after adaptation, and the diverged test tasks. Prints a markdown table for
docs/defaults.md; two runs at a time (``--jobs``). The presets of the sinusoid run the
same way, each with its own settings:

    python benchmarks/defaults.py          # about 25 minutes on 2 cores
    python benchmarks/defaults.py experiment=maml_sinusoid experiment=metasgd_sinusoid \
        experiment=pretrain_sinusoid experiment=reptile_sinusoid
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from metacli.registry import builtins

SEEDS = (0, 1, 2)


def run(algo: str, seed: int) -> str:
    """One markdown row; ``algo`` may be ``experiment=<preset>``."""
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "metacli",
                "train",
                algo if "=" in algo else f"algo={algo}",
                f"seed={seed}",
                "threads=1",
                f"hydra.run.dir={folder}/run",
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - began
        summary_path = Path(folder) / "run" / "summary.json"
        if not summary_path.exists():
            lines = (done.stderr + done.stdout).strip().splitlines() or ["?"]
            reason = re.sub(r"^\[[\d:]+\] ", "", lines[-1].strip())
            reason = reason.removeprefix("metacli train: ").split(". ")[0]
            return f"| {algo} | {seed} | refused (exit {done.returncode}): {reason} | | | | |"
        summary = json.loads(summary_path.read_text())
        test = summary.get("test") or {}
        if summary["status"] != "finished":
            error = str(summary.get("error", "")).split(". ")[0]
            return f"| {algo} | {seed} | {summary['status']}: {error} | | | | {seconds:.0f} |"
        before = test["before_adaptation"]["mean"]
        return (
            f"| {algo} | {seed} | finished | {before:.3f} | {test['mean']:.3f} "
            f"| {test.get('diverged_tasks', 0)} | {seconds:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "algos", nargs="*", default=list(builtins("algo")), help="names, or experiment=<preset>"
    )
    args = parser.parse_args()
    print("| algo | seed | outcome | MSE before adaptation | MSE after | diverged test tasks | s |")
    print("|---|---|---|---:|---:|---:|---:|")
    runs = [(algo, seed) for algo in args.algos for seed in SEEDS]
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda pair: run(*pair), runs):
            print(row, flush=True)


if __name__ == "__main__":
    main()
