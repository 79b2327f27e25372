"""The catalogue of bad inputs: each one exits non-zero with one short message naming the
setting or file to fix, prints no traceback, creates no run folder and changes nothing
that was already written. docs/errors.md is this catalogue (regenerate it with
`.venv/bin/python -m tests.test_errors`).

The commands run in this process (``metacli.cli.main``), so the catalogue costs seconds.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from metacli import cli
from metacli.lock import FolderLock
from tests.conftest import TINY, run_cli
from tests.test_omniglot import make as make_omniglot

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
OMNIGLOT = (
    "task=omniglot",
    "data.root={omniglot}",
    "data.cache_dir={cache}",
    "task.split=random",
    "task.random_sizes=[4,2]",
    "task.ways=2",
    "task.queries=2",
)


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    message: str  # in the output, after the placeholders are filled in
    code: int = 2
    hold_lock: str | None = None  # a folder whose lock another writer holds meanwhile


def case(name: str, command: str, *args: str, message: str, **kw: object) -> Case:
    return Case(name, (command, *args), message, **kw)  # type: ignore[arg-type]


def t(name: str, *args: str, message: str, **kw: object) -> Case:
    """A `metacli train` case on the tiny sinusoid settings."""
    return case(name, "train", *TINY, *args, message=message, **kw)


def numeric(key: str, value: str, rule: str) -> Case:
    return t(
        f"{key} out of range", f"{key}={value}", message=f"{key}={value} is not allowed: {rule}"
    )


def nonfinite(key: str, value: str) -> Case:
    return t(
        f"{key}={value}",
        f"{key}={value}",
        message=f"{key}={value} is not allowed: it must be a finite number",
    )


CASES = [
    # --- misspelt keys and options: the closest valid one -------------------------------
    t(
        "unknown algorithm",
        "algo=mamll",
        message="algo=mamll is not an option (did you mean maml?)",
    ),
    t(
        "unknown task",
        "task=omniglott",
        message="task=omniglott is not an option (did you mean omniglot?)",
    ),
    t("unknown model", "model=conv5", message="model=conv5 is not an option (did you mean conv4?)"),
    t("unknown update rule", "algo.update=adamw", message="algo.update='adamw' is not an option"),
    t(
        "unknown experiment",
        "experiment=maml_sinus",
        message="experiment=maml_sinus is not an option",
    ),
    t(
        "misspelt key",
        "algo.inner_l=0.1",
        message="algo.inner_l is not a setting (did you mean algo.inner_lr?)",
    ),
    t(
        "misspelt key in a section",
        "train.iteration=5",
        message="train.iteration is not a setting (did you mean train.iterations?)",
    ),
    t(
        "misspelt key added with +",
        "+train.iteration=5",
        message="train.iteration is not a setting (did you mean train.iterations?)",
    ),
    t(
        "misspelt key forced with ++",
        "++algo.inner_lrr=0.1",
        message="algo.inner_lrr is not a setting (did you mean algo.inner_lr?)",
    ),
    t("unknown top-level key", "nosuch=1", message="nosuch is not a setting"),
    t(
        "existing key added with +",
        "+train.iterations=3",
        message="train.iterations already exists",
    ),
    t("wrong type", "algo.inner_lr=fast", message="algo.inner_lr"),
    t(
        "unknown choice",
        "train.on_nan=maybe",
        message="train.on_nan='maybe' is not allowed: choose stop or skip",
    ),
    t(
        "unknown optimizer",
        "optim=adamw",
        message="optim=adamw is not an option (did you mean adam?)",
    ),
    t("unknown scheduler", "optim.scheduler=exp", message="optim.scheduler='exp' is not allowed"),
    t("unknown device", "device.name=tpu", message="device='tpu' is not allowed"),
    t(
        "unknown objective",
        "optimized_metric=loss",
        message="optimized_metric='loss' is not allowed",
    ),
    t(
        "unknown parameter group",
        "+optim.groups.head.lr=0.1",
        message="optim.groups.head='head' is not allowed: the groups are model, update",
    ),
    # --- out-of-range values of every numeric key ---------------------------------------
    numeric("seed", "-1", "it must be >= 0"),
    numeric("threads", "0", "it must be >= 1"),
    numeric("train.iterations", "-1", "it must be >= 0"),
    numeric("train.meta_batch_size", "0", "it must be >= 1"),
    numeric("train.val_every", "0", "it must be >= 1"),
    numeric("train.log_every", "0", "it must be >= 1"),
    numeric("train.ckpt_every", "0", "it must be >= 1 or null"),
    numeric("train.grad_clip", "0.0", "it must be > 0 or null"),
    numeric("train.nan_skips", "-1", "it must be >= 0"),
    numeric("val.num_tasks", "0", "it must be >= 1"),
    numeric("val.batch_size", "0", "it must be >= 1"),
    numeric("test.num_tasks", "0", "it must be >= 1"),
    numeric("test.batch_size", "0", "it must be >= 1"),
    numeric("optim.lr", "-1.0", "the learning rate must be > 0"),
    numeric("optim.weight_decay", "-0.1", "it must be >= 0"),
    t(
        "optim.momentum out of range",
        "optim=sgd",
        "optim.momentum=1.5",
        message="optim.momentum=1.5 is not allowed: it must be in [0, 1)",
    ),
    numeric("optim.min_lr", "1.0", "it must be in [0, optim.lr]"),
    numeric("optim.step_size", "0", "it must be >= 1"),
    numeric("optim.gamma", "0.0", "it must be in (0, 1]"),
    t(
        "optim.betas out of range",
        "optim.betas=[0.9,1.0]",
        message="optim.betas=[0.9, 1.0] is not allowed",
    ),
    numeric("device.threads", "0", "it must be >= 1 and at most 1,024, or null"),
    numeric("algo.inner_lr", "-0.1", "the learning rate must be > 0"),
    numeric("algo.inner_steps", "0", "it must be >= 1"),
    numeric("algo.test_inner_steps", "-1", "it must be >= 0"),
    numeric("task.shots", "0", "it must be >= 1"),
    t(
        "inner steps that no memory could hold",
        "algo.inner_steps=100000000",
        message="algo.inner_steps=100000000 is not allowed: it must be at most 100,000",
    ),
    t(
        "first-order MAML with steps that never end (no memory to refuse them by)",
        "algo=fomaml",
        "algo.inner_steps=100001",
        message="algo.inner_steps=100001 is not allowed: it must be at most 100,000",
    ),
    t(
        "test inner steps that never end",
        "algo.test_inner_steps=1000000",
        message="algo.test_inner_steps=1000000 is not allowed: it must be at most 100,000",
    ),
    t(
        "iMAML's conjugate-gradient steps that never end",
        "algo=imaml",
        "algo.cg_steps=100000000",
        message="algo.cg_steps=100000000 is not allowed: it must be at most 100,000",
    ),
    numeric("task.queries", "0", "it must be >= 1"),
    numeric("task.noise", "-1.0", "it must be >= 0"),
    # --- non-finite numbers: every float setting finite (inf only where it means a limit)
    nonfinite("optim.lr", "inf"),
    nonfinite("algo.inner_lr", "inf"),
    nonfinite("task.noise", "inf"),
    nonfinite("train.grad_clip", "inf"),
    nonfinite("optim.weight_decay", "inf"),
    t(
        "a learning rate beyond float32 (torch's Adam stopped with an overflow)",
        "optim.lr=1e300",
        message="optim.lr=1e+300 is not allowed: it must be a finite number within float32's "
        "range (at most 3.403e+38 in size)",
    ),
    t(
        "an inner learning rate beyond float32",
        "algo.inner_lr=1e39",
        message="algo.inner_lr=1e+39 is not allowed: it must be a finite number within float32's",
    ),
    t(
        "a non-finite number inside a list",
        "task.amplitude=[0.1,inf]",
        message="task.amplitude=inf is not allowed: it must be a finite number",
    ),
    t(
        "optim.betas with NaN",
        "optim.betas=[0.9,nan]",
        message="optim.betas=[0.9, nan] is not allowed: two numbers in [0, 1)",
    ),
    t(
        "algo.lam=-inf (inf alone is its limit)",
        "algo=hybrid",
        "algo.lam=-inf",
        message="algo.lam=-inf is not allowed: it must be >= 0",
    ),
    t(
        "algo.lam=nan",
        "algo=hybrid",
        "algo.lam=nan",
        message="algo.lam=nan is not allowed",
    ),
    t(
        "a 1-way classification task",
        "task=synthetic",
        "task.ways=1",
        message="task.ways=1 is not allowed: it must be >= 2 (a 1-way task has a single answer",
    ),
    t(
        "a 1-way meta-test",
        "task=synthetic",
        "task.test_ways=1",
        message="task.test_ways=1 is not allowed: it must be >= 2 or null",
    ),
    t(
        "task.amplitude reversed",
        "task.amplitude=[5,1]",
        message="task.amplitude=[5.0, 1.0] is not allowed",
    ),
    t("model.hidden empty width", "model.hidden=[0]", message="model.hidden=[0] is not allowed"),
    t(
        "algo.test_inner_lr out of range",
        "algo.test_inner_lr=-0.1",
        message="algo.test_inner_lr=-0.1 is not allowed: the learning rate must be > 0 or null",
    ),
    t(
        "algo.lam out of range",
        "algo=hybrid",
        "algo.lam=-1.0",
        message="algo.lam=-1.0 is not allowed: it must be >= 0",
    ),
    t(
        "algo.task_weight out of range",
        "algo=hybrid",
        "algo.task_weight=-1.0",
        message="algo.task_weight=-1.0 is not allowed: it must be >= 0",
    ),
    t(
        "algo.regularizer unknown",
        "algo.regularizer=l1",
        message="algo.regularizer='l1' is not allowed: choose one of none, l2, path",
    ),
    t(
        "algo.regularizer=path on a convolutional model",
        "task=synthetic",
        "model=conv4",
        "algo.regularizer=path",
        message="algo.regularizer=path is defined for fully connected networks (model=mlp)",
    ),
    t(
        "algo.variant unknown",
        "algo=mrmaml",
        "algo.variant=both",
        message="algo.variant='both' is not allowed: weights or activations",
    ),
    t(
        "algo=alfa with another update rule",
        "algo=alfa",
        "algo.update=sgd",
        message="algo=alfa is the update rule alfa, but algo.update=sgd",
    ),
    t(
        "algo.space names an unknown rule",
        "update=space",
        "algo.space=[sgd,adamw]",
        message="algo.space: 'adamw' is not an option",
    ),
    t(
        "algo.adam_betas out of range",
        "update=adam",
        "algo.adam_betas=[0.9,1.0]",
        message="algo.adam_betas=[0.9, 1.0] is not allowed: give [beta1, beta2], each in [0, 1)",
    ),
    t(
        "algo.beta out of range",
        "algo=mrmaml",
        "algo.beta=-1",
        message="algo.beta=-1.0 is not allowed: it must be >= 0",
    ),
    t(
        "optim.eps out of range",
        "optim.eps=0",
        message="optim.eps=0.0 is not allowed: it must be > 0",
    ),
    t(
        "algo.msl_iterations out of range",
        "algo=mamlpp",
        "algo.msl_iterations=0",
        message="algo.msl_iterations=0 is not allowed: it must be >= 1",
    ),
    t(
        "algo.first_order_iterations out of range",
        "algo=mamlpp",
        "algo.first_order_iterations=-1",
        message="algo.first_order_iterations=-1 is not allowed: it must be >= 0",
    ),
    t(
        "algo.momentum out of range",
        "update=momentum",
        "algo.momentum=1.0",
        message="algo.momentum=1.0 is not allowed: it must be in [0, 1)",
    ),
    t(
        "model.filters out of range",
        "task=synthetic",
        "model=conv4",
        "model.filters=0",
        message="model.filters=0 is not allowed: it must be >= 1",
    ),
    t(
        "model.norm_steps out of range",
        "task=synthetic",
        "model=conv4",
        "model.norm_steps=0",
        message="model.norm_steps=0 is not allowed: it must be >= 1",
    ),
    t(
        "task.channels out of range",
        "task=synthetic",
        "model=conv4",
        "task.channels=0",
        message="task.channels=0 is not allowed: it must be >= 1",
    ),
    t(
        "task.image_size out of range",
        "task=synthetic",
        "model=conv4",
        "task.image_size=2",
        message="task.image_size=2 is not allowed: it must be >= 4",
    ),
    t(
        "task.ways out of range",
        "task=synthetic",
        "model=conv4",
        "task.ways=0",
        message="task.ways=0 is not allowed: it must be >= 2",
    ),
    t(
        "task.test_ways out of range",
        "task=synthetic",
        "model=conv4",
        "algo=protonet",
        "task.test_ways=0",
        message="task.test_ways=0 is not allowed: it must be >= 2 or null",
    ),
    t(
        "task.test_shots out of range",
        "task.test_shots=0",
        message="task.test_shots=0 is not allowed: it must be >= 1 or null",
    ),
    t(
        "unknown label scheme",
        "task=synthetic",
        "model=conv4",
        "task.labels=maybe",
        message="task.labels='maybe' is not allowed: choose shuffled or fixed",
    ),
    # --- combinations that cannot work --------------------------------------------------
    t(
        "image model on a vector task",
        "model=resnet12",
        message="model=resnet12 takes images [channels, height, width], but the task's inputs",
    ),
    t("conv4 on a vector task", "model=conv4", message="model=conv4 takes images"),
    t(
        "learned rates with Reptile",
        "algo=reptile",
        "algo.update=metasgd",
        message="algo=reptile cannot learn the parameters of algo.update=metasgd",
    ),
    t(
        "device not on this machine",
        "device=cuda",
        message="device=cuda was requested, but this PyTorch",
    ),
    case(
        "ways above the classes of a split",
        "train",
        *OMNIGLOT,
        "task.ways=7",
        message="The val split has 2 classes, fewer than ways=7",
    ),
    case(
        "shots + queries above the images of a class",
        "train",
        *OMNIGLOT,
        "task.queries=4",
        message="has 4 images, fewer than shots + queries = 5",
    ),
    # --- data files -----------------------------------------------------------------------
    t(
        "image task without data.root",
        "task=omniglot",
        message="task=omniglot needs its files: set data.root",
    ),
    case(
        "data.root without the dataset",
        "train",
        *OMNIGLOT,
        "data.root={empty}",
        message="No Omniglot found in data.root={empty}",
    ),
    case(
        "truncated zip archive",
        "train",
        *OMNIGLOT,
        "data.root={truncated}",
        message="{truncated}/images_evaluation.zip is not a readable zip archive",
    ),
    case(
        "truncated zip in data check",
        "data",
        "check",
        *OMNIGLOT,
        "data.root={truncated}",
        message="{truncated}/images_evaluation.zip is not a readable zip archive",
        code=1,
    ),
    case(
        "corrupt image names the file",
        "train",
        *OMNIGLOT,
        "data.root={corrupt}",
        message="Cannot read the image {corrupt}/images_background/Alpha/character01/0001_01.png"
        ": cannot identify image file. Replace or remove that file.",
    ),
    case(
        "split_dir pointing nowhere",
        "train",
        *OMNIGLOT,
        "task.split=vinyals",
        "task.split_dir={empty}",
        message="task.split_dir={empty}: {empty} lacks train.txt, val.txt, test.txt",
    ),
    case(
        "a damaged line in a split file",
        "train",
        *OMNIGLOT,
        "task.split=vinyals",
        "task.split_dir={splits}",
        message="{splits}/train.txt, line 2: 'Japan' is not a class of the form "
        "<alphabet>/<character>/rot<degrees>",
    ),
    t(
        "mini-ImageNet without its files",
        "task=miniimagenet",
        "model=conv4",
        "data.root={empty}",
        message="No mini-ImageNet found in data.root={empty}",
    ),
    t(
        "image folder that is not a folder",
        "task=image_folder",
        "model=conv4",
        "data.root={file}",
        message="data.root='{file}' is not a folder",
    ),
    # --- checkpoints and resumes ------------------------------------------------------------
    case(
        "test without a checkpoint",
        "test",
        *TINY,
        message="No checkpoint to meta-test: add ckpt_path=",
    ),
    case(
        "checkpoint that does not exist",
        "test",
        "ckpt_path={empty}/best.pt",
        message="No checkpoint at {empty}/best.pt",
    ),
    case(
        "truncated checkpoint",
        "test",
        "ckpt_path={truncated_ckpt}",
        message="Cannot read the checkpoint {truncated_ckpt}: it is truncated or not a PyTorch",
    ),
    case(
        "untrusted checkpoint (pickled objects)",
        "test",
        "ckpt_path={evil_ckpt}",
        message="holds Python objects besides tensors, which metacli never loads",
    ),
    case(
        "a checkpoint of another model's shapes",
        "test",
        "ckpt_path={run}/checkpoints/best.pt",
        "model.hidden=[8,8]",
        message="does not fit the configured algo/model: its run had model.hidden=[40, 40] "
        "(now [8, 8])",
    ),
    case(
        "a checkpoint of another task (only PyTorch's shapes were named)",
        "test",
        "ckpt_path={run}/checkpoints/best.pt",
        "task=synthetic",
        message="does not fit the configured algo/model: its run had task=sinusoid (now "
        "synthetic) (PyTorch: size mismatch",
    ),
    case(
        "resume given to test (said only that a checkpoint was missing)",
        "test",
        "resume={run}",
        message="resume= continues a training run (metacli train resume=...); metacli test "
        "meta-tests a checkpoint: metacli test ckpt_path={run}/checkpoints/best.pt",
    ),
    case(
        "resume of a meta-test's folder",
        "train",
        "resume={tested}",
        message="It is a meta-test's folder (metacli test): resume the training run it "
        "tested, resume={run}.",
    ),
    case(
        "resume of a sweep's folder",
        "train",
        "resume={sweep}",
        message="It is a sweep's folder: resume one of its jobs (resume={sweep}/0)",
    ),
    case(
        "ckpt_path of a sweep's folder",
        "test",
        "ckpt_path={sweep}",
        message="{sweep} is a sweep's folder: give the checkpoint of one of its jobs, e.g. "
        "ckpt_path={sweep}/0/checkpoints/best.pt",
    ),
    case(
        "plot of a run that failed before its first line (said: nothing to plot yet)",
        "plot",
        "{failed}",
        message="{failed} has nothing to plot: the run failed before its first logged line: "
        "The meta-loss (nan) is not finite at iteration 2",
    ),
    case(
        "runs older than a negative age",
        "runs",
        "{run}",
        "--older-than",
        "-5",
        message="--older-than '-5': give a number of days >= 0",
    ),
    case(
        "a sweep over checkpoints (read as one path with a comma)",
        "test",
        "-m",
        "ckpt_path={run}/checkpoints/best.pt,{run}/checkpoints/last.pt",
        message="sweeps checkpoints: metacli test meta-tests one checkpoint a run",
    ),
    case(
        "ckpt_path of a run folder",
        "test",
        "ckpt_path={run}",
        message="{run} is a run folder: give one of its checkpoints, ckpt_path={run}/"
        "checkpoints/best.pt",
    ),
    case(
        "another program's checkpoint",
        "test",
        "ckpt_path={foreign_ckpt}",
        message="is not a metacli checkpoint",
    ),
    case(
        "resume of a folder without a checkpoint",
        "train",
        "resume={empty}",
        message="resume={empty}: {empty} is not a run folder with a checkpoint",
    ),
    case(
        "resume that changes the algorithm",
        "train",
        "resume={run}",
        "algo=fomaml",
        message="resume={run} would change what the run is (algo.name: 'maml' -> 'fomaml')",
    ),
    case(
        "resume that changes the model",
        "train",
        "resume={run}",
        "model.hidden=[80,80]",
        message="(model.hidden: '[40, 40]' -> '[80, 80]')",
    ),
    case(
        "resume that changes the task",
        "train",
        "resume={run}",
        "task.shots=5",
        message="(task.shots: 10 -> 5)",
    ),
    case(
        "resume that shortens the run",
        "train",
        "resume={run}",
        "train.iterations=5",
        message="train.iterations=5 is below the 20 iterations that {run} has done",
    ),
    case(
        "resume in a sweep",
        "train",
        "-m",
        "resume={run}",
        message="resume continues one run; it cannot be combined with -m/--multirun",
    ),
    case(
        "resume of a folder in use",
        "train",
        "resume={run}",
        "train.iterations=30",
        message="{run} is in use by pid",
        hold_lock="{run}",
    ),
    case(
        "a second run in a folder in use",
        "train",
        *TINY,
        "hydra.run.dir={run}",
        message="{run} is in use by pid",
        hold_lock="{run}",
    ),
    # --- output folders -------------------------------------------------------------------
    t(
        "run folder that cannot be created",
        "hydra.run.dir=/proc/metacli/run",
        message="hydra.run.dir=/proc/metacli/run: cannot create /proc/metacli",
    ),
    t(
        "run folder that is a file",
        "hydra.run.dir={file}",
        message="hydra.run.dir={file}: {file} is a file, not a folder",
    ),
    t(
        "sweep folder that is a file",
        "-m",
        "seed=0,1",
        "hydra.sweep.dir={file}",
        message="hydra.sweep.dir={file}: {file} is a file, not a folder",
    ),
    t(
        "an update rule's setting without its rule",
        "algo.update=space",
        "algo.space=[sgd,momentum,adam]",
        message="algo.space is a setting of update=space, and no update rule is chosen. "
        "Choose one as a group, update=space (not algo.update=...)",
    ),
    # --- types, non-finite values and signs, more of them -----------------------------
    t("a seed that is not a number", "seed=abc", message="Invalid setting 'seed': Value 'abc'"),
    t(
        "a fractional iteration count",
        "train.iterations=1.5",
        message="Invalid setting 'train.iterations': Value '1.5' of type 'float' could not be "
        "converted to Integer",
    ),
    t(
        "a fractional task count",
        "test.num_tasks=1.5",
        message="Invalid setting 'test.num_tasks': Value '1.5'",
    ),
    t(
        "a seed beyond numpy's 32 bits (torch stopped with an overflow)",
        "seed=99999999999999999999",
        message="seed=99999999999999999999 is not allowed: it must be >= 0 and at most "
        "4,294,967,295",
    ),
    t(
        "threads no thread pool starts (the process died with a segmentation fault)",
        "threads=100000",
        message="threads=100000 is not allowed: it must be >= 1 and at most 1,024, or null",
    ),
    t(
        "a list setting given one number",
        "model.hidden=40",
        message="Invalid setting 'model.hidden': it takes a list, written in brackets "
        "(model.hidden=[...])",
    ),
    t("optim.lr=nan", "optim.lr=nan", message="optim.lr=nan is not allowed"),
    t("algo.inner_lr=-inf", "algo.inner_lr=-inf", message="algo.inner_lr=-inf is not allowed"),
    t("task.noise=nan", "task.noise=nan", message="task.noise=nan is not allowed"),
    t(
        "optim.betas of one number",
        "optim.betas=[0.9]",
        message="optim.betas=[0.9] is not allowed: two numbers in [0, 1)",
    ),
    t("an unknown device", "device=tpu", message="device=tpu is not an option (did you mean cpu?)"),
    t("negative threads", "threads=-1", message="threads=-1 is not allowed: it must be >= 1"),
    t(
        "negative inner steps",
        "algo.inner_steps=-1",
        message="algo.inner_steps=-1 is not allowed: it must be >= 1",
    ),
    # --- files that are not what a setting needs ------------------------------------------
    case(
        "ckpt_path that is a folder",
        "test",
        "ckpt_path={empty}",
        message="No checkpoint at {empty}",
    ),
    case(
        "ckpt_path that is a text file",
        "test",
        "ckpt_path={file}",
        message="Cannot read the checkpoint {file}: it is truncated or not a PyTorch file",
    ),
    t(
        "ckpt_path given to train (silently ignored)",
        "ckpt_path={run}/checkpoints/best.pt",
        message="names the checkpoint that metacli test meta-tests; metacli train does not read it",
    ),
    case(
        "resume of a file",
        "train",
        "resume={file}",
        message="resume={file}: {file} is not a run folder with a checkpoint",
    ),
    t(
        "model.genotype that is not a genotype",
        "task=synthetic",
        "model=genotype",
        "model.genotype={file}",
        message="model.genotype='{file}': {file} is not a genotype",
    ),
    t(
        "model=genotype without model.genotype",
        "task=synthetic",
        "model=genotype",
        message="model=genotype needs model.genotype: the run folder of an architecture search",
    ),
    case(
        "plot of a file",
        "plot",
        "{file}",
        message="{file} is not a run folder (no summary.json)",
    ),
    case(
        "runs rm of a folder that does not exist",
        "runs",
        "rm",
        "{cwd}/nosuch",
        "--yes",
        message="metacli runs: {cwd}/nosuch does not exist. Give folders of runs.",
    ),
    # --- the tools' own options --------------------------------------------------------------
    case(
        "compare in a format it does not write",
        "compare",
        "{run}",
        "--format",
        "xml",
        message="argument --format: invalid choice: 'xml'",
    ),
    case(
        "runs with an unknown status",
        "runs",
        "{run}",
        "--status",
        "nosuch",
        message="--status nosuch: choose among finished, failed, interrupted, crashed",
    ),
    case(
        "runs older than a word",
        "runs",
        "{run}",
        "--older-than",
        "yesterday",
        message="--older-than 'yesterday': give a number of days (e.g. 7) or a date",
    ),
    case(
        "runs rm with a filter without a value",
        "runs",
        "rm",
        "{run}",
        "--filter",
        "algo",
        message="--filter 'algo': write it as KEY=VALUE, e.g. algo=maml.",
    ),
    case(
        "compare by a metric it does not know",
        "compare",
        "{run}",
        "--metric",
        "best",
        message="argument --metric: invalid choice: 'best'",
    ),
    # --- a sweep: every job checked before the first starts ------------------------------
    t(
        "a range for the basic sweeper (Hydra stopped with a traceback)",
        "-m",
        "optim.lr=interval(0.001,0.1)",
        message="optim.lr=interval(0.001,0.1) is a range to sample, which only a search "
        "sweeper does: add hparams_search=<a search config>",
    ),
    t(
        "a malformed override (Hydra's grammar error, exit 1)",
        "-m",
        "seed=0,",
        message="seed=0, cannot be read as an override (Hydra: mismatched input",
    ),
    t(
        "a path that starts with ~ (Hydra's grammar error)",
        "data.root=~/omniglot",
        message="data.root=~/omniglot: Hydra does not read a value that starts with ~. Quote "
        "it, data.root='~/omniglot'",
    ),
    t(
        "an unclosed list",
        "task.amplitude=[1,2",
        message="task.amplitude=[1,2 cannot be read as an override",
    ),
    t(
        "a range with no values (the sweep ran no job and made a folder)",
        "-m",
        "seed=range(5,1)",
        message="seed=range(5,1) gives no values, so the sweep would run no job",
    ),
    t(
        "a glob that matches no option (a traceback)",
        "-m",
        "algo=glob(zzz*)",
        message="algo=glob(zzz*) gives no values, so the sweep would run no job",
    ),
    t(
        "a sweep of a million jobs (checked silently for a day)",
        "-m",
        "seed=range(0,1000000)",
        message="The sweep has 1,000,000 jobs, more than the 10,000 one sweep may run",
    ),
    t(
        "a value for Hydra's launcher group (a traceback)",
        "hydra.launcher=nosuch",
        message="hydra.launcher holds settings, not a value: choose one of its options with "
        "hydra/launcher=<option>",
    ),
    t(
        "an unknown Hydra sweeper (Hydra's error, exit 1)",
        "hydra/sweeper=nosuch",
        message="hydra/sweeper=nosuch is not an option. The options of hydra/sweeper: basic, "
        "optuna",
    ),
    t(
        "an unknown Hydra setting",
        "hydra.nosuch=1",
        message="hydra.nosuch is not a setting. `metacli train --cfg hydra` prints every key.",
    ),
    t(
        "several values without -m",
        "optim.lr=0.1,0.01",
        message="optim.lr=0.1,0.01 gives several values, which is a sweep: add -m",
    ),
    t(
        "a sweep of one job with a bad value",
        "-m",
        "seed=",
        message="The sweep cannot run, so no job was started: Invalid setting 'seed'",
    ),
    t(
        "a search sweep's fixed value of the wrong type",
        "hparams_search=maml_sinusoid",
        "train.iterations=abc",
        message="The sweep cannot run, so no job was started: Invalid setting 'train.iterations'",
    ),
    t(
        "a sweep's later value of the wrong type",
        "-m",
        "algo.inner_lr=0.1,abc",
        message="The sweep's job with algo.inner_lr=abc cannot run, so no job was started: "
        "Invalid setting 'algo.inner_lr'",
    ),
    t(
        "a sweep's later value out of range",
        "-m",
        "seed=0,1,-1",
        message="The sweep's job with seed=-1 cannot run, so no job was started: seed=-1 is "
        "not allowed",
    ),
    t(
        "a sweep's later non-finite value",
        "-m",
        "optim.lr=0.001,inf",
        message="The sweep's job with optim.lr=inf cannot run, so no job was started: "
        "optim.lr=inf is not allowed: it must be a finite number",
    ),
    t(
        "a sweep's later option that does not fit",
        "-m",
        "task=synthetic",
        "model=conv4",
        "task.test_ways=3",
        "algo=protonet,maml",
        message="The sweep's job with algo=maml cannot run, so no job was started: "
        "task.test_ways=3 differs from task.ways",
    ),
    t(
        "a sweep's combination of two swept values",
        "-m",
        "task=synthetic",
        "model=conv4",
        "task.ways=2,5",
        "task.test_ways=2,5",
        "algo=maml",
        message="The sweep's job with task.ways=2 task.test_ways=5 cannot run",
    ),
    t(
        "a sweep's later value in a long sweep (value by value)",
        "-m",
        "seed=range(70)",
        "algo.inner_lr=0.01,0",
        message="The sweep's job with seed=0 algo.inner_lr=0 cannot run, so no job was started",
    ),
    # --- sizes that cannot fit: refused before any work, from the shapes -----------------
    t(
        "an outsized meta-batch",
        "train.meta_batch_size=100000000",
        message="Lower train.meta_batch_size (now 100,000,000; at most",
    ),
    t(
        "an outsized network",
        "model.hidden=[100000000,100000000]",
        message="The model alone does not fit: make the model smaller "
        "(model.hidden=[100000000, 100000000])",
    ),
    t(
        "a searched network of 100,000 cells (built for over an hour, silently)",
        "task=synthetic",
        "algo=metanas",
        "model=darts",
        "model.cells=100000",
        message="model.cells=100000 is not allowed: 1 to 1,000",
    ),
    t(
        "a searched cell of 1,000 nodes",
        "task=synthetic",
        "algo=metanas",
        "model=darts",
        "model.nodes=1000",
        message="model.nodes=1000 is not allowed: 1 to 64",
    ),
    t(
        "a long list in a message (repeated whole before)",
        "task=synthetic",
        "model=resnet12",
        "model.widths=[64,64,64,64,64,64,64,64,64]",
        message="model.widths=[64, 64, 64, 64, 64, 64, 64, 64, ... (9 items)] is not allowed",
    ),
    t(
        "an outsized support set",
        "task.shots=100000000",
        message="metacli train: This run needs about",
    ),
    t(
        "a meta-test of more tasks than could ever help",
        "test.num_tasks=100000000",
        message="test.num_tasks=100000000 is not allowed: it must be at most 10,000,000",
    ),
    t(
        "a validation of more tasks than could ever help",
        "val.num_tasks=10000001",
        message="val.num_tasks=10000001 is not allowed: it must be at most 10,000,000",
    ),
    t(
        "too many validation tasks adapted at once",
        "val.num_tasks=10000000",
        "val.batch_size=10000000",
        "model.hidden=[2000,2000]",
        message="Lower val.batch_size (now 10,000,000; at most",
    ),
    t(
        "images too large for a convolutional network",
        "task=synthetic",
        "model=conv4",
        "task.image_size=100000",
        message="The model alone does not fit: make the model smaller (model.filters=64, or "
        "task.image_size=100000, which sizes its layers)",
    ),
    t(
        "a sweep's later outsized value",
        "-m",
        "train.meta_batch_size=4,100000000",
        message="The sweep's job with train.meta_batch_size=100000000 cannot run, so no job "
        "was started: This run needs about",
    ),
    case(
        "a meta-test of a checkpoint with too many tasks at once",
        "test",
        "ckpt_path={run}/checkpoints/best.pt",
        "test.num_tasks=10000000",
        "test.batch_size=10000000",
        message="metacli test: This meta-test needs about",
    ),
    # --- combinations that cannot work ----------------------------------------------------
    t(
        "MAML++'s learned rates on a regression task",
        "algo=mamlpp",
        message="algo=mamlpp learns its inner rates per layer and step (algo.update=lslr), "
        "and on a regression task (task=sinusoid) they grow until the sharpest tasks diverge",
    ),
    t(
        "ALFA on a regression task",
        "algo=alfa",
        message="algo=alfa generates its inner learning rates and weight decays per task and "
        "step, and on a regression task (task=sinusoid) they overshoot",
    ),
    t(
        "a sweep's later algorithm that does not fit the task",
        "-m",
        "algo=maml,mamlpp",
        message="The sweep's job with algo=mamlpp cannot run, so no job was started: "
        "algo=mamlpp learns its inner rates",
    ),
    t(
        "an image model behind MR-MAML's encoder",
        "algo=mrmaml",
        "task=synthetic",
        "model=conv4",
        message="algo=mrmaml encodes each image into a vector of shape (5,) before the model, "
        "but model=conv4 takes images",
    ),
    case(
        "compare of a path that does not exist",
        "compare",
        "{empty}/nothing",
        message="metacli compare: {empty}/nothing does not exist. Give folders of runs.",
    ),
    case(
        "compare --plot to a folder that cannot be made",
        "compare",
        "{run}",
        "--plot",
        "/proc/metacli/val.png",
        message="Cannot write the figure /proc/metacli/val.png",
    ),
    case(
        "compare --filter without a value",
        "compare",
        "{run}",
        "--filter",
        "algo",
        message="--filter 'algo': write it as KEY=VALUE",
    ),
    case(
        "compare --sort by an unknown column",
        "compare",
        "{run}",
        "--sort",
        "nosuch",
        message="--sort nosuch: no such column",
    ),
    case(
        "plot of a folder that is not a run",
        "plot",
        "{empty}",
        message="{empty} is neither a run folder (no summary.json) nor a folder of finished",
    ),
    # --- commands -------------------------------------------------------------------------
    case(
        "unknown command",
        "fit",
        message="unknown command 'fit'; choose one of: train, test, data, compare, plot",
    ),
    t(
        "another primary config (Hydra's own error, exit 1)",
        "--config-name",
        "nosuch",
        message="--config-name: metacli train and metacli test always start from their own config",
    ),
    case("data without an action", "data", message="metacli data: choose one of: check, prepare"),
    case(
        "check of a group without an option (a traceback)",
        "check",
        "algo",
        message="metacli check: give one option to check, as <group>=<option>",
    ),
    case(
        "compare of the other command's runs (said only that there were none)",
        "compare",
        "{run}",
        "--command",
        "test",
        message="no runs of metacli test (summary.json) below {run}, but 1 run(s) of metacli "
        "train: add --command train",
        code=1,
    ),
    case(
        "runs rm without --yes and no terminal",
        "runs",
        "rm",
        "{run}",
        message="metacli runs: runs rm would remove 1 run(s) (listed above); add --yes",
    ),
    # --- which parameters adapt, and the gradient-based family's own settings -----------
    t(
        "an adapt mode that is not one",
        "algo.adapt=bodies",
        message="algo.adapt='bodies' is not allowed: choose one of all, head, body, or a list",
    ),
    t(
        "adapt patterns that match no parameter",
        "algo.adapt=[encoder.*]",
        message="matches none of the parameters of model=mlp: body.1.weight, body.1.bias",
    ),
    t(
        "iMAML without a proximal term",
        "algo=imaml",
        "algo.lam=0",
        message="algo.lam=0.0 is not allowed",
    ),
    t(
        "negative CG steps",
        "algo=imaml",
        "algo.cg_steps=-1",
        message="algo.cg_steps=-1 is not allowed",
    ),
    t(
        "negative lambda damping",
        "algo=imaml",
        "algo.lam_damping=-1",
        message="algo.lam_damping=-1.0 is not allowed",
    ),
    t(
        "iMAML with a learned rule",
        "algo=imaml",
        "update=metasgd",
        message="algo=imaml cannot learn the parameters of algo.update=metasgd",
    ),
    t(
        "Reptile with meta-curvature",
        "algo=reptile",
        "update=metacurvature",
        message="algo=reptile cannot learn the parameters of algo.update=metacurvature",
    ),
    t(
        "CAVIA on a model without a context",
        "algo=cavia",
        "task=synthetic",
        "model=resnet12",
        message="algo=cavia adapts context parameters that model=resnet12 does not take",
    ),
    t(
        "CAVIA FiLM of a block that does not exist",
        "algo=cavia",
        "algo.context_in=[5]",
        message="algo.context_in=[5] is not allowed",
    ),
    t(
        "a context that conditions nothing",
        "task=synthetic",
        "model=conv4",
        "model.context=3",
        message="model.film=[] is not allowed: give the blocks the context conditions",
    ),
]


def fill(text: str, places: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in places.items()})


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("errors")
    run = base / "run"
    run_cli("train", *TINY, f"hydra.run.dir={run}", cwd=base)
    omniglot = make_omniglot(base / "omniglot", "zip")
    truncated = base / "truncated"
    shutil.copytree(omniglot, truncated)
    archive = truncated / "images_evaluation.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    corrupt = make_omniglot(base / "corrupt", "folders")
    (corrupt / "images_background/Alpha/character01/0001_01.png").write_bytes(b"not a png")
    checkpoint = run / "checkpoints" / "last.pt"
    (base / "truncated.pt").write_bytes(checkpoint.read_bytes()[:100])
    torch.save({"state_dict": {}}, base / "foreign.pt")
    with open(base / "evil.pt", "wb") as handle:
        pickle.dump({"format": "metacli", "payload": Case("x", (), "")}, handle, protocol=2)
    (base / "empty").mkdir()
    splits = base / "splits"  # Prototypical Networks' split files, one line damaged
    splits.mkdir()
    (splits / "train.txt").write_text("Alpha/character01/rot000\nJapan\n")
    (splits / "val.txt").write_text("Alpha/character01/rot090\n")
    (splits / "test.txt").write_text("Alpha/character01/rot180\n")
    (base / "file.txt").write_text("not a folder\n")
    (base / "cwd").mkdir()
    tested = base / "tested"  # a meta-test's folder
    run_cli(
        "test", f"ckpt_path={checkpoint}", "test.num_tasks=4", f"hydra.run.dir={tested}", cwd=base
    )
    shutil.copytree(run, base / "sweep" / "0")  # a sweep's folder of one job
    failed = base / "failed"  # a run that diverged at its second iteration
    run_cli("train", *TINY, "optim.lr=1e30", f"hydra.run.dir={failed}", cwd=base, check=False)
    return {
        "failed": failed,
        "tested": tested,
        "sweep": base / "sweep",
        "run": run,
        "omniglot": omniglot,
        "truncated": truncated,
        "corrupt": corrupt,
        "cache": base / "cache",
        "empty": base / "empty",
        "splits": splits,
        "file": base / "file.txt",
        "truncated_ckpt": base / "truncated.pt",
        "foreign_ckpt": base / "foreign.pt",
        "evil_ckpt": base / "evil.pt",
        "cwd": base / "cwd",
    }


def snapshot(places: dict[str, Path]) -> dict[str, str]:
    """Every file the cases may not touch (the dataset cache may be built), by content."""
    roots = [p for k, p in places.items() if k not in ("cache", "cwd")]
    files = [f for r in roots for f in ([r] if r.is_file() else r.rglob("*")) if f.is_file()]
    return {  # a lock file records the last owner, not run data
        str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.name != ".lock"
    }


def test_an_outsized_override_is_refused_before_hydra_parses_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20,000-layer MLP as an override: Hydra's parser took 30 s a reading of it, and
    metacli read it several times (no message for minutes)."""
    monkeypatch.chdir(tmp_path)
    deep = "model.hidden=[" + ",".join(["4"] * 20000) + "]"
    code, _, err = run_here(["train", *TINY, deep], capsys)
    assert code == 2 and "Traceback" not in err
    assert "model.hidden=... is 40,014 characters long, more than the 20,000" in err
    assert not list(tmp_path.iterdir())


def run_here(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    argv_before = list(sys.argv)
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        sys.argv = argv_before
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_bad_input(
    bad: Case,
    places: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("METACLI_CACHE", str(places["cache"]))
    monkeypatch.chdir(places["cwd"])
    if "cuda" in bad.argv[-1] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = snapshot(places)
    argv = [fill(a, places) for a in bad.argv]
    if bad.hold_lock:
        with FolderLock(Path(fill(bad.hold_lock, places)) / ".lock", "a live run"):
            code, out, err = run_here(argv, capsys)
    else:
        code, out, err = run_here(argv, capsys)
    output = out + err
    message = fill(bad.message, places)
    assert code == bad.code, output
    assert message in output, output
    assert "Traceback" not in output
    assert f"metacli {bad.argv[0]}: metacli {bad.argv[0]}" not in output  # one prefix
    last = [(text.strip().splitlines() or [""])[-1] for text in (out, err)]
    assert any(message in line for line in last), output  # one paragraph, the last line
    assert snapshot(places) == before  # nothing already written changed
    assert not [p for p in places["cwd"].rglob("*") if p.is_file()]  # and no run folder


def test_the_catalogue_has_fifty_cases_and_docs_list_it() -> None:
    assert len(CASES) >= 50 and len({c.name for c in CASES}) == len(CASES)
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/errors.md is out of date: run .venv/bin/python -m tests.test_errors"
    )


def render() -> str:
    lines = [
        "# Bad inputs and what metacli says",
        "",
        "Every row is a test (`tests/test_errors.py`): the command exits with the code shown,",
        "prints one short message containing the text shown (placeholders in braces: a run",
        "folder, a dataset folder, a file), no traceback (`HYDRA_FULL_ERROR=1` shows one),",
        "creates no run folder and changes nothing already written. Regenerate this page with",
        "`.venv/bin/python -m tests.test_errors`.",
        "",
        "| # | input | command | exit | message contains |",
        "|---|---|---|---|---|",
    ]
    for i, c in enumerate(CASES, 1):
        command = " ".join(["metacli", *c.argv]).replace("|", r"\|")
        message = c.message.replace("|", r"\|")
        lines.append(f"| {i} | {c.name} | `{command}` | {c.code} | {message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC} ({len(CASES)} cases)")
