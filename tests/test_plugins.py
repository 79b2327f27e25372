"""Your own components without forking metacli: the examples/ project (an algorithm, a
model and an update rule) installed as a user installs it, selected by its entry points and
from its config folder (``_target_``), through train, test, resume, a sweep, compare, check
and the Python API; and what a user's mistakes get."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY, read_metrics, read_summary, run_cli

EXAMPLES = REPO / "examples"
CONFIGS = EXAMPLES / "conf"
SMALL_IMAGES = ("task=synthetic", "task.image_size=8", "device=cpu")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/ installed by pip, into a folder of its own that PYTHONPATH adds (the
    project's environment stays as it is)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "-q", "--no-deps"),
            *("--no-build-isolation", "--target", str(target), str(EXAMPLES)),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (target / "metacli_example" / "algorithms.py").is_file()
    return target


def env_of(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def only_run(cwd: Path, command: str = "train") -> Path:
    (folder,) = (cwd / "outputs" / command).glob("*/*")
    return folder


def test_installed_plugins_are_options_of_their_groups(site: Path, tmp_path: Path) -> None:
    env = env_of(site)
    groups = run_cli("train", "--help", cwd=tmp_path, env=env).stdout
    assert "residual_mlp" in groups and "smoothed_maml" in groups and "rmsprop" in groups
    run_cli(
        "train",
        "algo=smoothed_maml",
        "model=residual_mlp",
        "update=rmsprop",
        "algo.smoothing=0.3",
        "algo.rms_decay=0.9",
        *TINY,
        *SMALL_IMAGES,
        cwd=tmp_path,
        env=env,
    )
    summary = read_summary(only_run(tmp_path))
    assert summary["status"] == "finished"
    algo, model = summary["config"]["algo"], summary["config"]["model"]
    assert algo["_target_"] == "metacli_example.algorithms.SmoothedMAML"
    assert (algo["name"], algo["smoothing"], algo["rms_decay"]) == ("smoothed_maml", 0.3, 0.9)
    assert model["_target_"] == "metacli_example.models.ResidualMLP"
    assert model["hidden"] == [40, 40, 40]  # the class's own default
    assert summary["classes"] == {
        "algo": "metacli_example.algorithms.SmoothedMAML",
        "task": "metacli.tasks.synthetic.Synthetic",
        "model": "metacli_example.models.ResidualMLP",
        "update": "metacli_example.updates.RMSPropRule",
    }


def test_a_config_folder_selects_classes_by_import_path(site: Path, tmp_path: Path) -> None:
    """--config-dir with an experiment preset of the user's; test and resume replay the
    folder without being told."""
    env = env_of(site)
    run_cli(
        "train",
        "--config-dir",
        str(CONFIGS),
        "experiment=smoothed_synthetic",
        cwd=tmp_path,
        env=env,
    )
    run = only_run(tmp_path)
    summary = read_summary(run)
    algo = summary["config"]["algo"]
    assert (algo["name"], algo["smoothing"], algo["inner_steps"]) == ("smoothed", 0.2, 2)
    assert algo["update"] == "metacli_example.updates.RMSPropRule" and algo["rms_decay"] == 0.9
    assert summary["config"]["model"]["hidden"] == [32, 32]
    assert summary["groups"]["algo"] == "smoothed" and summary["groups"]["update"] == "rms"
    tested = run_cli("test", f"ckpt_path={run}/checkpoints/last.pt", cwd=tmp_path, env=env)
    assert "run folder" in tested.stdout
    assert read_summary(only_run(tmp_path, "test"))["test"]["num_tasks"] == 40
    run_cli("train", f"resume={run}", "train.iterations=60", cwd=tmp_path, env=env)
    resumed = read_summary(run)
    assert resumed["iterations"] == 60 and resumed["resumed_from_iteration"] == 40


def test_help_lists_the_options_of_a_config_folder(tmp_path: Path) -> None:
    """Hydra lists groups from the search path it starts with; a config folder reaches it
    too, for train and test, and only when given."""
    for command in ("train", "test"):
        text = run_cli(command, "-cd", str(CONFIGS), "--help", cwd=tmp_path).stdout
        groups = {
            line.split(": ")[0]: line.split(": ")[1].split(", ")
            for line in text.splitlines()
            if line.startswith(("algo: ", "model: ", "update: ", "experiment: "))
        }
        assert "smoothed" in groups["algo"] and "maml" in groups["algo"], command
        assert "residual" in groups["model"] and "rms" in groups["update"]
        assert "smoothed_synthetic" in groups["experiment"]
    assert "smoothed" not in run_cli("train", "--help", cwd=tmp_path).stdout


def test_a_sweep_over_a_plugin_and_a_builtin_then_compare(site: Path, tmp_path: Path) -> None:
    env = env_of(site)
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train",
        "-m",
        "algo=smoothed_maml,maml",
        "algo.smoothing=0.3",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        *TINY,
        *SMALL_IMAGES,
        cwd=tmp_path,
        env=env,
    )
    assert "algo.smoothing is not a setting of algo=maml" in result.stderr
    jobs = [read_summary(p.parent) for p in sweep.glob("*/summary.json")]
    assert len(jobs) == 4 and all(j["status"] == "finished" for j in jobs)
    rows = json.loads(run_cli("compare", str(sweep), "--format", "json", cwd=tmp_path).stdout)
    by_algo = {row["algo"]: row for row in rows["rows"]}
    assert set(by_algo) == {"smoothed_maml", "maml"} and by_algo["maml"]["seeds"] == 2


@pytest.mark.parametrize(
    "option",
    ["algo=smoothed_maml", "model=residual_mlp", "update=rmsprop", "config-dir model=residual"],
)
def test_metacli_check_holds_for_the_example_components(
    site: Path, tmp_path: Path, option: str
) -> None:
    args = option.split()
    if args[0] == "config-dir":
        args = ["--config-dir", str(CONFIGS), *args[1:]]
    result = run_cli("check", *args, cwd=tmp_path, env=env_of(site), timeout=600)
    assert "checks held" in result.stdout and "failed" not in result.stdout, result.stdout
    for check in ("builds", "strategies", "resume", "seeds", "gradient"):
        assert check in result.stdout


def test_the_python_api_trains_loads_adapts_and_compares_a_plugin(
    site: Path, tmp_path: Path
) -> None:
    code = """
import json, torch, metacli
summary = metacli.train(["algo=smoothed_maml", "debug=tiny", "task=synthetic",
                         "task.image_size=8", "device=cpu"], run_dir="api_run")
learner = metacli.load("api_run")
x = torch.rand(5, 1, 8, 8)
model = learner.adapt(x, torch.arange(5), steps=2)
rows = metacli.compare(["api_run"])
print(json.dumps({"status": summary["status"], "shape": list(model(x).shape),
                  "rows": len(rows), "algo": rows[0]["algo"]}))
"""
    env = {**os.environ, **env_of(site)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out == {"status": "finished", "shape": [5, 5], "rows": 1, "algo": "smoothed_maml"}
    assert read_metrics(tmp_path / "api_run")


def test_the_example_rmsprop_rule_is_torch_rmsprop_step_for_step(site: Path) -> None:
    sys.path.insert(0, str(site))
    try:
        from metacli_example.updates import RMSPropRule, RMSPropRuleConfig
    finally:
        sys.path.remove(str(site))
    weight = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    rule = RMSPropRule(RMSPropRuleConfig(rms_decay=0.9, rms_eps=1e-6), {"w": weight}, 0.05, 3)
    params, state = {"w": weight.clone()}, rule.init({"w": weight}, 0.05, None)  # type: ignore[arg-type]
    reference = weight.clone().requires_grad_()
    optimizer = torch.optim.RMSprop([reference], lr=0.05, alpha=0.9, eps=1e-6)
    for step in range(4):
        grad = torch.sin(params["w"] * (step + 1))
        params, state = rule.update(params, {"w": grad}, None, state, step)
        reference.grad = torch.sin(reference.detach() * (step + 1))
        optimizer.step()
        torch.testing.assert_close(params["w"], reference.detach())


# --- a user's mistakes ---------------------------------------------------------------------
def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return folder


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchpkg.algos.Mine", "there is no module 'nosuchpkg' in this Python environment"),
        ("metacli.algorithms.maml.Nope", "module metacli.algorithms.maml has no class 'Nope'"),
        ("metacli.models.mlp.MLP", "is not a metacli algo component"),
    ],
)
def test_a_bad_target_is_one_paragraph_and_no_folder(
    tmp_path: Path, target: str, message: str
) -> None:
    conf = write(tmp_path / "myconf", "algo/mine.yaml", f"_target_: {target}\n")
    result = run_cli("train", "--config-dir", str(conf), "algo=mine", cwd=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "algo=mine (its _target_)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("name", "text", "args", "message"),
    [
        (
            "algo/broken.yaml",
            "name: maml\ninner_lr: [0.1\n",
            ("algo=broken",),
            "A config file is not valid YAML: {conf}/algo/broken.yaml, line 3, column 1: "
            "expected ',' or ']'",
        ),
        (
            "experiment/typo.yaml",
            "# @package _global_\ndefaults:\n  - override /algo: mamll\n",
            ("experiment=typo",),
            "algo=mamll (chosen in {conf}/experiment/typo.yaml) is not an option (did you "
            "mean maml?)",
        ),
    ],
)
def test_a_broken_config_file_is_named_with_its_line(
    tmp_path: Path, name: str, text: str, args: tuple[str, ...], message: str
) -> None:
    """A YAML error was a traceback; a preset's unknown option did not say which file
    chose it."""
    conf = write(tmp_path / "myconf", name, text)
    result = run_cli("train", "--config-dir", str(conf), *args, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert message.format(conf=conf) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_broken_plugin_fails_only_when_chosen(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "brokenplug-0.1.dist-info"
    write(info, "METADATA", "Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.1\n")
    write(info, "entry_points.txt", "[metacli.model]\nbroken = brokenplug.models:Broken\n")
    env = env_of(site)
    run_cli("train", *TINY, "device=cpu", cwd=tmp_path, env=env)  # built-ins still run
    result = run_cli("train", "model=broken", *TINY, cwd=tmp_path, env=env, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model=broken (the entry point broken = 'brokenplug.models:Broken'" in result.stderr
    assert "there is no module 'brokenplug'" in result.stderr


def test_a_users_option_shadowing_a_builtin_says_so(tmp_path: Path) -> None:
    conf = write(tmp_path / "myconf", "algo/maml.yaml", "inner_lr: 0.05\n")
    result = run_cli("train", "--config-dir", str(conf), *TINY, "device=cpu", cwd=tmp_path)
    assert f"algo=maml is {conf / 'algo' / 'maml.yaml'}, which shadows the built-in option" in (
        result.stderr
    )
    assert read_summary(only_run(tmp_path))["config"]["algo"]["inner_lr"] == 0.05


def test_inherited_keys_can_be_set_though_the_file_lists_none(tmp_path: Path) -> None:
    """A config file with a _target_ holds only what it sets; every key its class declares
    can be overridden, in a run and in a sweep."""
    conf = write(tmp_path / "myconf", "algo/mine.yaml", "_target_: metacli.algorithms.maml.MAML\n")
    run_cli(
        "train",
        "--config-dir",
        str(conf),
        "algo=mine",
        "algo.inner_steps=2",
        *TINY,
        "device=cpu",
        cwd=tmp_path,
    )
    algo = read_summary(only_run(tmp_path))["config"]["algo"]
    assert (algo["name"], algo["inner_steps"], algo["inner_lr"]) == ("mine", 2, 0.01)
    bad = run_cli(
        "train",
        "--config-dir",
        str(conf),
        "algo=mine",
        "algo.inner_step=2",
        *TINY,
        cwd=tmp_path,
        check=False,
    )
    assert bad.returncode == 2 and "did you mean algo.inner_steps?" in bad.stderr
