"""Distributed meta-training: iterations per second of N processes against 1.

Usage: python benchmarks/distributed.py [--nproc 2] [--rounds 3] [--device cpu|cuda]
       [--workloads sinusoid omniglot_1step]

Each round runs ``metacli train`` once with one process and once with ``distributed.nproc=N``
(alternating, so both meet the same machine conditions), with the same total meta-batch,
and reads the steady training speed from metrics.jsonl: iterations over wall seconds
between the first and the last train line, so start-up, the first iterations and the
final validation are left out. Reported: the median of each and the speed-up (N over 1).
On a CPU machine the processes share its cores (each gets cores / N torch threads), so
the speed-up says whether splitting the tasks over processes beats one process using
every core; on a GPU machine each rank takes its own GPU. Results go to
docs/benchmarks_distributed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT
from run import WORKLOADS as STEP_WORKLOADS

WORKLOADS: dict[str, dict[str, Any]] = {
    "sinusoid": {
        "title": "sinusoid MAML, MLP 40-40, meta-batch 25, 1 step",
        "overrides": ["experiment=maml_sinusoid"],
        "iterations": 600,
        "log_every": 100,
    },
    "omniglot_1step": {  # benchmarks/run.py's shape, as a whole command
        "title": STEP_WORKLOADS["omniglot_1step"]["title"],
        "overrides": STEP_WORKLOADS["omniglot_1step"]["overrides"],
        "iterations": 12,
        "log_every": 2,
    },
}


def one_run(workload: str, nproc: int, device: str, folder: Path) -> dict[str, Any]:
    spec = WORKLOADS[workload]
    iterations = spec["iterations"]
    command = [
        sys.executable, "-m", "metacli", "train", *spec["overrides"], f"device={device}",
        f"train.iterations={iterations}", f"train.log_every={spec['log_every']}",
        f"train.val_every={iterations}", "val.num_tasks=4", "test.num_tasks=4",
        f"distributed.nproc={nproc}", f"hydra.run.dir={folder}",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("split") == "train"]
    first, last = train[0], train[-1]
    speed = (last["iteration"] - first["iteration"]) / (last["wall_time"] - first["wall_time"])
    summary = json.loads((folder / "summary.json").read_text())
    return {"it_per_s": speed, "wall_s": wall, "threads": summary.get("threads")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_distributed.json")
    args = parser.parse_args()
    import torch

    results: dict[str, Any] = {
        "meta": {
            "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
            "torch": torch.__version__,
            "device": args.device,
            "cores": len(__import__("os").sched_getaffinity(0)),
            "nproc": args.nproc,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            runs: dict[int, list[dict[str, Any]]] = {1: [], args.nproc: []}
            for r in range(args.rounds):
                for n in (1, args.nproc):
                    folder = Path(tmp) / f"{workload}{r}{n}"
                    runs[n].append(one_run(workload, n, args.device, folder))
            single = statistics.median(x["it_per_s"] for x in runs[1])
            multi = statistics.median(x["it_per_s"] for x in runs[args.nproc])
            results[workload] = {
                "title": WORKLOADS[workload]["title"],
                "it_per_s_1": single,
                f"it_per_s_{args.nproc}": multi,
                "speedup": multi / single,
                "threads": {n: runs[n][0]["threads"] for n in runs},
                "runs": {str(n): v for n, v in runs.items()},
            }
            print(
                f"{workload}: 1 process {single:.3f} it/s, {args.nproc} processes "
                f"{multi:.3f} it/s, speed-up {multi / single:.2f}x",
                flush=True,
            )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
