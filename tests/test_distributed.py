"""Distributed meta-training (metacli.distributed): 2 CPU processes with gloo.

A 2-process run draws the tasks of a 1-process run with the same meta-batch, so its
parameters, validation and meta-test equal the 1-process run's to float32 rounding;
resuming across process counts continues the same run; a rank that dies, or a SIGTERM
to the launcher, ends every rank with a clear message and a usable checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metacli.distributed import World, from_env, slurm_world
from tests.conftest import TINY, read_metrics, read_summary, run_cli

GLOO = ("device=cpu", "distributed.timeout_s=60")


def weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / f"{name}.pt", weights_only=True)["algorithm"]


def assert_same_run(ours: Path, reference: Path) -> None:
    """Parameters to float32 rounding; validation and meta-test to 1e-5."""
    mine, theirs = weights(ours), weights(reference)
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if value.is_floating_point():
            torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(mine[key], value), key
    # a finished run that was extended keeps its earlier meta-tests (earlier_tests)
    earlier = {t["iteration"] for t in read_summary(ours).get("earlier_tests", [])}
    kept = [
        line
        for line in read_metrics(ours)
        if not (str(line.get("split")).startswith("test") and line["iteration"] in earlier)
    ]
    for line, ref in zip(kept, read_metrics(reference), strict=True):
        if line.get("split") in ("val", "test"):
            assert line["iteration"] == ref["iteration"]
            assert line["metric_per_step"] == pytest.approx(ref["metric_per_step"], rel=1e-5)
    assert read_summary(ours)["test"]["mean"] == pytest.approx(
        read_summary(reference)["test"]["mean"], rel=1e-5
    )


def test_shares_cover_the_tasks_in_order() -> None:
    for total in (1, 5, 8, 25):
        for size in range(1, min(total, 4) + 1):
            shares = [World(r, size).share(total) for r in range(size)]
            covered = [i for s in shares for i in range(total)[s]]
            assert covered == list(range(total))
            lengths = [s.stop - s.start for s in shares]
            assert max(lengths) - min(lengths) <= 1


def test_the_world_comes_from_torchrun_or_a_slurm_step() -> None:
    assert from_env({}) == World()
    assert from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(1, 4, 1)
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_NODELIST": "gpu17,gpu18",
        "SLURM_JOB_ID": "123456",
    }
    world = slurm_world(env)
    assert from_env(world) == World(3, 4, 1)
    assert world["LOCAL_WORLD_SIZE"] == "2" and world["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert world["MASTER_ADDR"] in ("gpu17", "gpu18")  # scontrol's first host, where present


def test_two_processes_train_validate_and_test_as_one_and_resume_with_one(
    tmp_path: Path,
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", *TINY, *GLOO, f"hydra.run.dir={one}", cwd=tmp_path)
    result = run_cli(
        "train",
        *TINY,
        *GLOO,
        "distributed.nproc=2",
        "train.iterations=10",
        f"hydra.run.dir={two}",
        cwd=tmp_path,
    )
    # Its 10 iterations, validation and meta-test as the first 10 of the 1-process run
    # (the validation at iteration 10 sees the parameters after 10 steps).
    val = [r for r in read_metrics(two) if r["split"] == "val"]
    ref = [r for r in read_metrics(one) if r["split"] == "val" and r["iteration"] == 10]
    assert len(val) == len(ref) == 1
    assert val[0]["metric_per_step"] == pytest.approx(ref[0]["metric_per_step"], rel=1e-5)
    summary = read_summary(two)
    assert summary["processes"] == 2 and summary["backend"] == "gloo"
    assert summary["config"]["distributed"]["nproc"] == 2  # what ran is recorded
    assert summary["threads"] == max(1, (os.cpu_count() or 1) // 2)
    # one writer: the folder holds one run's files, printed once
    assert result.stdout.count("meta-test on 16 tasks") == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # Resumed with 1 process to 20 iterations, it is the 1-process run: parameters,
    # every validation and the meta-test.
    run_cli("train", f"resume={two}", "distributed.nproc=1", "train.iterations=20", cwd=tmp_path)
    assert read_summary(two)["resumed_from_iteration"] == 10
    assert "processes" not in read_summary(two)
    assert_same_run(two, one)


@pytest.mark.slow
def test_the_tasks_of_a_slurm_step_are_the_ranks(tmp_path: Path) -> None:
    """`srun -n 2 metacli train distributed.nproc=2`, simulated: Slurm's variables only
    (no scontrol here: the node list's first name is the address)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", *TINY, *GLOO, f"hydra.run.dir={one}", cwd=tmp_path)
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "127.0.0.1"}
    slurm["SLURM_JOB_ID"] = str(os.getpid())
    command = [sys.executable, "-m", "metacli", "train", *TINY, *GLOO, "distributed.nproc=2"]
    tasks = [
        subprocess.Popen(
            [*command, f"hydra.run.dir={two}"],
            cwd=tmp_path,
            env={**os.environ, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    for task in tasks:
        task.communicate(timeout=300)
        assert task.returncode == 0
    assert read_summary(two)["processes"] == 2
    assert_same_run(two, one)


@pytest.mark.slow
def test_a_one_process_run_resumes_with_two_through_torchrun(tmp_path: Path) -> None:
    one, half = tmp_path / "one", tmp_path / "half"
    run_cli("train", *TINY, *GLOO, f"hydra.run.dir={one}", cwd=tmp_path)
    run_cli("train", *TINY, *GLOO, "train.iterations=10", f"hydra.run.dir={half}", cwd=tmp_path)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "metacli",
            "train",
            f"resume={half}",
            "train.iterations=20",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert read_summary(half)["processes"] == 2
    assert_same_run(half, one)
    # the meta-test command spreads its tasks too, with the same result
    run_cli(
        "test",
        f"ckpt_path={half}/checkpoints/best.pt",
        "distributed.nproc=2",
        f"hydra.run.dir={tmp_path / 't'}",
        cwd=tmp_path,
    )
    tested = read_summary(tmp_path / "t")
    assert tested["processes"] == 2
    assert tested["test"]["mean"] == pytest.approx(read_summary(half)["test"]["mean"], rel=1e-5)


def start_long_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metacli",
            "train",
            *GLOO,
            "distributed.nproc=2",
            "distributed.timeout_s=30",
            "train.iterations=100000",
            "train.val_every=20",
            "train.log_every=10",
            "val.num_tasks=4",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.pt").exists():  # past the first checkpoint
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach its first checkpoint"
        time.sleep(0.2)
    return proc, run


def ranks_of(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's children."""
    out = {}
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
        out[rank] = pid
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_a_killed_rank_ends_the_run_with_a_clear_message(tmp_path: Path) -> None:
    proc, run = start_long_run(tmp_path)
    os.kill(ranks_of(proc.pid)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=90)  # no hang: the other rank notices at once
    assert proc.returncode != 0
    assert "rank 1 of 2 was killed (SIGKILL)" in err
    assert "Traceback" not in out + err
    summary = read_summary(run)
    assert summary["status"] == "failed"
    assert "Another process of this distributed run stopped" in summary["error"]
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert kept >= 20 and kept % 20 == 0  # the last checkpoint all ranks agreed on


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path: Path) -> None:
    proc, run = start_long_run(tmp_path)
    ranks = ranks_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err
    summary = read_summary(run)
    assert summary["status"] == "interrupted"
    stopped = int(summary["error"].split("at iteration ")[1].split()[0])
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == stopped
    assert err.count("SIGTERM received") == 1  # said once, by rank 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks.values())


def test_a_job_configured_for_two_processes_but_started_as_one_is_refused(
    tmp_path: Path,
) -> None:
    result = run_cli(
        "train", "-m", *TINY, "distributed.nproc=2", "seed=0", cwd=tmp_path, check=False
    )
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "distributed.nproc=2, but this job was started as 1 process" in text
    assert "Traceback" not in text


def test_a_meta_batch_smaller_than_the_processes_is_a_config_error(tmp_path: Path) -> None:
    result = run_cli(
        "train", *TINY, "distributed.nproc=8", "train.meta_batch_size=4", cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert "train.meta_batch_size=4 is not allowed" in result.stderr
    assert "distributed.nproc=8" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_hydra_flags_with_several_processes_start_none(tmp_path: Path) -> None:
    """--cfg (or --help) runs no job: the config is printed once, by this process."""
    result = run_cli("train", "distributed.nproc=2", "--cfg", "job", cwd=tmp_path)
    assert result.stdout.count("\nseed: 0\n") + result.stdout.startswith("seed: 0\n") == 1
    assert "nproc: 2" in result.stdout
