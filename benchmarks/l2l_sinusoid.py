"""Finn's sinusoid MAML as a learn2learn user writes it: the whole process, for
``sinusoid_process.py`` to time against ``metacli train experiment=maml_sinusoid``.

Usage: python benchmarks/l2l_sinusoid.py [--iterations 2000]   (needs learn2learn)

The loop of learn2learn's examples/maml_sine.py (its ``MAML`` wrapper: clone, adapt,
the query losses summed and backpropagated once) on the settings of the preset: a
1-40-40-1 ReLU network (PyTorch's default initialisation, as that example; the preset
uses cbfinn/maml's truncated normal of std 0.01, which learns more slowly over the first
few thousand iterations, so the two test MSEs after 2,000 iterations differ; the timing
does not depend on it), K=10 support and 10 query points, one inner step of 0.01,
meta-batch 25, Adam 1e-3; amplitudes U[0.1, 5], phases U[0, pi], inputs U[-5, 5] (the
task distribution of metacli's sinusoid). Validation every 1,000 iterations and the
meta-test each adapt 600 tasks with K=5 for 10 steps, the query MSE after each step, as
metacli reports them. Prints one JSON line: the time from the process start to the
first iteration, the training loop's, and the whole process's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import learn2learn as l2l
import torch
from torch import nn


def process_age() -> float:
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")


class SineModel(nn.Module):
    def __init__(self, dim: int = 40) -> None:
        super().__init__()
        self.hidden1, self.hidden2, self.hidden3 = (
            nn.Linear(1, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.hidden1(x))
        x = nn.functional.relu(self.hidden2(x))
        return self.hidden3(x)


def sample(tasks: int, points: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    amplitude = torch.rand(tasks, 1, 1, generator=gen) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=gen) * math.pi
    x = torch.rand(tasks, points, 1, generator=gen) * 10 - 5
    return x, amplitude * torch.sin(x - phase)


def evaluate(maml: l2l.algorithms.MAML, lossfn: nn.Module, gen: torch.Generator) -> float:
    x, y = sample(600, 5 + 10, gen)
    finals = []
    for i in range(600):
        learner = maml.clone()
        for _ in range(10):
            learner.adapt(lossfn(learner(x[i, :5]), y[i, :5]))
            with torch.no_grad():
                query = lossfn(learner(x[i, 5:]), y[i, 5:])  # after each step
        finals.append(query.item())
    return sum(finals) / len(finals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = SineModel()
    maml = l2l.algorithms.MAML(model, lr=0.01, first_order=False, allow_unused=True)
    opt = torch.optim.Adam(maml.parameters(), 1e-3)
    lossfn = nn.MSELoss(reduction="mean")
    first, loop_start = None, time.perf_counter()
    for iteration in range(1, args.iterations + 1):
        if first is None:
            first = process_age()
        x, y = sample(25, 20, gen)
        meta_train_loss = 0.0
        for i in range(25):
            learner = maml.clone()
            learner.adapt(lossfn(learner(x[i, :10]), y[i, :10]))
            meta_train_loss += lossfn(learner(x[i, 10:]), y[i, 10:])
        meta_train_loss = meta_train_loss / 25
        opt.zero_grad()
        meta_train_loss.backward()
        opt.step()
        if iteration % 1000 == 0:
            evaluate(maml, lossfn, torch.Generator().manual_seed(1))
    loop = time.perf_counter() - loop_start
    test = evaluate(maml, lossfn, torch.Generator().manual_seed(2))
    print(
        json.dumps(
            {
                "first_iteration_s": first,
                "loop_s": loop,
                "python_s": time.perf_counter() - start,
                "test_mse": test,
            }
        )
    )


if __name__ == "__main__":
    main()
