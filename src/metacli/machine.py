"""What this machine can give a run: the memory left to this process (the memory check
before a run, ``metacli.resources``), and how many CPU threads torch gets when
``threads`` is not set, with a watch for a machine that became busier than its cores.

torch takes every core by default. Where other work runs on the machine its threads and
torch's compete, and a pass that waits for its slowest thread waits for the busiest core:
on 2 cores with one other busy process a small-MLP run fell from about 550 to 10-100 it/s
on 2 threads (docs/threads.md, ``benchmarks/threads.py``). So the default is

- one thread for the small networks whose steps are many small operations (the MLPs of
  the regression tasks: ``Model.few_threads``), which run fastest on one thread anyway;
- otherwise the cores this job may use (a launcher's share), less the threads of other
  processes running right now (``/proc/stat``'s ``procs_running``, sampled).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path


def affinity_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def others_running(samples: int = 7, interval: float = 0.01) -> int:
    """Threads of other processes running now: the median of ``procs_running`` (every
    runnable thread on the machine) over a few samples, less this one."""
    counts = []
    for index in range(samples):
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("procs_running "):
                    counts.append(int(line.split()[1]))
        except (OSError, ValueError):
            return 0
        if index + 1 < samples:
            time.sleep(interval)
    return max(0, round(statistics.median(counts)) - 1) if counts else 0


def choose(share: int, few_threads: bool) -> tuple[int, str]:
    """Threads for a job given ``share`` cores, and why (recorded in summary.json)."""
    if few_threads:
        return 1, "1: a small network, fastest on one thread (docs/threads.md)"
    busy = others_running()
    threads = max(1, min(share, affinity_cores() - busy))
    if threads < share:
        return threads, f"{threads}: {share} cores, {busy} busy with other processes"
    return threads, f"{threads}: the cores of this job"


class LoadWatch:
    """Says once when the process gets much less CPU than its threads while the machine
    runs more threads than it has cores: torch's threads are then waiting for cores."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.warned = False

    def check(self, rate: float | None) -> str | None:
        wall, cpu = time.perf_counter(), time.process_time()
        share = (cpu - self.cpu) / max(wall - self.wall, 1e-9)
        self.wall, self.cpu = wall, cpu
        if self.warned or self.threads <= 1 or rate is None:
            return None
        cores = affinity_cores()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load <= cores or share >= 0.6 * self.threads:
            return None
        self.warned = True
        return (
            f"torch runs {self.threads} threads, but this process got {share:.1f} cores of "
            f"CPU time while the machine's load is {load:.1f} on {cores} cores: other work "
            f"competes for the cores, and at {rate:.2f} it/s this run may be many times "
            f"slower than it would be with fewer threads. Set threads=1 (or threads=null "
            f"to let metacli choose from the machine's load at the start)."
        )


def memory_room() -> tuple[int, str]:
    """Bytes this process may still allocate in host memory, and where that figure is
    from: the least of what the machine, this job's cgroup and ``ulimit`` leave."""
    limits = [(meminfo("MemAvailable"), "available on this machine (MemAvailable)")]
    cgroup = cgroup_room()
    if cgroup is not None:
        limits.append((cgroup, "left under this job's memory limit (cgroup)"))
    for which, name in ((resource.RLIMIT_AS, "ulimit -v"), (resource.RLIMIT_DATA, "ulimit -d")):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY:
            used = meminfo("VmSize", Path("/proc/self/status")) or 0
            limits.append((max(soft - used, 0), f"left under this process's limit ({name})"))
    known = [(b, where) for b, where in limits if b is not None]
    return min(known) if known else (1 << 62, "unknown")


def meminfo(field: str, path: Path = Path("/proc/meminfo")) -> int | None:
    """A ``field: N kB`` line of a /proc file, in bytes (None off Linux)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_room(
    own_file: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1); None: no limit."""
    try:
        own = own_file.read_text().splitlines()
    except OSError:
        return None
    for line in own:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            folder = root / path.lstrip("/")
            names = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            folder = root / "memory" / path.lstrip("/")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit_text = (folder / names[0]).read_text().strip()
            used = int((folder / names[1]).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:
            continue
        return max(int(limit_text) - used, 0)
    return None
