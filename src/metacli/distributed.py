"""Meta-training over several processes: each rank takes a share of every meta-batch.

Parallel across the tasks of a meta-batch, never inside one task. Every rank draws the
whole meta-batch from the same seeded stream (so a run with N processes sees exactly the
tasks of a one-process run with the same ``train.meta_batch_size``), computes the
meta-gradient of its contiguous share of the tasks, weighted by share / meta-batch, and
the gradients are summed over the ranks (one all-reduce of one flat buffer per
iteration, which also carries the loss, the metric and the named terms; a one-number
all-reduce after it agrees on stopping). Every rank then takes the same optimizer step,
so the meta-parameters stay equal without a broadcast.
Validation and meta-test tasks are split the same way and gathered in task order.

Rank 0 alone writes the run folder and prints; the others only compute. The world comes
from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), from a
Slurm step of several tasks (submitit: ``SLURM_PROCID``, ...), or from ``metacli train
distributed.nproc=N``, which starts N local processes itself (``launch``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from metacli.errors import MetacliError

T = TypeVar("T")
LOST = (
    "Another process of this distributed run stopped or cannot be reached ({what}). The "
    "run stops here; checkpoints/last.pt holds the last state that all ranks agreed on. "
    "Continue with `metacli train resume=<run folder>` (with any number of processes), "
    "or raise distributed.timeout_s if a rank is only slow."
)


class RankLost(MetacliError):
    """A collective failed: a rank died, or waited past ``distributed.timeout_s``."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 unless launched with several."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def share(self, total: int) -> slice:
        """This rank's contiguous share of ``total`` tasks (sizes differ by at most one)."""
        base, extra = divmod(total, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def from_env(env: dict[str, str] | None = None) -> World:
    """The world torchrun (or ``launch``, or ``join`` for a Slurm step) describes in the
    environment; one process otherwise."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env:
        return World(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    return World()


WORLD = from_env()


def slurm_rendezvous(env: dict[str, str]) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT for a Slurm step: its first node, a port from the job id."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        first = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        first = nodes.split(",")[0]
    port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    return {"MASTER_ADDR": env.get("MASTER_ADDR", first), "MASTER_PORT": str(port)}


def slurm_world(env: dict[str, str]) -> dict[str, str]:
    """torchrun's variables for one task of a Slurm step (submitit's tasks_per_node)."""
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
        **slurm_rendezvous(env),
    }


def adopt_slurm_step(nproc: str | None) -> None:
    """In a Slurm step of ``nproc`` > 1 tasks (srun, or submitit's tasks_per_node), set
    torchrun's variables from Slurm's, so that each task is one rank."""
    env = os.environ
    if nproc is None or not nproc.isdigit() or int(nproc) < 2 or "WORLD_SIZE" in env:
        return
    if env.get("SLURM_NTASKS") == nproc and "SLURM_PROCID" in env:
        env.update(slurm_world(dict(env)))


def join(cfg: Any) -> World:
    """The world of a job, joined: torchrun's or the launcher's (joined by the command
    already), or a Slurm step's whose task count is ``distributed.nproc`` (the submitit
    launcher runs the job in each task). A job configured for several processes but
    started as one stops with exit 2 rather than record a config that did not run."""
    import logging

    settings = cfg.distributed
    nproc = int(settings.nproc)
    adopt_slurm_step(str(nproc))
    try:
        world = initialize(str(settings.backend), float(settings.timeout_s))
        if world.size != nproc:
            raise MetacliError(
                f"distributed.nproc={nproc}, but this job was started as {world.size} "
                f"process{'es' * (world.size != 1)}. Start it with `metacli train "
                f"distributed.nproc={nproc}` (one job, not a sweep), with torchrun "
                f"--nproc_per_node, or with a Slurm launcher whose tasks_per_node x nodes is "
                f"{nproc} (README: Scaling out)."
            )
    except MetacliError as err:
        logging.getLogger(__name__).error("%s", err)
        raise SystemExit(2) from None
    return world


def described() -> dict[str, Any]:
    """What summary.json records of the world (nothing for one process)."""
    if not WORLD.active:
        return {}
    import torch.distributed as dist

    return {"processes": WORLD.size, "backend": str(dist.get_backend())}


@contextmanager
def leaving() -> Iterator[None]:
    """Leave the process group when the job ends, however it ends."""
    try:
        yield
    finally:
        shutdown()


def initialize(backend: str, timeout_s: float) -> World:
    """Join the process group of this world (once); returns the world."""
    import torch
    import torch.distributed as dist

    global WORLD
    WORLD = from_env()
    if not WORLD.active or dist.is_initialized():
        return WORLD
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(WORLD.local_rank % torch.cuda.device_count())
    try:
        dist.init_process_group(
            backend,
            rank=WORLD.rank,
            world_size=WORLD.size,
            timeout=dt.timedelta(seconds=timeout_s),
        )
    except Exception as err:  # torch raises RuntimeError, ValueError, DistStoreError...
        raise MetacliError(
            f"Rank {WORLD.rank} of {WORLD.size} could not join the distributed run "
            f"({first_line(err)}). Check MASTER_ADDR/MASTER_PORT and that every rank "
            f"started, or set distributed.backend (gloo on CPUs, nccl on GPUs)."
        ) from None
    return WORLD


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def first_line(err: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without gloo's source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip()).split(". ")[0].splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def collective(what: str, fn: Callable[[], T]) -> T:
    """Run a collective; a failure (a rank gone, a timeout) becomes one paragraph."""
    try:
        return fn()
    except RuntimeError as err:
        raise RankLost(LOST.format(what=f"{what}: {first_line(err)}")) from None


def all_reduce_sum(tensor: Any) -> Any:
    import torch.distributed as dist

    if WORLD.active:
        collective("summing the meta-gradients", lambda: dist.all_reduce(tensor))
    return tensor


def agree_on_stop(requested: int | None) -> int | None:
    """The stop request (a signal number) of any rank, on every rank: all ranks stop after
    the same iteration, whichever of them the signal reached first."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([requested or 0])
    collective("agreeing on a stop", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
    return int(flag.item()) or None


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    if not WORLD.active:
        return [obj]
    out: list[Any] = [None] * WORLD.size
    collective("gathering evaluation results", lambda: dist.all_gather_object(out, obj))
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if not WORLD.active:
        return obj
    box: list[Any] = [obj]
    collective("agreeing with rank 0", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if WORLD.active:
        collective("waiting for rank 0's files", lambda: dist.barrier())


# --- metacli train distributed.nproc=N: N local processes ------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(command: str, args: Sequence[str], nproc: int) -> int:
    """Run ``metacli <command> <args>`` as ``nproc`` ranks on this machine; their exit code.

    The ranks run in a process group of their own, so a terminal's Ctrl-C reaches them
    once, through this launcher: SIGINT and SIGTERM are passed to every rank (they agree
    on the iteration to stop at and rank 0 writes a checkpoint). A rank whose launcher
    dies gets SIGTERM. A rank that fails ends the others, and the launcher says which.
    """
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "metacli", command, *args], env=env, preexec_fn=detach
            )
        )
    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0) and failed is None and not forwarded:
                    failed = (rank, code)
                    stop_others(procs, grace=30.0)
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    if failed is None:
        return codes[0] or max(codes, key=abs)
    rank, code = failed
    if code < 0 or code > 128:  # killed by a signal, not a reported error
        signum = -code if code < 0 else code - 128
        name = signal.Signals(signum).name if signum in signal.valid_signals() else signum
        print(
            f"metacli {command}: rank {rank} of {nproc} was killed ({name}); the other ranks "
            f"were stopped. The run folder keeps checkpoints/last.pt from the last iteration "
            f"all ranks finished: continue with `metacli train resume=<run folder>`.",
            file=sys.stderr,
        )
        return 1
    return codes[0] or code


def detach() -> None:
    """In a rank, before it runs: its own process group, and SIGTERM when the launcher
    dies (Linux; elsewhere the rank outlives a killed launcher)."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_others(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """Give the other ranks ``grace`` seconds to notice (their collectives fail), then end
    them."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
