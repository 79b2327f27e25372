"""Is this checkout slower than an earlier revision? Both, alternating in one process.

Usage: python benchmarks/versus.py --base REV [--workloads ...] [--algos ...] [--out FILE]

The earlier revision's ``src/metacli`` and ``conf`` are taken from git into a temporary
folder and imported under the name ``metacli_base``, so one process holds both versions.
For each workload and algorithm of ``benchmarks/run.py`` (each pair in a process of its
own) both build the same configuration (default strategy, ``algo.batching=auto``) and
their meta-iterations (sampling, meta-loss, backward, optimizer step) alternate step by
step; the ratio is the geometric mean of base time / current time over the rounds, with
a 95% interval. Above 1: the current code is faster.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ALGOS, ROOT, WORKLOADS


def extract(revision: str, into: Path) -> Path:
    """``src/metacli`` of ``revision`` as the package ``metacli_base`` (and its ``conf``)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "src/metacli", "conf"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    package = into / "src" / "metacli"
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"\bmetacli\.(?=[a-z_])", "metacli_base.", text)
        text = re.sub(r"\bfrom metacli import\b", "from metacli_base import", text)
        text = re.sub(r"^import metacli\b", "import metacli_base", text, flags=re.M)
        path.write_text(text, encoding="utf-8")
    package.rename(package.with_name("metacli_base"))
    return into


def step_of(package: str, conf: Path, workload: str, algo: str) -> Any:
    """One meta-iteration of ``package`` (metacli or metacli_base) on a workload."""
    import importlib

    from hydra import compose, initialize_config_dir

    build = importlib.import_module(f"{package}.build").build
    meta_step = importlib.import_module(f"{package}.loop").meta_step
    overrides = [f"algo={algo}", *WORKLOADS[workload]["overrides"], "device=cpu"]
    if algo == "protonet":
        overrides = [o for o in overrides if not o.startswith("algo.inner_steps")]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        c = build(compose("train", overrides=overrides))
    return lambda: meta_step(c, None)


def alternate(base_dir: Path, workload: str, algo: str, rounds: int) -> dict[str, Any]:
    """Runs in the child process: the two versions, alternating."""
    sys.path.insert(0, str(base_dir / "src"))
    steps = {
        "base": step_of("metacli_base", base_dir / "conf", workload, algo),
        "current": step_of("metacli", ROOT / "conf", workload, algo),
    }
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for _ in range(rounds):
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
        order.reverse()  # ABBA: neither version always runs first

    logs = [math.log(b / c) for b, c in zip(times["base"], times["current"], strict=True)]
    mean = statistics.fmean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
    return {
        "workload": workload,
        "algo": algo,
        "rounds": rounds,
        "base_ms": 1e3 * statistics.median(times["base"]),
        "current_ms": 1e3 * statistics.median(times["current"]),
        "ratio": math.exp(mean),
        "ratio_low": math.exp(mean - half),
        "ratio_high": math.exp(mean + half),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier revision (git)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=ALGOS)
    parser.add_argument("--rounds", type=int, help="default: the workload's (benchmarks/run.py)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base_dir, workload, algo = args.child
        print(json.dumps(alternate(Path(base_dir), workload, algo, args.rounds)))
        return
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.base],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="metacli-base-") as tmp:
        base_dir = extract(args.base, Path(tmp))
        for workload in args.workloads:
            for algo in (a for a in WORKLOADS[workload]["algos"] if a in args.algos):
                rounds = args.rounds or WORKLOADS[workload]["rounds"]
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--base",
                        args.base,
                        "--rounds",
                        str(rounds),
                        "--child",
                        str(base_dir),
                        workload,
                        algo,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    lines = [
        f"| workload | algo | {commit} ms | current ms | {commit} time / current time [95%] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        interval = f"[{r['ratio_low']:.3f}-{r['ratio_high']:.3f}]"
        lines.append(
            f"| {WORKLOADS[r['workload']]['title']} | {r['algo']} | {r['base_ms']:.1f} | "
            f"{r['current_ms']:.1f} | {r['ratio']:.3f} {interval} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
