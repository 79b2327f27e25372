"""BOIL, CAVIA and Meta-Curvature against the strongest reference a user would write.

One meta-iteration on the Omniglot-shaped workload of benchmarks/run.py (synthetic
28 x 28 images, 5-way 1-shot, 15 queries, Conv4-64, meta-batch 32), each method with its
authors' settings, metacli's meta-step against

- ``reference``: a per-task loop in the authors' structure, each task's query loss
  backpropagated as it is computed (learn2learn's examples): BOIL's ``update_parameters``
  (gradients of every tensor, the classifier's step 0, the extractor's 0.5); CAVIA's
  context from zeros, its gradient with the graph kept, two steps of 1.0 (100 context
  parameters, FiLM of block 3); Meta-Curvature's gradient transformed by learn2learn's
  ``MetaCurvatureTransform`` code (permutes and views), one step of 0.4;
- ``learn2learn``: for Meta-Curvature, learn2learn's own ``GBML`` with its
  ``MetaCurvatureTransform`` (clone, adapt, backward per task), where learn2learn is
  installed (benchmarks/README.md).

All on the same model, each step sampling its meta-batch (as metacli's step does),
alternating in one process; the ratio is the geometric mean of their time / metacli's,
with a 95% interval.

    python benchmarks/family.py                     # about 15 minutes on 2 cores
    python benchmarks/family.py --methods metacurvature
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    ROOT,
    WORKLOADS,
    alternating,
    have_learn2learn,
    learn2learn_step,
    learn2learn_version,
    ratio,
)

sys.path.insert(0, str(ROOT))
from tests.test_metacurvature import learn2learn_style

from metacli.build import build
from metacli.composition import compose
from metacli.loop import meta_step, sample
from metacli.updates.metacurvature import identity_for

METHODS = {
    "boil": ["algo=boil"],
    "cavia": ["algo=cavia", "algo.context_params=100", "algo.inner_steps=2"],
    "metacurvature": [
        "algo=maml",
        "update=metacurvature",
        "algo.inner_lr=0.4",
        "algo.inner_steps=1",
    ],
}
Params = dict[str, torch.Tensor]


def reference_step(components: Any, batch: Any, optimizer: Any, inner: Any) -> None:
    """Per task: ``inner(params, x, y)`` adapts, the query loss is backpropagated at once."""
    model = components.algorithm.model
    loss_fn = components.task.loss
    optimizer.zero_grad()
    size = len(batch)
    for i in range(size):
        fast = inner(dict(model.named_parameters()), batch.support_x[i], batch.support_y[i])
        out = torch.func.functional_call(model, fast, (batch.query_x[i],))
        (loss_fn(out, batch.query_y[i]) / size).backward()
    optimizer.step()


def inner_loop(method: str, components: Any, mats: dict[str, list[torch.Tensor]]) -> Any:
    """The authors' inner loop of ``method`` on one task, written with autograd."""
    model, cfg = components.algorithm.model, components.algorithm.cfg
    loss_fn = components.task.loss

    def support_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    def boil(params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
        shared = {n: p for n, p in params.items() if n != "context"}
        grads = torch.autograd.grad(
            support_loss(params, x, y), list(shared.values()), create_graph=True
        )
        steps = {n: 0.0 if n.startswith("head.") else cfg.inner_lr for n in shared}
        return {
            **params,
            **{n: p - steps[n] * g for (n, p), g in zip(shared.items(), grads, strict=True)},
        }

    def cavia(params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
        context = torch.zeros_like(params["context"]).requires_grad_()
        for _ in range(cfg.inner_steps):
            loss = support_loss({**params, "context": context}, x, y)
            (grad,) = torch.autograd.grad(loss, context, create_graph=True)
            context = context - cfg.inner_lr * grad
        return {**params, "context": context}

    def metacurvature(params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
        grads = torch.autograd.grad(
            support_loss(params, x, y), list(params.values()), create_graph=True
        )
        return {
            n: p - cfg.inner_lr * learn2learn_style(g, mats[n])
            for (n, p), g in zip(params.items(), grads, strict=True)
        }

    return {"boil": boil, "cavia": cavia, "metacurvature": metacurvature}[method]


def compare(method: str, rounds: int) -> None:
    shape = [o for o in WORKLOADS["omniglot_1step"]["overrides"] if "inner_steps" not in o]
    components = build(compose("train", [*shape, *METHODS[method], "device=cpu"]))
    model = components.algorithm.model
    mats = {
        n: [m.requires_grad_() for m in identity_for(p.detach())]
        for n, p in model.named_parameters()
    }
    learned = [m for ms in mats.values() for m in ms] if method == "metacurvature" else []
    reference_optimizer = torch.optim.Adam([*model.parameters(), *learned], lr=1e-3)
    inner = inner_loop(method, components, mats)
    steps = {
        "metacli": lambda: meta_step(components, None),
        "reference": lambda: reference_step(
            components, sample(components), reference_optimizer, inner
        ),
    }
    if method == "metacurvature" and have_learn2learn():
        import learn2learn as l2l

        gbml = l2l.algorithms.GBML(
            model, transform=l2l.optim.MetaCurvatureTransform, lr=0.4, adapt_transform=False
        )
        l2l_optimizer = torch.optim.Adam(gbml.parameters(), lr=1e-3)
        steps["learn2learn"] = lambda: learn2learn_step(  # (clone, adapt, backward per task)
            gbml, l2l_optimizer, components.task.loss, sample(components), 1
        )
    times = alternating(steps, rounds)
    ours = times["metacli"]
    for name in [n for n in steps if n != "metacli"]:
        r = ratio(times[name], ours)
        print(
            f"| {method} | {1000 * statistics.median(ours):.0f} | "
            f"{components.algorithm.batching} | {name} | "
            f"{1000 * statistics.median(times[name]):.0f} | "
            f"{r['speedup']:.2f}x [{r['speedup_low']:.2f}-{r['speedup_high']:.2f}] |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    version = learn2learn_version() or "not installed"
    print(f"torch {torch.__version__}, 1 thread; learn2learn {version}")
    print("Omniglot-shaped 5-way 1-shot, Conv4-64, meta-batch 32, 15 queries\n")
    print("| method | metacli ms | metacli picks | baseline | its ms | speed-up [95%] |")
    print("|---|---:|---|---|---:|---|")
    for method in args.methods:
        compare(method, args.rounds)


if __name__ == "__main__":
    main()
