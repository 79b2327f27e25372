"""The sinusoid end to end: ``metacli train experiment=maml_sinusoid`` as a whole process
(start, train, validate, meta-test) against learn2learn's loop doing the same.

Usage: python benchmarks/sinusoid_process.py [--iterations 2000] [--rounds 3] [--compile]
       [--full]   (also the preset's own 70,000 iterations, once, metacli only)

The processes alternate (metacli, learn2learn, metacli, ...) so both meet the same
machine conditions; reported: the median wall seconds of each process from the command
to its exit, the time from the command to the first training iteration (metacli's
summary.json ``startup_s``; the learn2learn script measures the same), and the ratio.
learn2learn's side is ``benchmarks/l2l_sinusoid.py`` (skipped where learn2learn does not
import: benchmarks/README.md says how to install it).
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
from run import ROOT, have_learn2learn


def metacli(iterations: int, compile: bool, folder: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "metacli", "train", "experiment=maml_sinusoid",
        f"train.iterations={iterations}", f"hydra.run.dir={folder}",
    ]  # fmt: skip
    if compile:
        command.append("algo.compile=true")
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - start
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "wall_s": wall,
        "first_iteration_s": summary["startup_s"],
        "train_s": summary["train_time_s"],
        "compile_s": summary.get("compile_s"),
        "test_mse": summary["test"]["mean"],
    }


def learn2learn(iterations: int) -> dict[str, Any]:
    script = Path(__file__).with_name("l2l_sinusoid.py")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), "--iterations", str(iterations)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    return {"wall_s": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="metacli with algo.compile=true")
    parser.add_argument("--full", action="store_true", help="also the full 70,000 iterations")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_sinusoid.json")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"metacli": [], "learn2learn": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            runs["metacli"].append(metacli(args.iterations, args.compile, Path(tmp) / f"m{i}"))
            if have_learn2learn():
                runs["learn2learn"].append(learn2learn(args.iterations))
            print(json.dumps({k: v[-1] for k, v in runs.items() if v}), flush=True)
        full = metacli(70000, args.compile, Path(tmp) / "full") if args.full else None
    report: dict[str, Any] = {"iterations": args.iterations, "compile": args.compile}
    for name, results in runs.items():
        if results:
            report[name] = {
                key: statistics.median(r[key] for r in results)
                for key in results[0]
                if results[0][key] is not None
            }
    if runs["learn2learn"]:
        report["process_ratio"] = report["learn2learn"]["wall_s"] / report["metacli"]["wall_s"]
    if full is not None:
        report["full_70000"] = full
    print(json.dumps(report, indent=2))
    mode = "compiled" if args.compile else "eager"  # the other mode's report is kept
    reports = json.loads(args.out.read_text()) if args.out.exists() else {}
    reports[mode] = report
    args.out.write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
