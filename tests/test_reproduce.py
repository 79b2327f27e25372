"""benchmarks/reproduce.py: the estimate of a preset times its own iterations and
evaluation tasks and adds up its budget; the table is written from finished run folders
only, each row labelled a paper-budget run with its command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import reproduce


def test_estimate_adds_up_the_presets_budget_from_its_timed_steps() -> None:
    found = reproduce.estimate("maml_sinusoid", {}, "cpu", timed=2)
    assert found["iterations"] == 70000 and not found["stand_in"]
    # 70,000 iterations, 70 validations of 600 tasks, two meta-tests of 600 (best and last)
    expected = 70000 * found["s_per_iteration"] + (70 * 600 + 2 * 600) * found["s_per_eval_task"]
    assert found["hours"] == pytest.approx(expected / 3600, rel=1e-9)
    assert found["s_per_iteration"] > 0 and found["s_per_eval_task"] > 0


def test_a_preset_without_its_data_is_timed_on_the_stand_in_of_its_shape() -> None:
    cfg = reproduce.preset_config("protonet_miniimagenet_5w1s", [])
    overrides = reproduce.standin("protonet_miniimagenet_5w1s", cfg)
    assert overrides[:3] == ["task=synthetic", "task.image_size=84", "task.channels=3"]
    built = reproduce.preset_config("protonet_miniimagenet_5w1s", overrides)
    assert built.task.name == "synthetic" and built.task.ways == cfg.task.ways


def test_rows_come_from_finished_runs_only(tmp_path: Path) -> None:
    done = {
        "status": "finished",
        "overrides": ["experiment=maml_omniglot_5w1s", "data.root=/d"],
        "config": {"published": {"value": 0.987}},
        "test": {"metric_name": "accuracy", "mean": 0.981, "ci95": 0.004},
        "wall_time_s": 7200,
        "device": "cuda",
    }
    (tmp_path / "maml_omniglot_5w1s").mkdir()
    (tmp_path / "maml_omniglot_5w1s" / "summary.json").write_text(json.dumps(done))
    (tmp_path / "fomaml_omniglot_5w1s").mkdir()
    running = {**done, "status": "running"}
    (tmp_path / "fomaml_omniglot_5w1s" / "summary.json").write_text(json.dumps(running))
    table = reproduce.rows(tmp_path, ["maml_omniglot_5w1s", "fomaml_omniglot_5w1s"])
    lines = table.strip().splitlines()
    assert len(lines) == 3  # header, rule, the finished run
    assert "paper-budget: `metacli train experiment=maml_omniglot_5w1s data.root=/d`" in lines[2]
    assert "98.10 ± 0.40 %" in lines[2] and "98.70 %" in lines[2] and "| 2.0 |" in lines[2]
