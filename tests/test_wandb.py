"""logger=wandb, offline (the default): what the W&B run file holds, read back without
wandb's SDK (tests/wandb_records.py), against the run's own metrics.jsonl and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metacli import extras

from .conftest import read_summary, run_cli
from .wandb_records import read

pytestmark = pytest.mark.skipif(not extras.installed("wandb"), reason="wandb not installed")


@pytest.fixture(autouse=True)
def no_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)


def quiet_home(tmp_path: Path) -> dict[str, str]:
    """W&B's own folders in the test's."""
    return {f"WANDB_{d}_DIR": str(tmp_path / "wandb-home") for d in ("CONFIG", "CACHE", "DATA")}


def test_wandb_logs_the_config_every_metric_and_term_offline(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_cli(
        "train",
        "debug=tiny",
        "algo=mrmaml",  # a named term (kl) besides the loss and the metric
        "logger=wandb",
        "name=kl-run",
        "tags=[paper,ablation]",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env=quiet_home(tmp_path),
    )
    (file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")  # the run folder is its dir
    found = read(file)
    assert found["run"].display_name == "kl-run" and list(found["run"].tags) == [
        "paper",
        "ablation",
    ]
    config = {u.key: json.loads(u.value_json) for u in found["run"].config.update}
    assert config["algo"]["name"] == "mrmaml" and config["train"]["iterations"] == 20
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    history = found["history"]
    for line in lines:
        step = history[line["iteration"]]
        split = line["split"]
        for key in ("loss", "metric", "kl") if split == "train" else ("metric",):
            if key in line:
                assert step[f"{split}/{key}"] == pytest.approx(line[key]), (split, key)
    assert any("train/kl" in row for row in history.values())
    assert history[20]["test/metric"] == pytest.approx(read_summary(run)["test"]["mean"])
    assert found["summary"]["metacli/status"] == "finished" and found["exit_code"] == 0
    assert found["summary"]["metacli/run_dir"] == str(run)


def test_a_bad_wandb_mode_is_one_paragraph(tmp_path: Path) -> None:
    result = run_cli(
        "train",
        "debug=tiny",
        "logger=wandb",
        "logger.mode=cloud",
        "hydra.run.dir=run",
        cwd=tmp_path,
        env=quiet_home(tmp_path),
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "logger.mode" in result.stderr and "cloud" in result.stderr
    assert "offline" in result.stderr
    assert not (tmp_path / "run").exists()  # checked before the run began


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path: Path) -> None:
    env = quiet_home(tmp_path)
    common = ("debug=tiny", "logger=wandb", "train.val_every=10")
    run_cli("train", *common, "train.iterations=10", "hydra.run.dir=run", cwd=tmp_path, env=env)
    run_cli("train", "resume=run", "train.iterations=20", cwd=tmp_path, env=env)
    sessions = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(sessions) == 2
    first, second = (read(file) for file in sessions)
    assert first["run"].run_id == second["run"].run_id  # `wandb sync` joins them into one run
    assert (tmp_path / "run" / "wandb" / "run-id").read_text().strip() == first["run"].run_id
    assert min(first["history"]) < 10 <= min(second["history"]) and max(second["history"]) == 20
