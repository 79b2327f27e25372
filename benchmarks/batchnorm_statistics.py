"""Batch statistics of the fused Conv-4 block in float32: accuracy and time.

PyTorch's CPU batch norm on a channels-last tensor sums its statistics in one float32
pass; on its contiguous (NCHW) path it accumulates in float64. The block of
``metacli/models/fused.py`` works in channels-last memory and computes the statistics
itself in two float32 passes (``batch_statistics``). On the first block of an Omniglot
episode (the images of a training episode of 5-way 1-shot with 15 queries, Conv-4's
initial weights), this prints for each way of computing them the largest error of the
mean and of the inverse standard deviation against float64, the error of the block's
output, and the milliseconds of the statistics alone and of the block's forward and
backward (median of alternated rounds, one thread, in one process).

    python benchmarks/batchnorm_statistics.py [--data ../shared/data/omniglot] [--rounds 30]

Without the Omniglot archives the images are random sparse ink (10 % of the pixels).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.build import build
from metacli.composition import compose
from metacli.loop import sample
from metacli.models.fused import ConvNormPool, batch_statistics, channels_last

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
EPS = 1e-5


def episode_and_block(data: Path) -> tuple[Tensor, list[Tensor]]:
    """An episode's 80 images and the first block's initial weights (seed 0)."""
    if not data.exists():  # random sparse ink, with nn.Conv2d's scale
        gen = torch.Generator().manual_seed(0)
        images = (torch.rand(80, 1, 28, 28, generator=gen) < 0.1).float()
        weight = torch.randn(64, 1, 3, 3, generator=gen) / 3
        return images, [weight, torch.randn(64, generator=gen) / 3, torch.rand(64), torch.zeros(64)]
    overrides = ["algo=protonet", "model=conv4", "model.norm=running", "seed=0"]
    task = ["task=omniglot", f"data.root={data}", "task.ways=5", "task.shots=1", "task.queries=15"]
    components = build(compose("train", [*overrides, *task]))
    batch = sample(components)
    block = components.algorithm.model.blocks[0]
    weights = [block.conv.weight, block.conv.bias, block.norm.weight, block.norm.bias]
    images = torch.cat([batch.support_x[0], batch.query_x[0]])
    return images, [w.detach().clone() for w in weights]


def pytorch_channels_last(z: Tensor) -> tuple[Tensor, Tensor]:
    _, mean, invstd = torch.native_batch_norm(z, None, None, None, None, True, 0.0, EPS)
    return mean, invstd


def pytorch_contiguous(z: Tensor) -> tuple[Tensor, Tensor]:
    return pytorch_channels_last(z.contiguous())


def two_pass(z: Tensor) -> tuple[Tensor, Tensor]:
    mean, var = batch_statistics(z)
    return mean, torch.rsqrt(var + EPS)


def median_ms(work: Callable[[], object], rounds: int) -> float:
    work()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, (weight, bias, scale, shift) = episode_and_block(args.data)
    z = torch.conv2d(channels_last(x), channels_last(weight), bias, 1, 1)
    exact = torch.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
    mean64 = exact.mean((0, 2, 3))
    invstd64 = torch.rsqrt(exact.var((0, 2, 3), unbiased=False) + EPS)
    out64 = F.max_pool2d(
        F.relu(F.batch_norm(exact, None, None, scale.double(), shift.double(), True, 0.0, EPS)), 2
    )
    print(
        f"{len(x)} images, first block: z {tuple(z.shape)}, "
        f"largest |mean| / std {float((mean64.abs() * invstd64).max()):.2f}"
    )
    print("| statistics | mean error | inverse std, relative error | ms |")
    print("|---|---|---|---|")
    for name, stats in [
        ("PyTorch, channels-last (one float32 pass)", pytorch_channels_last),
        ("PyTorch, contiguous (float64 sums)", pytorch_contiguous),
        ("the block's two float32 passes", two_pass),
    ]:
        mean, invstd = stats(z)
        mean_error = float((mean.double() - mean64).abs().max())
        invstd_error = float(((invstd.double() - invstd64) / invstd64).abs().max())
        ms = median_ms(partial(stats, z), args.rounds)
        print(f"| {name} | {mean_error:.1e} | {invstd_error:.1e} | {ms:.2f} |")
    params = [t.clone().requires_grad_() for t in (weight, bias, scale, shift)]
    out = ConvNormPool.apply(x, *params, EPS, False)
    error = float((out.detach().double() - out64).abs().max())
    print(f"block output, largest error against float64: {error:.1e}")
    incoming = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> None:
        ConvNormPool.apply(x, *params, EPS, False).backward(incoming)

    print(f"block forward and backward: {median_ms(forward_backward, args.rounds):.2f} ms")


if __name__ == "__main__":
    main()
