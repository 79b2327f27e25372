"""A regular (non-editable) wheel install finds its configs without the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import yaml

from tests.conftest import REPO


def test_wheel_install_runs_from_anywhere(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = dist.glob("metacli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "metacli/conf/train.yaml" in names and "metacli/conf/optim/sgd.yaml" in names
    # A fresh virtual environment that installs the wheel itself and borrows only the
    # already-installed dependencies (torch, hydra, ...) from this one, through a .pth
    # file (which does not run the .pth of the editable install that lies there too).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    Path(site.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    located = subprocess.run(
        [
            str(python),
            "-c",
            "import metacli.cli as c, metacli.config as k; "
            "print(c.__file__); print(k.config_dir())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(str(venv) in line for line in located), located
    job = subprocess.run(
        [str(venv / "bin" / "metacli"), "train", "algo=fomaml", "--cfg", "job"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    config = yaml.safe_load(job.stdout)
    assert config["algo"]["name"] == "fomaml" and config["task"]["name"] == "sinusoid"
