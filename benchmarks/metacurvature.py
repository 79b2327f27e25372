"""Meta-Curvature (``algo=maml update=metacurvature``) against learn2learn's.

One meta-iteration on the Omniglot-shaped workload of benchmarks/run.py (synthetic
28 x 28 images, 5-way 1-shot, 15 queries, Conv4-64, meta-batch 32) with the authors'
Omniglot settings (one inner step of 0.4, second order): metacli's meta-step against

- ``reference``: a per-task loop as learn2learn's examples write it, each task's query
  loss backpropagated as it is computed, the gradient transformed by learn2learn's
  ``MetaCurvatureTransform`` code (permutes and views) with one transform per tensor;
- ``learn2learn``: learn2learn's own ``GBML`` wrapper with its ``MetaCurvatureTransform``
  (clone, adapt, backward per task), where learn2learn is installed (benchmarks/README.md).

All on the same model, each step sampling its meta-batch (as metacli's step does),
alternating in one process; the ratio is the geometric mean of their time / metacli's,
with a 95% interval.

    python benchmarks/metacurvature.py        # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, WORKLOADS, alternating, have_learn2learn, learn2learn_version, ratio

sys.path.insert(0, str(ROOT))
from tests.test_metacurvature import learn2learn_style

from metacli.build import build
from metacli.composition import compose
from metacli.loop import meta_step, sample
from metacli.updates.metacurvature import identity_for

SETTINGS = ["algo=maml", "update=metacurvature", "algo.inner_lr=0.4", "algo.inner_steps=1"]


def reference_step(
    components: Any, batch: Any, mats: dict[str, list[torch.Tensor]], optimizer: Any
) -> None:
    """Per task: the support gradient (with its graph), each tensor's transformed by
    learn2learn's code, one step, the query loss backpropagated at once."""
    model = components.algorithm.model
    loss_fn = components.task.loss
    lr = components.algorithm.cfg.inner_lr
    names = [n for n, _ in model.named_parameters()]
    optimizer.zero_grad()
    size = len(batch)
    for i in range(size):
        params = list(model.parameters())
        out = torch.func.functional_call(
            model, dict(zip(names, params, strict=True)), (batch.support_x[i],)
        )
        grads = torch.autograd.grad(loss_fn(out, batch.support_y[i]), params, create_graph=True)
        fast = [
            p - lr * learn2learn_style(g, mats[n])
            for n, p, g in zip(names, params, grads, strict=True)
        ]
        out = torch.func.functional_call(
            model, dict(zip(names, fast, strict=True)), (batch.query_x[i],)
        )
        (loss_fn(out, batch.query_y[i]) / size).backward()
    optimizer.step()


def learn2learn_step(gbml: Any, optimizer: Any, loss_fn: Any, batch: Any) -> None:
    """learn2learn's GBML as its examples run it: clone, adapt, backward per task."""
    optimizer.zero_grad()
    size = len(batch)
    for i in range(size):
        learner = gbml.clone()
        learner.adapt(loss_fn(learner(batch.support_x[i]), batch.support_y[i]))
        loss_fn(learner(batch.query_x[i]), batch.query_y[i]).backward()
    for p in gbml.parameters():
        if p.grad is not None:
            p.grad.data.mul_(1.0 / size)
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = [o for o in WORKLOADS["omniglot_1step"]["overrides"] if "inner_steps" not in o]
    components = build(compose("train", [*shape, *SETTINGS, "device=cpu"]))
    model = components.algorithm.model
    mats = {
        n: [m.requires_grad_() for m in identity_for(p.detach())]
        for n, p in model.named_parameters()
    }
    reference_optimizer = torch.optim.Adam(
        [*model.parameters(), *(m for ms in mats.values() for m in ms)], lr=1e-3
    )
    steps = {
        "metacli": lambda: meta_step(components, None),
        "reference": lambda: reference_step(
            components, sample(components), mats, reference_optimizer
        ),
    }
    if have_learn2learn():
        import learn2learn as l2l

        gbml = l2l.algorithms.GBML(
            model, transform=l2l.optim.MetaCurvatureTransform, lr=0.4, adapt_transform=False
        )
        l2l_optimizer = torch.optim.Adam(gbml.parameters(), lr=1e-3)
        steps["learn2learn"] = lambda: learn2learn_step(
            gbml, l2l_optimizer, components.task.loss, sample(components)
        )
    times = alternating(steps, args.rounds)
    version = learn2learn_version() or "not installed"
    print(f"torch {torch.__version__}, 1 thread; learn2learn {version}\n")
    print("| workload | metacli ms | metacli picks | baseline | its ms | speed-up [95%] |")
    print("|---|---:|---|---|---:|---|")
    ours = times["metacli"]
    title = "Omniglot-shaped 5-way 1-shot, Conv4-64, meta-batch 32, 15 queries, 1 step of 0.4"
    for name in [n for n in steps if n != "metacli"]:
        r = ratio(times[name], ours)
        print(
            f"| {title} | {1000 * statistics.median(ours):.0f} | "
            f"{components.algorithm.batching} | {name} | "
            f"{1000 * statistics.median(times[name]):.0f} | "
            f"{r['speedup']:.2f}x [{r['speedup_low']:.2f}-{r['speedup_high']:.2f}] |",
            flush=True,
        )


if __name__ == "__main__":
    main()
