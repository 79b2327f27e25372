"""Optional extras: which module each needs, and the message when it is missing.

Standard library only: the CLI checks overrides against this table before Hydra starts,
so a missing plugin is one clear paragraph instead of Hydra's "could not find" error.
"""

from __future__ import annotations

import importlib.util

from metacli.errors import MetacliError

# extra name -> (module that must import, what it is)
EXTRAS: dict[str, tuple[str, str]] = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "the Hydra joblib launcher"),
    "submitit": ("hydra_plugins.hydra_submitit_launcher", "the Hydra submitit launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "the Hydra Ray launcher"),
    "optuna": ("hydra_plugins.hydra_optuna_sweeper", "the Hydra Optuna sweeper"),
    "tensorboard": ("tensorboard", "TensorBoard"),
    "mlflow": ("mlflow", "MLflow"),
    "wandb": ("wandb", "Weights & Biases"),
    "plot": ("matplotlib", "matplotlib"),
    "qpth": ("qpth", "qpth, the differentiable QP solver MetaOptNet's SVM head uses"),
    "sklearn": ("sklearn", "scikit-learn, whose logistic regression RFS tests with"),
}

# (config group, option) -> extra; None as option: every option of the group
OPTIONS: dict[tuple[str, str | None], str] = {
    ("hydra/launcher", "joblib"): "joblib",
    ("hydra/launcher", "submitit_local"): "submitit",
    ("hydra/launcher", "submitit_slurm"): "submitit",
    ("hydra/launcher", "ray"): "ray",
    ("hydra/sweeper", "optuna"): "optuna",
    ("hparams_search", None): "optuna",
    ("logger", "tensorboard"): "tensorboard",
    ("logger", "mlflow"): "mlflow",
    ("logger", "wandb"): "wandb",
}


def installed(extra: str) -> bool:
    try:
        return importlib.util.find_spec(EXTRAS[extra][0]) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def require_extra(extra: str, wanted_by: str) -> None:
    """Raise a one-paragraph error with the install command if ``extra`` is missing."""
    if installed(extra):
        return
    module, what = EXTRAS[extra]
    raise MetacliError(
        f"{wanted_by} needs {what} (Python module {module}), which is not installed. "
        f"Install it with: pip install 'metacli[{extra}]' (in a checkout of metacli: "
        f".venv/bin/pip install -e '.[{extra}]'), or choose another option."
    )


def check_overrides(args: list[str]) -> None:
    """Fail early for ``group=option`` overrides whose extra is not installed."""
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            continue
        group, option = arg.split("=", 1)
        group = group.lstrip("+~").removeprefix("override ")
        for candidate in (option, None):
            extra = OPTIONS.get((group, candidate))
            if extra is not None and option not in ("", "null"):
                require_extra(extra, f"{group}={option}")
                break
