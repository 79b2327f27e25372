"""Per-task heads of the few-shot baselines: metacli's batched solves against a per-task loop
of the reference's structure, in one process.

One evaluation batch of 100 mini-ImageNet-shaped tasks (5-way, 15 queries a class) on
fixed 1,600-d features (Conv-4 on 84 x 84 images), 1- and 5-shot; the network's forward
pass is the same for both sides and left out. Each head is timed as the code of its
authors runs it, one task at a time (``tasks_per_batch = 1``), against metacli's head on
all 100 tasks at once:

- ``r2d2``: R2D2's ridge regression (Woodbury), ``torch.inverse`` per task as ``RRNet``;
- ``ridge``: MetaOptNet's ridge head;
- ``svm``: MetaOptNet's SVM, qpth on one task's QP (3 iterations, the code's test);
- ``baseline``: Baseline's fine-tuned linear classifier, a ``nn.Linear`` and
  ``torch.optim.SGD`` per task, 100 epochs in batches of 4 (CloserLookFewShot);
- ``baselinepp``: the same with ``distLinear``.

The ratio is the geometric mean of the per-task loop's time / metacli's over alternating
rounds, with a 95% interval.

    python benchmarks/heads.py                 # about 5 minutes on 2 cores
    python benchmarks/heads.py --heads svm r2d2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, alternating, ratio

sys.path.insert(0, str(ROOT))
from tests.conftest import compose_config
from tests.test_baselines import finetune_reference

from metacli.algorithms.metaoptnet import svm_cs_dual
from metacli.build import build
from metacli.streams import TaskRandom, task_keys

TASKS, WAYS, QUERIES, DIM = 100, 5, 15, 1600
HEADS = ("r2d2", "ridge", "svm", "baseline", "baselinepp")


def algorithm(name: str) -> Any:
    algo = {"ridge": "metaoptnet", "svm": "metaoptnet"}.get(name, name)
    extra = {"ridge": ["algo.head=ridge"], "svm": ["algo.head=svm"]}.get(name, [])
    overrides = ["task=synthetic", "task.image_size=16", "model=conv4", "device=cpu"]
    components = build(compose_config(f"algo={algo}", *extra, *overrides))
    components.algorithm.eval()
    return components.algorithm


def r2d2_task(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """RRNet's Woodbury branch for one task (lambda 50, scale 1e-4)."""
    n = len(support)
    x = torch.cat([support, torch.ones(n, 1)], 1) / math.sqrt(n)
    y = F.one_hot(labels, WAYS).float() / math.sqrt(n)
    w = x.T @ torch.inverse(x @ x.T + 50.0 * torch.eye(n)) @ y
    return 1e-4 * (query @ w[:-1] + w[-1])


def ridge_task(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """MetaOptNetHead_Ridge's optimum for one task (the QP's closed form)."""
    k = support @ support.T + 50.0 * torch.eye(len(support))
    z = torch.linalg.solve(k, 2 * F.one_hot(labels, WAYS).float())
    return query @ support.T @ z


def svm_task(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    alpha = svm_cs_dual(support[None], labels[None], WAYS, 0.1, 3)[0]
    return query @ support.T @ alpha


def sides(name: str, data: tuple[torch.Tensor, ...]) -> tuple[Any, Any]:
    """metacli's head on all tasks at once, and the per-task loop of the reference."""
    support, labels, query, keys = data
    algo = algorithm(name)
    if name in ("baseline", "baselinepp"):
        cosine = name == "baselinepp"

        def ours() -> Any:
            rng = [TaskRandom(k) for k in keys]
            return algo.task_scores(support, labels, query, WAYS, rng)

        def per_task() -> Any:
            return torch.stack(
                [
                    finetune_reference(
                        support[t], labels[t], query[t], WAYS, TaskRandom(keys[t]), cosine, 100
                    )
                    for t in range(TASKS)
                ]
            )

        return ours, per_task
    one = {"r2d2": r2d2_task, "ridge": ridge_task, "svm": svm_task}[name]

    def ours_head() -> Any:
        with torch.no_grad():
            return algo.head(support, labels, query, WAYS)

    def per_task_head() -> Any:
        with torch.no_grad():
            return torch.stack([one(support[t], labels[t], query[t]) for t in range(TASKS)])

    return ours_head, per_task_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = []
    for shots in (1, 5):
        support = torch.randn(TASKS, WAYS * shots, DIM).relu()
        query = torch.randn(TASKS, WAYS * QUERIES, DIM).relu()
        labels = torch.arange(WAYS).repeat_interleave(shots).expand(TASKS, -1).contiguous()
        keys = task_keys(0, "bench", 0, 0, TASKS)
        for name in args.heads:
            ours, per_task = sides(name, (support, labels, query, keys))
            # the same predictions on both sides (to rounding)
            agree = (ours().argmax(-1) == per_task().argmax(-1)).float().mean().item()
            assert agree > 0.99, (name, shots, agree)
            times = alternating({"per_task": per_task, "metacli": ours}, args.rounds)
            row = {"head": name, "shots": shots, **ratio(times["per_task"], times["metacli"])}
            row["per_task_s"] = min(times["per_task"])
            row["metacli_s"] = min(times["metacli"])
            results.append(row)
            print(json.dumps(row), flush=True)
    print("| head | shots | per-task loop (s) | metacli batched (s) | speed-up (95% CI) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['head']} | {r['shots']} | {r['per_task_s']:.3f} | {r['metacli_s']:.3f} | "
            f"{r['speedup']:.1f}x ({r['speedup_low']:.1f}-{r['speedup_high']:.1f}) |"
        )


if __name__ == "__main__":
    main()
