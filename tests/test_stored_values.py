"""Today's algorithms keep their numbers: float64 meta-gradients against stored values.

``tests/data/stored_values.json`` holds, for every algorithm on a regression MLP and on a
Conv-4 with batch norm, the meta-loss, the per-task metrics, the gradient of every
meta-parameter and the evaluation trace (query loss and metric after 0..k inner steps).
It was written by ``python -m tests.test_stored_values --write`` at commit bbc4d5d,
before the adaptation engine (by this file's version of that commit, which read the
rates from the algorithm's ``learning_rates``/``step_lrs``), with ``algo.batching=loop``;
every strategy must match it. Rewriting it pins new values: do so only on purpose.

Learned inner rates are stored by the model parameter they belong to, not by module
path, so the values survive the move of the rates into update rules.

One entry was rewritten on purpose since (``python -m tests.test_stored_values --update
mamlpp/conv4``): MAML++ on Conv-4 now follows the reference code (the query after inner
step k sees the norm set of step k - 1, N sets for N steps, norm parameters not adapted).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from metacli.build import build
from tests import textdata
from tests.conftest import compose_config

STORE = Path(__file__).parent / "data" / "stored_values.json"  # text: tests/textdata.py
STEPS, LR = 2, 0.1
WORKLOADS = {
    "mlp": [
        "task=sinusoid",
        "model=mlp",
        "model.hidden=[12,12]",
        "model.activation=tanh",
        "task.shots=5",
        "task.queries=6",
    ],
    "conv4": [
        "task=synthetic",
        "model=conv4",
        "model.filters=3",
        "task.ways=3",
        "task.shots=2",
        "task.queries=2",
        "task.image_size=16",
        "task.classes=8",
    ],
}
ALGOS = ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "protonet", "pretrain"]
CASES = [(a, w) for a in ALGOS for w in WORKLOADS if not (a == "protonet" and w == "mlp")]


def overrides(algo: str, workload: str, batching: str) -> list[str]:
    extra = [] if algo == "protonet" else [f"algo.inner_lr={LR}", f"algo.inner_steps={STEPS}"]
    if algo not in ("protonet", "metasgd"):
        extra.append("algo.test_inner_steps=3")
    if algo == "mamlpp":
        extra.append("algo.msl_iterations=100")
    return [
        f"algo={algo}",
        *WORKLOADS[workload],
        *extra,
        "device=cpu",
        f"algo.batching={batching}",
    ]


def learned_rates(algorithm: Any) -> dict[str, Tensor]:
    """Model parameter name -> the learned inner rates of that parameter (if any)."""
    rates = getattr(algorithm, "learned_rates", None)
    return dict(rates()) if rates is not None else {}


def compute(algo: str, workload: str, batching: str = "loop") -> dict[str, Any]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        c = build(compose_config(*overrides(algo, workload, batching)))
        algorithm = c.algorithm
        names = [n for n, _ in algorithm.model.named_parameters()]
        rates = learned_rates(algorithm)
        with torch.no_grad():  # distinct rates per element and step, so a mix-up shows
            for k, name in enumerate(names):
                if name in rates:
                    rate = rates[name]
                    wave = torch.sin(1.7 * torch.arange(rate.numel()) + k).reshape(rate.shape)
                    rate.copy_(LR * (1 + 0.5 * wave))
        if algo == "mamlpp":
            algorithm.outer_steps.fill_(30)  # inside the multi-step-loss annealing
        gen = torch.Generator().manual_seed(1)
        batch = c.task.sample(3, "train", gen)
        batch = type(batch)(*(t.double() if t.is_floating_point() else t for t in batch.tensors()))
        out = algorithm.meta_loss(batch)
        loss, metric = out.loss, out.metric
        algorithm.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in algorithm.model.named_parameters()}
        rate_grads = {n: r.grad.clone() for n, r in rates.items() if r.grad is not None}
        algorithm.eval()
        evaluation = algorithm.evaluate(batch)
        return {
            "loss": loss.detach().clone(),
            "metric": metric.detach().clone(),
            "grads": grads,
            "rate_grads": rate_grads,
            "eval_loss": evaluation.loss.clone(),
            "eval_metric": evaluation.metric.clone(),
        }
    finally:
        torch.set_default_dtype(previous)


def relative_error(a: Tensor, b: Tensor) -> float:
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


# Every strategy must match; vmap and threads are also held equal to loop for every
# algorithm by tests/test_contract.py, so the fast suite checks loop alone.
STRATEGIES = [
    "loop",
    pytest.param("vmap", marks=pytest.mark.slow),
    pytest.param("threads", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("batching", STRATEGIES)
@pytest.mark.parametrize(("algo", "workload"), CASES)
def test_meta_gradients_equal_the_stored_values(algo: str, workload: str, batching: str) -> None:
    stored = textdata.read(STORE)[f"{algo}/{workload}"]
    ours = compute(algo, workload, batching)
    assert ours["grads"].keys() == stored["grads"].keys()
    assert ours["rate_grads"].keys() == stored["rate_grads"].keys()
    for key in ("loss", "metric", "eval_loss", "eval_metric"):
        assert relative_error(ours[key], stored[key]) < 1e-10, key
    for group in ("grads", "rate_grads"):
        names = list(stored[group])
        if not names:
            continue
        flat = torch.cat([ours[group][n].flatten() for n in names])
        reference = torch.cat([stored[group][n].flatten() for n in names])
        assert relative_error(flat, reference) < 1e-10, group
        for name in names:  # each tensor, relative to the whole gradient's size
            error = (ours[group][name] - stored[group][name]).norm().item()
            assert error <= 1e-10 * reference.norm().item(), (group, name)
    # Not a vacuous comparison: the stored gradients are far from zero.
    total = sum(v.norm().item() ** 2 for v in stored["grads"].values())
    assert math.isfinite(total) and total > 1e-6


if __name__ == "__main__" and "--write" in sys.argv:
    STORE.parent.mkdir(exist_ok=True)
    textdata.write(STORE, {f"{a}/{w}": compute(a, w) for a, w in CASES})
    print(f"wrote {STORE}")
elif __name__ == "__main__" and "--update" in sys.argv:  # rewrite the named entries only
    values = textdata.read(STORE)
    for key in sys.argv[sys.argv.index("--update") + 1 :]:
        values[key] = compute(*key.split("/"))
        print(f"rewrote {key}")
    textdata.write(STORE, values)
