"""Resources before any work (issue 33, point 1): the memory estimate from the shapes on
the meta device, what the machine can give (cgroup, ulimit), the refusal, an allocation
that fails anyway; and the default thread count (point 2)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import metacli
from metacli import machine, resources
from metacli.build import resolve
from metacli.errors import MetacliError
from tests.conftest import compose_config, read_summary, run_cli


def test_counting_follows_what_is_alive() -> None:
    counting = resources.Counting()
    with counting:
        a = torch.empty(100, 10, device="meta")  # 4,000 bytes
        b = a * 2  # 4,000 more
        c = b.view(1000)  # a view: nothing new
        b.add_(1)  # in place: nothing new
        assert counting.live == 8000 and counting.peak == 8000
        del a
        assert counting.live == 4000  # b is alive through c
        del b
        assert counting.live == 4000
        del c
        assert counting.live == 0 and counting.peak == 8000


def test_the_model_is_measured_without_being_allocated() -> None:
    resolved = resolve(compose_config("model.hidden=[100000,100000]"))
    shapes = resources.model_shapes(resolved, torch.device("cpu"))
    assert shapes.parameters == 1 * 100000 + 100000 + 100000 * 100000 + 100000 + 100000 + 1
    # the forward pass keeps each layer's output (and ReLU's), 4 bytes a float
    assert 2 * 100000 * 4 <= shapes.kept <= 6 * 100000 * 4
    assert shapes.training_batching == "vmap"


def needs_of(*overrides: str) -> dict[str, int]:
    resolved = resolve(compose_config(*overrides))
    needs = resources.estimate(resolved, torch.device("cpu"))
    assert needs is not None
    return {need.key: need.bytes for need in needs}


def test_each_part_grows_with_its_setting() -> None:
    base = needs_of()
    assert needs_of("train.meta_batch_size=50")["train.meta_batch_size"] == pytest.approx(
        2 * base["train.meta_batch_size"]
    )
    assert needs_of("test.num_tasks=1200")["test.num_tasks"] == 2 * base["test.num_tasks"]
    bigger = needs_of("model.hidden=[80,80]")
    assert bigger["model"] > 3 * base["model"]  # 40x40 -> 80x80 weights
    # a task's own size: more shots, more bytes per task
    assert needs_of("task.shots=20")["test.num_tasks"] > base["test.num_tasks"]


def test_the_estimate_is_near_what_a_run_uses(tmp_path: Path) -> None:
    from benchmarks.memory import SHORT, TINY, peak_rss

    base = peak_rss(list(TINY), cwd=str(tmp_path))
    big = ["train.meta_batch_size=6000", "val.num_tasks=1", "test.num_tasks=1"]
    used = peak_rss(big, cwd=str(tmp_path)) - base
    estimate = sum(needs_of(*SHORT, *big).values())
    assert 0.5 < used / estimate < 2.0, (used, estimate)


def test_an_outsized_run_is_refused_before_anything_exists(tmp_path: Path) -> None:
    result = run_cli("train", "train.meta_batch_size=100000000", cwd=tmp_path, check=False)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "metacli train: This run needs about" in message and "Traceback" not in result.stderr
    assert "Lower train.meta_batch_size (now 100,000,000; at most" in message
    assert not (tmp_path / "outputs").exists()


def under_limit(megabytes: int, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`metacli train` under `ulimit -v` of ``megabytes``."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))

    return subprocess.run(
        [sys.executable, "-m", "metacli", "train", "threads=1", "train.iterations=2", *overrides],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )


def test_a_process_limit_is_respected(tmp_path: Path) -> None:
    """Under `ulimit -v` the room is what the limit leaves: refused with its name, and a
    smaller meta-batch runs to the end under the same limit."""
    refused = under_limit(3000, "train.meta_batch_size=60000", f"hydra.run.dir={tmp_path}/a")
    assert refused.returncode == 2, refused.stderr
    assert "left under this process's limit (ulimit -v)" in refused.stderr
    assert not (tmp_path / "a").exists()
    fits = under_limit(3000, "train.meta_batch_size=2000", f"hydra.run.dir={tmp_path}/b")
    assert fits.returncode == 0, fits.stderr
    assert read_summary(tmp_path / "b")["status"] == "finished"


def test_cgroup_limits_are_read(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/job\n")
    folder = tmp_path / "fs" / "user.slice" / "job"
    folder.mkdir(parents=True)
    (folder / "memory.max").write_text(f"{4 << 30}\n")
    (folder / "memory.current").write_text(f"{1 << 30}\n")
    assert machine.cgroup_room(proc, tmp_path / "fs") == 3 << 30
    (folder / "memory.max").write_text("max\n")
    assert machine.cgroup_room(proc, tmp_path / "fs") is None
    proc.write_text("4:memory:/job\n")  # cgroup v1
    v1 = tmp_path / "fs" / "memory" / "job"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 29}\n")
    assert machine.cgroup_room(proc, tmp_path / "fs") == (2 << 30) - (1 << 29)


def test_an_allocation_that_fails_anyway_is_a_failed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the estimate (another process took the memory meanwhile): the run is
    recorded as failed with what to lower and how to continue, never a traceback."""
    from metacli.algorithms.maml import MAML

    real = MAML.meta_loss
    calls = {"n": 0}

    def meta_loss(self: Any, batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 8000000000 bytes."
            )
        return real(self, batch)

    monkeypatch.setattr(MAML, "meta_loss", meta_loss)
    run = tmp_path / "run"
    with pytest.raises(MetacliError, match="Ran out of memory during meta-training"):
        metacli.train(
            ["debug=tiny", "train.iterations=10", "train.val_every=5", "threads=1"], run_dir=run
        )
    summary = read_summary(run)
    assert summary["status"] == "failed"
    assert "can't allocate memory" in summary["error"] and "traceback" not in summary
    assert "Lower train.meta_batch_size, val.batch_size and test.batch_size" in summary["error"]
    assert (
        f"checkpoints/last.pt holds iteration 5. Continue with: metacli train resume={run}"
        in (summary["error"])
    )


def test_one_thread_for_small_networks_and_the_free_cores_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert machine.choose(8, few_threads=True)[0] == 1
    monkeypatch.setattr(machine, "affinity_cores", lambda: 8)
    monkeypatch.setattr(machine, "others_running", lambda: 3)
    threads, why = machine.choose(8, few_threads=False)
    assert threads == 5 and why == "5: 8 cores, 3 busy with other processes"
    monkeypatch.setattr(machine, "others_running", lambda: 20)
    assert machine.choose(8, few_threads=False)[0] == 1
    monkeypatch.setattr(machine, "others_running", lambda: 0)
    assert machine.choose(4, few_threads=False) == (4, "4: the cores of this job")


def test_a_crowded_machine_is_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "affinity_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 3.0))
    watch = machine.LoadWatch(threads=2)
    watch.wall -= 10.0  # ten seconds of wall time with almost no CPU time in them
    note = watch.check(rate=12.0)
    assert note is not None and "torch runs 2 threads" in note and "Set threads=1" in note
    watch.wall -= 10.0
    assert watch.check(rate=12.0) is None  # once
    single = machine.LoadWatch(threads=1)
    single.wall -= 10.0
    assert single.check(rate=12.0) is None  # one thread cannot oversubscribe


def test_the_summary_records_the_thread_choice(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_cli("train", "debug=tiny", f"hydra.run.dir={run}", cwd=tmp_path)
    summary = read_summary(run)
    assert summary["threads"] == 1
    assert summary["threads_chosen"].startswith("1: a small network")
    cores = machine.affinity_cores()
    run_cli("train", "debug=tiny", "threads=1", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert read_summary(tmp_path / "one")["threads_chosen"] == "1: set by threads"
    more = tmp_path / "more"
    run_cli("train", "debug=tiny", f"threads={cores + 1}", f"hydra.run.dir={more}", cwd=tmp_path)
    summary = read_summary(more)
    assert summary["threads"] == cores + 1
    assert summary["threads_chosen"] == f"{cores + 1}: set by threads, more than the {cores} cores"
    log = (more / "metacli.log").read_text()
    assert f"threads={cores + 1} is more than the {cores} cores this process may use" in log


def test_a_heads_own_memory_is_counted_per_task() -> None:
    """Relation Networks score every (class, query) pair of a task at once: 200 ways
    make 3,000 x 200 pairs of feature maps per task, which the estimate counts (and
    refuses on this machine) while the network's own passes alone would look small."""
    small = ("task=synthetic", "task.image_size=28", "model=conv4", "model.pool_blocks=2")
    base = needs_of("algo=relationnet", *small)
    wide = needs_of("algo=relationnet", *small, "task.ways=200", "task.classes=200")
    pairs = (200 * 15 * 200) / (5 * 15 * 5)  # pairs per task, against the default's
    assert wide["test.batch_size"] > 0.5 * pairs * base["test.batch_size"]
    assert sum(wide.values()) > 1e12  # a terabyte: refused before anything runs
    protonet = needs_of("algo=protonet", "task=synthetic", "task.image_size=28", "model=conv4")
    assert protonet["test.batch_size"] < base["test.batch_size"] / 10  # no pairs there
