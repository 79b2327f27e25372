"""The Python API (metacli.train, test, load, compare): the command's run folder, its
numbers and its messages, and a learner that adapts as the meta-test does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metacli
from metacli.evaluation import fixed_tasks
from tests.conftest import REPO, TINY, read_metrics, read_summary, run_cli

SMALL = (*TINY, "device=cpu")


def test_import_metacli_loads_neither_torch_nor_hydra() -> None:
    code = "import sys, metacli; print('torch' in sys.modules, 'hydra' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_train_writes_what_the_command_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_cli("train", *SMALL, "hydra.run.dir=cli", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    summary = metacli.train(list(SMALL), run_dir="api")
    cli, api = tmp_path / "cli", tmp_path / "api"
    assert summary == read_summary(api) and summary["status"] == "finished"
    assert read_metrics(api) == read_metrics(cli)
    theirs = read_summary(cli)
    for key in ("config", "groups", "overrides", "iterations", "test", "best_val", "classes"):
        assert summary[key] == theirs[key], key
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/best.pt"):
        assert (api / name).is_file(), name
    log = (api / "metacli.log").read_text()
    assert "Run folder:" in log and "meta-test on 16 tasks" in log


def test_errors_raise_metacli_error_with_the_commands_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = ("algo.inner_l=0.1", "device=cpu")
    printed = run_cli("train", *bad, cwd=tmp_path, check=False).stderr.strip()
    with pytest.raises(metacli.MetacliError) as error:
        metacli.train(list(bad))
    assert printed == f"metacli train: {error.value}"
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(metacli.MetacliError, match="takes a list of overrides"):
        metacli.train("algo=maml")  # type: ignore[arg-type]
    with pytest.raises(metacli.MetacliError, match="-m is a flag of the command line"):
        metacli.train(["-m", "seed=0,1"])
    with pytest.raises(metacli.MetacliError, match="has no option 'by'"):
        metacli.compare(["outputs"], by="algo")


def test_a_run_that_fails_is_recorded_then_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(metacli.MetacliError, match="is not finite at iteration 1"):
        metacli.train([*SMALL, "algo.inner_lr=1e30"], run_dir="diverged")
    summary = read_summary(tmp_path / "diverged")
    assert summary["status"] == "failed" and "is not finite" in summary["error"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api") / "run"
    metacli.train([*SMALL, "algo.test_inner_steps=4"], run_dir=folder)
    return folder


def test_load_and_adapt_give_the_meta_tests_predictions(trained: Path) -> None:
    learner = metacli.load(trained)
    assert learner.path == trained / "checkpoints" / "best.pt"
    assert metacli.load(trained / "checkpoints" / "last.pt").iteration == 20
    components = learner.components
    tasks = fixed_tasks(components, "test", 2)
    expected = components.algorithm.evaluate(tasks, predictions=True).predictions
    assert expected is not None
    for i in range(2):
        model = learner.adapt(tasks.support_x[i], tasks.support_y[i])
        torch.testing.assert_close(model(tasks.query_x[i]), expected[i, -1])
        at_two = learner.adapt(tasks.support_x[i], tasks.support_y[i], steps=2)
        torch.testing.assert_close(at_two(tasks.query_x[i]), expected[i, 2])
    assert components.algorithm.test_steps == 4  # (restored after steps=2)
    unadapted = learner.adapt(tasks.support_x[0], tasks.support_y[0], steps=0)
    torch.testing.assert_close(unadapted(tasks.query_x[0]), components.model(tasks.query_x[0]))


def test_adapt_names_a_wrong_shape(trained: Path) -> None:
    learner = metacli.load(trained)
    with pytest.raises(metacli.MetacliError, match=r"inputs of shape \(1,\); give x as"):
        learner.adapt(torch.zeros(5, 2), torch.zeros(5, 1))
    with pytest.raises(metacli.MetacliError, match="x holds 5 examples and y 4"):
        learner.adapt(torch.zeros(5, 1), torch.zeros(4, 1))
    with pytest.raises(metacli.MetacliError, match="holds no checkpoint"):
        metacli.load(trained.parent)


def test_a_classifier_without_inner_loop_adapts_to_its_support_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    metacli.train(["algo=protonet", "task=synthetic", "task.image_size=8", *SMALL], run_dir="p")
    learner = metacli.load("p")
    x = torch.rand(5, 1, 8, 8)
    logits = learner.adapt(x, torch.arange(5))(x)
    assert logits.shape == (5, 5) and torch.isfinite(logits).all()
    with pytest.raises(metacli.MetacliError, match="algo=protonet has no inner loop"):
        learner.adapt(x, torch.arange(5), steps=3)
    with pytest.raises(metacli.MetacliError, match="one integer label per example"):
        learner.adapt(x, torch.rand(5))
    test = metacli.test([f"ckpt_path={tmp_path / 'p' / 'checkpoints' / 'last.pt'}"], run_dir="t")
    assert test["status"] == "finished" and test["command"] == "test"
    rows = metacli.compare(["."], command="test")
    assert [r["algo"] for r in rows] == ["protonet"]


def test_the_notebook_example_of_the_docs_runs(tmp_path: Path) -> None:
    """docs/api.md's session, as a script in an empty folder."""
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "session.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "finished meta-test MSE" in out
    errors = [float(e) for e in re.findall(r"inner steps: MSE ([\d.]+)", out)]
    assert len(errors) == 3 and errors[2] < errors[1] < errors[0]
    assert re.search(r"maml: [\d.]+ ± [\d.]+ \(1 seed\)", out)
    assert re.search(r"fomaml: [\d.]+ ± [\d.]+ \(1 seed\)", out)
    assert "algo.inner_l is not a setting (did you mean algo.inner_lr?)" in out
    # the page shows what it prints: the same lines, whatever the last digits here
    shown = text.split("```text\n", 1)[1].split("```", 1)[0]

    def words(line: str) -> str:
        return re.sub(r"[\d.]+", "#", line.strip())

    printed = {words(line) for line in out.splitlines()}
    assert shown.strip() and all(words(line) in printed for line in shown.splitlines())
