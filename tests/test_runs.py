"""`metacli runs` (listing, filters, rm) and a run's name and tags.

The runs are real tiny trainings where a real one matters (name, tags, the summary's shape)
and hand-written summary.json files for the states a tiny training does not reach (failed
long ago, crashed, live, replaced).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from metacli import cli

from .conftest import TINY, read_summary, run_cli


def runs(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``metacli runs ARGS`` in-process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(["runs", *args])
    out, err = capsys.readouterr()
    return int(stopped.value.code or 0), out, err


def hand_run(folder: Path, status: str, **fields: object) -> Path:
    """A run folder as metacli writes one, its summary.json ``status``."""
    folder.mkdir(parents=True)
    summary = {
        "status": status,
        "command": "train",
        "groups": {"algo": "maml", "task": "sinusoid", "model": "mlp"},
        "config": {"algo": {"name": "maml"}, "task": {"name": "sinusoid"}, "seed": 0},
        "seed": 0,
        "host": platform.node(),
        "started_at": "2026-12-01T10:00:00+00:00",
        **fields,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text("")
    return folder


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real named and tagged run, one real untagged one, and hand-made others."""
    root = tmp_path_factory.mktemp("outputs")
    common = (*TINY, "train.iterations=4", "train.val_every=2")
    run_cli("train", *common, "name=baseline", "tags=[paper,sinusoid]", "hydra.run.dir=named",
            cwd=root)  # fmt: skip
    run_cli("train", *common, "seed=1", "hydra.run.dir=plain", cwd=root)
    return root


def test_name_and_tags_are_recorded_and_do_not_change_the_config(outputs: Path) -> None:
    named, plain = read_summary(outputs / "named"), read_summary(outputs / "plain")
    assert named["name"] == "baseline" and named["tags"] == ["paper", "sinusoid"]
    assert plain["name"] is None and plain["tags"] == []
    assert "name" not in named["config"] and "tags" not in named["config"]


def test_runs_lists_every_run_with_its_status_and_labels(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = runs(str(outputs), capsys=capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if str(outputs) in line]
    assert len(lines) == 2
    named = next(line for line in lines if "named" in line)
    assert "finished" in named and "baseline" in named and "paper, sinusoid" in named
    assert "maml" in named and "sinusoid" in named and "mse" in named
    code, out, _ = runs(str(outputs), "--filter", "name=baseline", capsys=capsys)
    assert "named" in out and "plain" not in out
    code, out, _ = runs(str(outputs), "--filter", "tags=paper", capsys=capsys)
    assert "named" in out and "plain" not in out
    code, out, _ = runs(str(outputs), "--filter", "seed=1", capsys=capsys)
    assert "plain" in out and "named" not in out
    code, out, _ = runs(str(outputs), "--filter", "tags=nothing", capsys=capsys)
    assert code == 0 and "No runs match." in out


def test_compare_shows_and_filters_by_name_and_tags(
    outputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metacli import tables

    assert tables.main([str(outputs), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]  # labels never split a row
    assert row["name"] == "baseline" and row["tags"] == ["paper", "sinusoid"]
    assert row["seeds"] == 2
    assert tables.main([str(outputs), "--filter", "tags=paper", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["name"] == "baseline" and row["seeds"] == 1
    assert tables.main([str(outputs), "--format", "markdown"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "name" in header and "tags" in header


def test_status_and_age_filters_and_rm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A long path: a folder is shown whole on its row, never folded or cut, however deep.
    root = tmp_path / ("outputs_" + "x" * 150)
    test = {"mean": 0.37, "num_tasks": 600, "diverged_tasks": 2, "metric_name": "mse"}
    hand_run(root / "ok", "finished", finished_at="2026-12-01T11:00:00+00:00", test=test)
    hand_run(root / "old", "failed", finished_at="2020-01-01T00:00:00+00:00", error="boom")
    hand_run(root / "dead", "running", pid=dead_pid())
    archive = hand_run(root / "ok" / ".replaced" / "2026-11-30_10-00-00", "finished")
    code, out, _ = runs(str(root), capsys=capsys)
    statuses = {line.split()[1]: line for line in out.splitlines() if str(root) in line}
    assert set(statuses) == {"finished", "failed", "crashed", "replaced"}
    assert str(archive) in statuses["replaced"]
    assert "0.37 (2 of 600 diverged)" in statuses["finished"]

    code, out, _ = runs(str(root), "--older-than", "2021-01-01", capsys=capsys)
    assert "old" in out and str(root / "ok") not in out
    code, out, _ = runs(str(root), "--older-than", "365", capsys=capsys)
    assert str(root / "old") in out and str(root / "dead") not in out

    # rm without --yes, stdin not a terminal: one paragraph, exit 2, nothing removed
    code, out, err = runs("rm", str(root), "--status", "failed", capsys=capsys)
    assert code == 2 and "add --yes" in err and "Traceback" not in err
    assert (root / "old").exists()

    code, out, _ = runs(
        "rm", str(root), "--status", "failed", "--status", "crashed", "--yes", capsys=capsys
    )
    assert code == 0 and "Removed 2 run(s)." in out
    assert not (root / "old").exists() and not (root / "dead").exists()
    assert (root / "ok" / "summary.json").exists() and archive.exists()

    code, out, _ = runs("rm", str(root), "--status", "replaced", "--yes", capsys=capsys)
    assert "Removed 1 run(s)." in out and not archive.exists()
    assert (root / "ok" / "summary.json").exists()


def test_rm_of_a_run_keeps_the_replaced_runs_not_selected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = hand_run(tmp_path / "sweep" / "0", "failed")
    archive = hand_run(job / ".replaced" / "2026-11-30_10-00-00", "finished")
    code, out, _ = runs("rm", str(tmp_path), "--status", "failed", "--yes", capsys=capsys)
    assert code == 0 and "Removed 1 run(s)." in out
    assert not (job / "summary.json").exists() and not (job / "metrics.jsonl").exists()
    assert (archive / "summary.json").exists()


def test_rm_never_touches_a_run_a_live_process_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from metacli.lock import FolderLock; "
            "lock = FolderLock(Path(sys.argv[1]), 'metacli train'); lock.acquire(); "
            "print('held', flush=True); "
            "time.sleep(60)",
            str(folder / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        hand_run_in(folder, "running", pid=holder.pid)
        code, out, _ = runs(str(tmp_path), "--status", "running", capsys=capsys)
        assert str(folder) in out
        code, out, _ = runs("rm", str(tmp_path), "--yes", capsys=capsys)
        assert code == 0 and "Removed 0 run(s)." in out and "Kept 1 run(s)" in out
        assert (folder / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # its owner gone, the same run is crashed and removable
    code, out, _ = runs("rm", str(tmp_path), "--status", "crashed", "--yes", capsys=capsys)
    assert "Removed 1 run(s)." in out and not folder.exists()


def hand_run_in(folder: Path, status: str, **fields: object) -> None:
    """``hand_run`` into a folder that exists already (it holds a lock)."""
    temporary = folder.with_name(folder.name + "-summary")
    hand_run(temporary, status, **fields)
    for child in temporary.iterdir():
        child.rename(folder / child.name)
    temporary.rmdir()


def test_runs_names_a_missing_folder_and_a_bad_filter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = runs(str(tmp_path / "nowhere"), capsys=capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = runs(str(tmp_path), "--status", "done", capsys=capsys)
    assert code == 2 and "--status done: choose among finished" in err
    code, _, err = runs(str(tmp_path), "--older-than", "last week", capsys=capsys)
    assert code == 2 and "a number of days" in err
    code, _, err = runs(str(tmp_path), "--yes", capsys=capsys)
    assert code == 2 and "runs rm" in err


def test_runs_as_a_user_runs_it(outputs: Path) -> None:
    result = run_cli("runs", str(outputs), "--status", "finished", cwd=outputs)
    assert "baseline" in result.stdout and result.returncode == 0
    result = run_cli("runs", "rm", str(outputs), "--status", "failed", cwd=outputs, check=False)
    assert result.returncode == 0 and "nothing removed" in result.stdout
    assert os.path.isdir(outputs / "named")
