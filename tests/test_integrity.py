"""Nothing lost, nothing mixed: signals, one writer per folder, failed writes, NaN/Inf,
a cache built by two processes at once, progress lines."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from metacli import files, run_folder
from metacli.build import build
from metacli.checkpoint import LoopState, load_checkpoint
from metacli.errors import MetacliError
from metacli.lock import FolderLock
from metacli.loop import NonFinite, Progress, described, meta_train, nonfinite
from metacli.signals import StopNow, Stopper
from metacli.tasks.images import cached
from tests.conftest import TINY, compose_config, read_summary, run_cli

SLOW_ITERATIONS = ("train.meta_batch_size=10000", "train.iterations=100000")  # ~0.7 s each


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "metacli", "train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(process: subprocess.Popen[str], text: str, timeout: float = 120) -> list[str]:
    """Lines of stdout up to the first that contains ``text``."""
    assert process.stdout is not None
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()
    pytest.fail(f"no {text!r} in the output:\n{''.join(lines)}")


# --- signals ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_first_ctrl_c_is_acknowledged_and_a_second_stops_at_once(tmp_path: Path) -> None:
    process = start(
        *TINY, *SLOW_ITERATIONS, "train.ckpt_every=1", "hydra.run.dir=run", cwd=tmp_path
    )
    first = wait_for(process, "iter ")  # a progress line within seconds, off a terminal too
    assert f"Run folder: {tmp_path / 'run'}" in first[0]  # the folder and overrides first
    assert "Overrides: debug=tiny train.meta_batch_size=10000" in first[1]
    wait_for(process, "iter ")  # and another: last.pt exists by now (ckpt_every=1)
    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    acknowledged = process.stderr.readline() + process.stderr.readline()
    assert "stopping after this iteration" in acknowledged and "press Ctrl-C again" in acknowledged
    process.send_signal(signal.SIGINT)  # mid-iteration: an iteration takes about a second
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "interrupted" and "during meta-training" in summary["error"]
    held = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"]
    assert f"checkpoints/last.pt holds iteration {held}" in summary["error"]


def test_a_second_signal_stops_at_once_and_the_folder_records_it(tmp_path: Path) -> None:
    """The policy in-process (the slow test above sends real signals to a real run)."""
    stopper = Stopper()
    with stopper.installed():
        with stopper.during("meta-training", graceful=True):
            stopper.handler(signal.SIGTERM, None)  # a request, honoured after the iteration
            assert stopper.requested == signal.SIGTERM
            with pytest.raises(StopNow) as now:
                stopper.handler(signal.SIGINT, None)
        assert now.value.signum == signal.SIGINT and now.value.phase == "meta-training"
        stopper.handler(signal.SIGINT, None)  # while the stop is recorded: ignored
    folder = folder_with_files(tmp_path)
    with pytest.raises(SystemExit) as exit, folder.guard():
        raise StopNow(signal.SIGTERM, "the meta-test")
    assert exit.value.code == 143
    summary = read_summary(folder.root)
    assert summary["status"] == "interrupted"
    assert summary["error"].startswith("Stopped by SIGTERM during the meta-test; checkpoints/")
    assert "holds iteration 1" in summary["error"]


@pytest.mark.slow
def test_sigterm_during_the_meta_test_exits_143_and_resume_redoes_it(tmp_path: Path) -> None:
    long_test = ("test.num_tasks=400000", "test.batch_size=20000")
    process = start(*TINY, *long_test, "hydra.run.dir=run", cwd=tmp_path)
    wait_for(process, "iter 20: val")
    time.sleep(1.0)  # into the meta-test
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, out + err
    assert "Traceback" not in out + err
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "interrupted" and "during the meta-test" in summary["error"]
    assert "test" not in summary
    run_cli("train", "resume=run", "test.num_tasks=50", cwd=tmp_path)
    resumed = read_summary(tmp_path / "run")
    assert resumed["status"] == "finished" and resumed["test"]["num_tasks"] == 50
    assert resumed["resumed_from_iteration"] == 20 and resumed["iterations"] == 20


# --- one writer per folder -------------------------------------------------------------------
def hold(path: str, ready: Any, release: Any) -> None:
    with FolderLock(Path(path), "a test holder"):
        ready.set()
        release.wait(30)


def test_a_live_owner_stops_a_second_writer_and_a_dead_one_does_not(tmp_path: Path) -> None:
    lock = tmp_path / "run" / ".lock"
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    owner = context.Process(target=hold, args=(str(lock), ready, release))
    owner.start()
    assert ready.wait(60)
    with pytest.raises(MetacliError, match=rf"in use by pid {owner.pid} on host"):
        FolderLock(lock, "second").acquire()
    owner.kill()  # dies without releasing: the operating system does
    owner.join()
    with FolderLock(lock, "third"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def build_slowly(counter: str, out: str) -> None:
    def build() -> dict[str, Any]:
        with open(counter, "a") as handle:
            handle.write("built\n")
        time.sleep(1.5)
        return {"images": torch.arange(1000)}

    data = cached(Path(out), "fixture", {"a": 1}, build)
    torch.save(data["images"], f"{out}/{os.getpid()}.result")


def test_two_processes_building_one_cache_entry_build_it_once(tmp_path: Path) -> None:
    counter, out = tmp_path / "builds.txt", tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=build_slowly, args=(str(counter), str(out))) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert counter.read_text() == "built\n"  # the second waited and read the first's file
    results = [torch.load(p) for p in out.glob("*.result")]
    assert len(results) == 2 and all(torch.equal(r, torch.arange(1000)) for r in results)
    assert len(list(out.glob("fixture-*.pt"))) == 1 and not list(out.glob("*.tmp"))


# --- failed writes ---------------------------------------------------------------------------
def folder_with_files(tmp_path: Path) -> run_folder.RunFolder:
    folder = run_folder.RunFolder(tmp_path / "run", ["seed=0"])
    folder.claim()
    folder.start(compose_config(*TINY))
    folder.log_metrics({"iteration": 1, "split": "train", "loss": 1.0})
    folder.save_checkpoint("last", {"format": "metacli", "iteration": 1})
    return folder


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES], ids=["disk full", "permission"])
def test_a_failed_write_keeps_the_previous_file_and_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    folder = folder_with_files(tmp_path)
    before = {p: p.read_bytes() for p in (folder.summary_path, folder.metrics_path)}
    checkpoint = folder.checkpoints / "last.pt"
    kept = checkpoint.read_bytes()

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(error, os.strerror(error))

    real_write = os.write

    def half_then_fail(fd: int, data: Any) -> int:  # a line cut off mid-way
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(error, os.strerror(error))

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fsync", fail)
        with pytest.raises(run_folder.WriteError, match=rf"Cannot write {folder.summary_path}: "):
            folder.update_summary(status="finished")
        with pytest.raises(run_folder.WriteError, match=rf"Cannot write {checkpoint}: "):
            folder.save_checkpoint("last", {"format": "metacli", "iteration": 2})
    with monkeypatch.context() as patch:
        patch.setattr(run_folder.os, "write", half_then_fail)
        with pytest.raises(run_folder.WriteError, match=rf"Cannot write {folder.metrics_path}: "):
            folder.log_metrics({"iteration": 2, "split": "train", "loss": 0.5})
    assert {p: p.read_bytes() for p in before} == before
    assert checkpoint.read_bytes() == kept and load_checkpoint(checkpoint)["iteration"] == 1
    assert not list(folder.root.rglob("*.tmp"))


def test_a_failed_write_names_only_checkpoints_that_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first last.pt cannot be written: the advice resumes from best.pt, the one
    checkpoint there is; with none, it says so and does not offer a resume."""
    folder = run_folder.RunFolder(tmp_path / "run", ["seed=0"])
    folder.claim()
    folder.start(compose_config(*TINY))

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    last = folder.checkpoints / "last.pt"
    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fsync", full)
        with pytest.raises(run_folder.WriteError) as nothing:
            folder.save_checkpoint("last", {"format": "metacli", "iteration": 10})
    message = str(nothing.value)
    assert f"Cannot write {last}: No space left on device. It was not created." in message
    assert "no checkpoint was written yet: run the command again" in message
    assert "resume=" not in message and "intact" not in message
    folder.save_checkpoint("best", {"format": "metacli", "iteration": 10})
    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fsync", full)
        with pytest.raises(run_folder.WriteError) as only_best:
            folder.save_checkpoint("last", {"format": "metacli", "iteration": 10})
    message = str(only_best.value)
    assert "It was not created" in message and not last.exists()
    assert "checkpoints/best.pt holds iteration 10. Continue with: metacli train " in message
    assert f"resume={folder.root}" in message and "last.pt holds" not in message


@pytest.mark.slow
def test_a_full_disk_during_training_stops_with_the_path_and_keeps_last_pt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_cli("train", *TINY, "hydra.run.dir=run", cwd=tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    kept = last.read_bytes()
    code = (
        "import os, sys\n"
        "from metacli import files, cli\n"
        "real = os.replace\n"
        "def replace(a, b):\n"
        "    if str(b).endswith('last.pt'): raise OSError(28, 'No space left on device')\n"
        "    return real(a, b)\n"
        "files.os.replace = replace\n"
        "cli.main(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "train", "resume=run", "train.iterations=40"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert f"Cannot write {last.resolve()}: No space left on device" in output or (
        f"Cannot write {last}: No space left on device" in output
    ), output
    assert last.read_bytes() == kept  # iteration 20, loadable
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]


# --- NaN and Inf -----------------------------------------------------------------------------
class Memory:
    """A Recorder in memory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: list[dict[str, Any]] = []
        self.saved: dict[str, int] = {}

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def save_checkpoint(self, name: str, checkpoint: dict[str, Any]) -> None:
        self.saved[name] = checkpoint["iteration"]

    def write_text(self, name: str, text: str) -> None:
        pass

    def log_tasks(self, lines: Iterable[str]) -> None:
        pass


def poisoned(c: Any, at: set[int]) -> None:
    """Make the meta-loss NaN at the given (1-based) iterations."""
    real = c.algorithm.meta_loss
    calls = {"n": 0}

    def meta_loss(batch: Any) -> Any:
        calls["n"] += 1
        out = real(batch)
        if calls["n"] in at:
            out.loss = out.loss * float("nan")
        return out

    c.algorithm.meta_loss = meta_loss


def test_nonfinite_names_the_loss_or_the_tensor() -> None:
    c = build(compose_config(*TINY, "device=cpu"))
    batch = c.task.sample(2, "train", torch.Generator().manual_seed(0))
    loss = c.algorithm.meta_loss(batch).loss
    loss.backward()
    assert nonfinite(c, loss) is None
    name, p = next(iter(c.algorithm.named_parameters()))
    assert p.grad is not None
    p.grad[0] = float("inf")
    assert nonfinite(c, loss) == f"the meta-gradient of {name}"
    assert str(nonfinite(c, loss * float("nan"))).startswith("the meta-loss (nan")


def test_on_nan_stop_names_the_iteration_and_the_checkpoint_that_exists(tmp_path: Path) -> None:
    c = build(compose_config(*TINY, "device=cpu", "train.ckpt_every=2"))
    poisoned(c, {5})
    recorder = Memory(tmp_path)
    with pytest.raises(NonFinite) as stopped:
        meta_train(c, recorder, LoopState())
    message = str(stopped.value)
    assert "The meta-loss (nan) is not finite at iteration 5 (train.on_nan=stop)" in message
    assert "checkpoints/last.pt holds iteration 4, the last good state" in message
    early = build(compose_config(*TINY, "device=cpu", "train.ckpt_every=10"))
    poisoned(early, {1})
    with pytest.raises(NonFinite, match="no checkpoint was written yet"):
        meta_train(early, Memory(tmp_path), LoopState())


def test_on_nan_skip_skips_the_update_counts_it_and_stops_after_n_in_a_row(
    tmp_path: Path,
) -> None:
    skip = ("train.on_nan=skip", "train.nan_skips=2", "train.log_every=20")
    c = build(compose_config(*TINY, "device=cpu", *skip))
    poisoned(c, {3, 4})
    recorder = Memory(tmp_path)
    state = meta_train(c, recorder, LoopState())
    assert state.iteration == 20
    [train] = [r for r in recorder.records if r["split"] == "train"]
    assert train["nan_skipped"] == 2 and torch.isfinite(torch.tensor(train["loss"]))
    steps = {int(s["step"]) for s in c.optimizer.state.values()}
    assert steps == {18}  # Adam took 18 steps in 20 iterations: two updates were skipped
    again = build(compose_config(*TINY, "device=cpu", *skip))
    poisoned(again, {3, 4, 5})
    with pytest.raises(NonFinite, match=r"3 iterations in a row, more than train\.nan_skips=2"):
        meta_train(again, Memory(tmp_path), LoopState())


# --- progress --------------------------------------------------------------------------------
def test_progress_is_timely_and_its_eta_leaves_out_the_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = {"t": 0.0}
    monkeypatch.setattr("metacli.loop.time.perf_counter", lambda: now["t"])
    progress = Progress(total=100_000, done=0)
    now["t"] = 1.0
    assert not progress.due(1)
    now["t"] = 2.5
    assert progress.due(3)  # the first line after two seconds
    assert progress.update(3) == pytest.approx(3 / 2.5)  # a warm-up: slow first iterations
    now["t"] = 20.0
    assert not progress.due(20)  # then every 30 s (or every log_every iterations)
    now["t"] = 33.0
    assert progress.due(40)
    assert progress.update(40) == pytest.approx(37 / 30.5)  # since the first line only
    note = progress.long_run_note(40)
    assert note is not None and "the remaining 99960 iterations take about" in note
    assert progress.long_run_note(41) is None  # said once


def test_the_eta_counts_the_validations_to_come(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 iterations at 10 it/s after a slow start, a 5 s validation every 100: the
    ETA at iteration 100 is the 900 iterations left plus the 9 validations left."""
    now = {"t": 0.0}
    monkeypatch.setattr("metacli.loop.time.perf_counter", lambda: now["t"])
    progress = Progress(total=1000, done=0, val_every=100)
    now["t"] = 3.0
    progress.update(2)  # the warm-up: 2 iterations in 3 s
    now["t"] = 3.0 + 9.8 + 5.0  # 98 more iterations at 10 it/s, then a validation
    progress.evaluated(5.0)
    progress.update(100)
    assert progress.rate == pytest.approx(10.0)
    assert progress.eta(100) == pytest.approx(900 / 10 + 9 * 5.0)


def test_a_progress_line_shows_every_logged_term() -> None:
    assert described({}, "mse") == "loss -"  # a resumed run before its first line
    # regression: the metric is the loss, said once
    assert described({"loss": 0.5, "metric": 0.5}, "mse") == "loss 0.5000"
    line = described({"loss": 1.2, "metric": 0.625, "kl": 0.01234, "beta": 2.0}, "accuracy")
    assert line == "loss 1.2000  accuracy 0.6250  kl 0.01234  beta 2"
    many = {"loss": 1.0, "metric": 0.5, **{f"edge{i}": float(i) for i in range(10)}}
    assert described(many, "accuracy").endswith("edge3 3  +6 terms in metrics.jsonl")


def test_data_decoding_says_how_far_it_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Off a terminal: a line every 10% and at least every 30 s, with a rate and ETA."""
    from metacli import console

    now = {"t": 0.0}
    monkeypatch.setattr("metacli.console.time.perf_counter", lambda: now["t"])
    monkeypatch.setattr(console, "CONSOLE", types.SimpleNamespace(is_terminal=False))
    items = list(range(1000))
    caplog.set_level(logging.INFO, logger=console.PROGRESS_LOGGER)
    for item in console.track(items, "Decoding"):
        now["t"] += 0.5 if item < 50 else 0.001  # the first 5%: slow (a cold disk)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "Decoding: 0/1000"
    assert "Decoding: 1/1000" not in lines
    slow = [line for line in lines if line.startswith("Decoding: 2") and "/s" in line]
    assert slow, lines  # past 30 s inside the first 10%: a line with its rate and ETA
    assert lines[-1] == "Decoding: 1000/1000" and "Decoding: 100/1000" in " ".join(lines)


# --- memory ----------------------------------------------------------------------------------
def resident_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_is_steady_over_2000_second_order_iterations(tmp_path: Path) -> None:
    c = build(compose_config("device=cpu", "train.iterations=2000", "train.log_every=100"))
    assert not c.cfg.algo.first_order
    resident: dict[int, float] = {}

    class Sampler(Memory):
        def log_metrics(self, record: dict[str, Any]) -> None:
            super().log_metrics(record)
            if record["split"] == "train":
                resident[record["iteration"]] = resident_mb()

    meta_train(c, Sampler(tmp_path), LoopState())
    print(f"resident MB at 200: {resident[200]:.1f}, at 2000: {resident[2000]:.1f}")
    assert resident[2000] <= 1.10 * resident[200]


def test_a_long_evaluation_says_how_far_it_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A line after 5 s, then every 30 s, with the tasks done, the rate and an ETA (a
    clock that moves 20 s a reading: 16 tasks in batches of 4)."""
    from metacli.console import PROGRESS_LOGGER
    from metacli.evaluation import evaluate

    c = build(compose_config(*TINY, "device=cpu"))
    clock = {"t": 0.0}

    def tick() -> float:
        clock["t"] += 20.0
        return clock["t"]

    monkeypatch.setattr("metacli.evaluation.time.perf_counter", tick)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        evaluate(c, "test", 16, 4)
    lines = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert lines and lines[0] == "meta-test: its 16 tasks drawn; adapting to them"
    assert any(line.startswith("meta-test: 8 of 16 tasks") for line in lines), lines
    assert all("tasks/s  eta 0:" in line for line in lines[1:])
