"""Seconds per meta-iteration of metacli against a plain per-task loop, timed in one run.

Usage: make bench  (or: python benchmarks/run.py [--repeats N] [--out docs/benchmarks])

The reference is MAML as `higher`/learn2learn users write it: an nn.Module, a Python
loop over the tasks, ``torch.autograd.grad(create_graph=True)`` for the inner step.
Each figure is the median over repeats after warm-up; speed is reported as a ratio
(reference time / metacli time), so machines of different speed give comparable rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from metacli.build import build
from metacli.loop import meta_step
from metacli.tasks.base import TaskBatch

ROOT = Path(__file__).resolve().parents[1]


def reference_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    steps: int,
    lr: float,
    first_order: bool,
) -> None:
    """One outer step of the per-task loop reference."""
    optimizer.zero_grad()
    names = [n for n, _ in model.named_parameters()]
    total = torch.zeros(())
    for i in range(len(batch)):
        fast = list(model.parameters())
        for _ in range(steps):
            out = torch.func.functional_call(
                model, dict(zip(names, fast, strict=True)), (batch.support_x[i],)
            )
            loss = torch.nn.functional.mse_loss(out, batch.support_y[i])
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(fast, grads, strict=True)]
        out = torch.func.functional_call(
            model, dict(zip(names, fast, strict=True)), (batch.query_x[i],)
        )
        total = total + torch.nn.functional.mse_loss(out, batch.query_y[i])
    (total / len(batch)).backward()
    optimizer.step()


def median_seconds(step: Callable[[], None], warmup: int, repeats: int, inner: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            step()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def bench_sinusoid(algo: str, repeats: int) -> dict[str, object]:
    overrides = [
        f"algo={algo}",
        "device=cpu",
        "train.meta_batch_size=25",
        "task.shots=10",
        "algo.inner_steps=1",
    ]
    row: dict[str, object] = {
        "workload": "sinusoid MLP 1-40-40-1, meta-batch 25, K=10, 1 step",
        "algo": algo,
    }
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for batching in ("auto", "loop"):
            c = build(compose("train", overrides=[*overrides, f"algo.batching={batching}"]))
            seconds = median_seconds(lambda c=c: meta_step(c, None), 20, repeats, 20)
            row[f"metacli_{batching}_s"] = seconds
            row["auto_strategy"] = (
                c.algorithm.batching if batching == "auto" else row.get("auto_strategy")
            )
        c = build(compose("train", overrides=overrides))
        model, task = c.model, c.task
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        first_order = algo == "fomaml"
        row["reference_loop_s"] = median_seconds(
            lambda: reference_step(
                model, optimizer, task.sample(25, "train", gen), 1, 0.01, first_order
            ),
            20,
            repeats,
            20,
        )
    reference = float(row["reference_loop_s"])  # type: ignore[arg-type]
    row["speedup_auto"] = reference / float(row["metacli_auto_s"])  # type: ignore[arg-type]
    row["speedup_loop"] = reference / float(row["metacli_loop_s"])  # type: ignore[arg-type]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    rows = [bench_sinusoid(algo, args.repeats) for algo in ("maml", "fomaml")]
    meta = {
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "command": "make bench",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| workload | algo | reference loop (ms/it) | metacli auto (ms/it) | strategy | "
        "speed-up | metacli loop speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['algo']} | {1e3 * r['reference_loop_s']:.2f} | "  # type: ignore[operator]
            f"{1e3 * r['metacli_auto_s']:.2f} | {r['auto_strategy']} | "  # type: ignore[operator]
            f"{r['speedup_auto']:.1f}x | {r['speedup_loop']:.1f}x |"
        )
    text = (
        f"# Benchmarks\n\nProduced by `make bench` (torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['machine']}, CPU). Median seconds per "
        f"meta-iteration after warm-up; speed-up = reference time / metacli time, both "
        f"timed in the same run.\n\n" + "\n".join(lines) + "\n"
    )
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
