"""Per-task random streams that give the same numbers under vmap, a loop and threads.

``torch.func.vmap`` cannot draw from a ``torch.Generator`` per task, and worker threads
would consume the global generator in whatever order they run. So each task carries a
key (an int64 derived from the seed, the stream, the iteration and the task's index),
and its draws are computed from that key and a call counter by an integer hash written
in plain tensor operations (counter-based, like JAX's PRNG keys): exact under every
transform, on every device, and nothing to checkpoint besides the iteration.

The hash is Wellons' ``lowbias32`` on 32-bit words held in int64 tensors; every product
stays below 2**63, so no operation overflows.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from metacli.errors import MetacliError

MASK32 = 0xFFFFFFFF
KEY_BITS = 62  # keys stay positive in int64


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    high, low = constant >> 16, constant & 0xFFFF
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def mix32(x: Tensor) -> Tensor:
    """lowbias32: a 32-bit integer hash with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


UNDECLARED = (
    "A task drew from its random stream, but neither the algorithm nor its update rule nor "
    "its model declares `stochastic = True`. Set that class attribute where the draw is "
    "made, so that every task is given its stream."
)
GOLDEN64 = 0x9E3779B97F4A7C15  # odd: consecutive indices land far apart


def task_keys(
    seed: int,
    stream: str,
    iteration: int,
    start: int,
    count: int,
    device: torch.device | None = None,
) -> Tensor:
    """Keys [count] of tasks ``start .. start+count-1`` of (seed, stream, iteration).

    A task's key depends on nothing else: not on the meta-batch size, the batching
    strategy, the evaluation chunk or how many runs came before. The keys of one
    iteration are a Weyl sequence from a hashed base (``TaskRandom`` mixes every bit).
    """
    digest = hashlib.sha256(f"metacli-task:{seed}:{stream}:{iteration}".encode()).digest()
    base = int.from_bytes(digest[:8], "little")
    shift = 64 - KEY_BITS
    keys = [((base + i * GOLDEN64) & (2**64 - 1)) >> shift for i in range(start, start + count)]
    return torch.tensor(keys, dtype=torch.int64, device=device)


class TaskRandom:
    """One task's random stream. Every draw advances a counter, so two calls differ.

    Inside a task function, draw only from here (never ``torch.randn``): then a task's
    numbers are the same whichever strategy computes it.
    """

    def __init__(self, key: Tensor | None) -> None:
        self.key = key  # int64 scalar (one element of a batch of keys under vmap)
        self.calls = 0

    def bits(self, count: int) -> Tensor:
        """``count`` independent uniform 32-bit integers (as int64)."""
        if self.key is None:
            raise MetacliError(UNDECLARED)
        self.calls += 1
        low, high = self.key & MASK32, (self.key >> 32) & MASK32
        calls = torch.tensor(self.calls, device=self.key.device)
        # Two 32-bit lanes, one from each half of the key: two tasks share a stream only
        # if both lanes collide (about 2**-64), not just one 32-bit word.
        a = mix32(low ^ mix32(calls))
        b = mix32(high ^ mix32(calls ^ 0x85EBCA6B))
        index = torch.arange(count, dtype=torch.int64, device=self.key.device)
        return mix32(mix32(_mul32(index, 0x9E3779B1) ^ a) ^ b)

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
        """Uniform on the open interval (0, 1)."""
        dtype = dtype or torch.get_default_dtype()
        bits = self.bits(math.prod(shape))
        if dtype == torch.float64:
            values = (bits.to(dtype) + 0.5) * 2.0**-32
        else:  # 24 bits fill a float32 mantissa exactly
            values = ((bits >> 8).to(dtype) + 0.5) * 2.0**-24
        return values.reshape(shape)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal (Box-Muller)."""
        count = math.prod(shape)
        u = self.uniform((2, count), dtype)
        z = torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2.0 * math.pi * u[1])
        return z.reshape(shape)

    def gumbel(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
        """Standard Gumbel, for Gumbel-softmax and Gumbel-max sampling."""
        return -torch.log(-torch.log(self.uniform(shape, dtype)))

    def bernoulli(
        self, probability: float | Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> Tensor:
        """0/1 draws with P(1) = ``probability`` (dropout masks)."""
        return (self.uniform(shape, dtype) < probability).to(dtype or torch.get_default_dtype())
