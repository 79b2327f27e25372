"""iMAML against the authors' code structure, and its memory against MAML's.

Speed: one meta-iteration (sampling aside: the same meta-batch) on the Omniglot-shaped
workload of benchmarks/run.py (synthetic 28 x 28 images, 5-way 1-shot, 15 queries,
Conv4-64) with iMAML's Omniglot settings (16 SGD steps, lambda 2, 5 CG steps), metacli's
``meta_loss`` + backward + Adam step against aravindr93/imaml_dev's structure: per task,
the weights copied into a second network, ``torch.optim.SGD`` steps on the regularised
loss, the query gradient flattened, conjugate gradient with Hessian-vector products by
double backward, the flat meta-gradient written into ``.grad`` and Adam stepped. Both on
the same model and tasks, alternating in one process; the ratio is the geometric mean
of reference time / metacli time, with a 95% interval.

Memory: peak resident memory of ``metacli train`` processes (each its own VmHWM, less a
run whose parts are all tiny), iMAML with 5 and 50 inner steps against MAML with 5 and
20, on the same workload.

    python benchmarks/imaml.py                 # about 10 minutes on 2 cores
    python benchmarks/imaml.py --skip-memory   # the speed alone
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss
from metacli.build import build
from metacli.composition import compose
from metacli.loop import sample
from run import ROOT, WORKLOADS, alternating, ratio

sys.path.insert(0, str(ROOT))
from tests.test_imaml import textbook_cg

BATCH = 8  # tasks per meta-batch: the paper's 32 at a quarter, for a CPU
SETTINGS = [
    "algo=imaml",
    "algo.inner_lr=0.1",
    "algo.inner_steps=16",
    "algo.lam=2.0",
    "algo.cg_steps=5",
    "algo.cg_damping=1.0",
    "optim.eps=0.001",
]
MEMORY = [  # (label, overrides) on the Omniglot-shaped workload, meta-batch BATCH
    ("imaml, 5 inner steps", ["algo=imaml", "algo.inner_steps=5"]),
    ("imaml, 50 inner steps", ["algo=imaml", "algo.inner_steps=50"]),
    ("maml, 5 inner steps", ["algo=maml", "algo.inner_steps=5"]),
    ("maml, 20 inner steps", ["algo=maml", "algo.inner_steps=20"]),
]


def workload() -> list[str]:
    shape = [o for o in WORKLOADS["omniglot_1step"]["overrides"] if "inner_steps" not in o]
    shape = [o for o in shape if not o.startswith("train.meta_batch_size")]
    return [*shape, f"train.meta_batch_size={BATCH}", "device=cpu"]


def reference_step(components: Any, batch: Any, optimizer: torch.optim.Optimizer) -> None:
    """One outer step as imaml_dev's omniglot_implicit_maml.py takes it."""
    cfg = components.algorithm.cfg
    model = components.algorithm.model
    fast = copy.deepcopy(model)
    inner = torch.optim.SGD(fast.parameters(), lr=cfg.inner_lr)
    w_k = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    meta_grad = torch.zeros_like(w_k)

    def set_params(values: Tensor) -> None:
        offset = 0
        for p in fast.parameters():
            p.data.copy_(values[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def regularization(w_0: Tensor) -> Tensor:
        flat = torch.cat([p.reshape(-1) for p in fast.parameters()])
        return 0.5 * cfg.lam * ((flat - w_0) ** 2).sum()

    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        set_params(w_k.clone())
        for _ in range(cfg.inner_steps):
            inner.zero_grad()
            (F.cross_entropy(fast(sx), sy) + regularization(w_k)).backward()
            inner.step()
        params = list(fast.parameters())
        b = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(fast(qx), qy), params)]
        )

        def evaluator(
            v: Tensor, sx: Tensor = sx, sy: Tensor = sy, params: list[Tensor] = params
        ) -> Tensor:
            grads = torch.autograd.grad(F.cross_entropy(fast(sx), sy), params, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            hvp = torch.autograd.grad((flat * v).sum(), params)
            hv = torch.cat([g.reshape(-1) for g in hvp])
            return (1.0 + cfg.cg_damping) * v + hv / (cfg.lam + cfg.lam_damping)

        meta_grad += textbook_cg(evaluator, b, cfg.cg_steps) / len(batch)
    offset = 0
    for p in model.parameters():
        p.grad = meta_grad[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    optimizer.step()


def metacli_step(components: Any, batch: Any) -> None:
    components.optimizer.zero_grad()
    components.algorithm.meta_loss(batch).loss.backward()
    components.optimizer.step()


def speed(rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    components = build(compose("train", [*workload(), *SETTINGS]))
    components.algorithm.model.train()
    batch = sample(components)
    reference_optimizer = torch.optim.Adam(
        components.algorithm.model.parameters(), lr=1e-3, eps=1e-3
    )
    steps = {
        "reference": lambda: reference_step(components, batch, reference_optimizer),
        "metacli": lambda: metacli_step(components, batch),
    }
    times = alternating(steps, rounds)
    return {
        "reference_ms": 1000 * statistics.median(times["reference"]),
        "metacli_ms": 1000 * statistics.median(times["metacli"]),
        **ratio(times["reference"], times["metacli"]),
        "strategy": components.algorithm.batching,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, 1 thread, meta-batch {BATCH}, 16 inner steps, 5 CG steps\n")
    found = speed(args.rounds)
    print("| workload | reference ms | metacli ms | metacli picks | speed-up [95%] |")
    print("|---|---:|---:|---|---|")
    print(
        f"| Omniglot-shaped 5-way 1-shot, Conv4-64, meta-batch {BATCH}, 15 queries | "
        f"{found['reference_ms']:.0f} | {found['metacli_ms']:.0f} | {found['strategy']} | "
        f"{found['speedup']:.2f}x [{found['speedup_low']:.2f}-{found['speedup_high']:.2f}] |",
        flush=True,
    )
    if args.skip_memory:
        return
    short = ["train.iterations=2", "train.val_every=2", "val.num_tasks=1", "test.num_tasks=1"]
    tiny = [*workload(), *short, "train.meta_batch_size=1", "model.filters=1"]
    base = peak_rss(tiny)
    print(f"\nBaseline (one task, one filter): {base / 2**20:.0f} MB resident.\n")
    print("| run | peak MB less baseline |")
    print("|---|---:|")
    for label, overrides in MEMORY:
        used = peak_rss([*workload(), *short, *overrides]) - base
        print(f"| {label} | {used / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
