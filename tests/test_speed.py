"""What the speed work must not change: the numbers. Opt-in compilation (``algo.compile``)
against eager, its fallback, the MLP's written-out forward pass against functional_call,
and the timings a run records. Speed itself is measured by benchmarks/, never here."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from metacli.build import build
from metacli.loop import meta_step
from metacli.models.mlp import MLP, MLPConfig
from tests.conftest import TINY, compose_config, read_metrics, read_summary, run_cli

SINUSOID = ("task=sinusoid", "model=mlp", "model.hidden=[8,8]", "train.meta_batch_size=3")

CONV = (
    "task=synthetic",
    "model=conv4",
    "model.filters=4",
    "task.ways=3",
    "task.shots=2",
    "task.queries=2",
    "task.image_size=16",
    "train.meta_batch_size=2",
    "algo.inner_steps=2",
)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("output_dim", [1, 5, None])
def test_mlp_written_out_forward_equals_functional_call(activation: str, output_dim: Any) -> None:
    model = MLP(MLPConfig(hidden=[7, 6], activation=activation), (2, 3), output_dim)
    params = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    x = torch.randn(4, 2, 3)
    expected = torch.func.functional_call(model, (params, {}), (x,))
    assert torch.equal(model.functional(params, {}, x), expected)


def meta_gradient(
    *overrides: str, base: tuple[str, ...] = SINUSOID
) -> tuple[list[torch.Tensor], Any]:
    """The components after one meta-step, and the meta-gradient of that step."""
    torch.manual_seed(0)
    c = build(compose_config(*TINY, *base, "device=cpu", *overrides))
    c.optimizer.step = lambda *a, **k: None  # keep the weights: compare the gradient only
    meta_step(c, None)
    return [p.grad.clone() for p in c.algorithm.parameters() if p.grad is not None], c


def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile traced as in real use, but without generating C++ (seconds, not a
    minute per test): what compiled code computes is checked, not the code generator."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd"])
@pytest.mark.parametrize("batching", ["stacked", "vmap", "loop", "threads"])
def test_compiled_meta_gradient_equals_eager(
    monkeypatch: pytest.MonkeyPatch, algo: str, batching: str
) -> None:
    aot_eager(monkeypatch)
    eager, _ = meta_gradient(f"algo={algo}", f"algo.batching={batching}")
    compiled, c = meta_gradient(f"algo={algo}", f"algo.batching={batching}", "algo.compile=true")
    assert c.algorithm.executor.compiled, "nothing went through the compiler"
    assert c.algorithm.executor.fallback is None
    assert c.algorithm.executor.compile_seconds > 0
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_failed_compilation_falls_back_to_eager_with_a_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(fn: Any, **kwargs: Any) -> Any:
        def call(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler found\nsecond line of a long trace")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    eager, _ = meta_gradient()
    with caplog.at_level(logging.WARNING):
        fallen, c = meta_gradient("algo.compile=true")
        meta_step(c, None)  # later steps stay eager, without a second message
    for a, b in zip(fallen, eager, strict=True):
        assert torch.equal(a, b)
    assert c.algorithm.executor.fallback == "RuntimeError: no C++ compiler found"
    warnings = [r.getMessage() for r in caplog.records if "algo.compile" in r.getMessage()]
    assert len(warnings) == 1
    assert "running it eagerly" in warnings[0] and "algo.compile=false" in warnings[0]


@pytest.mark.slow  # the real code generator (~25 s); the aot_eager tests above are fast
def test_a_run_records_its_startup_and_compile_times(tmp_path: Path) -> None:
    """Through the CLI with the real code generator (C++ on a CPU): the same training
    losses as eager, and the compile time recorded apart."""
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("algo.compile=true",))):
        folder = tmp_path / name
        run_cli("train", *TINY, *extra, f"hydra.run.dir={folder}", cwd=tmp_path)
        runs[name] = (read_summary(folder), read_metrics(folder))
    (eager, eager_lines), (compiled, compiled_lines) = runs["eager"], runs["compiled"]
    assert 0 < eager["startup_s"] < eager["wall_time_s"] + 60
    assert "compile_s" not in eager  # not asked for: nothing recorded
    assert compiled["compile_s"] > 0 and "compile_fallback" not in compiled
    assert compiled["config"]["algo"]["compile"] is True
    losses = [
        [r["loss"] for r in lines if r["split"] == "train"]
        for lines in (eager_lines, compiled_lines)
    ]
    assert len(losses[0]) == len(losses[1]) > 0
    for a, b in zip(*losses, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("norm", ["transductive", "per_step", "running"])
@pytest.mark.parametrize("algo", ["maml", "mamlpp"])
def test_fused_batch_norm_gives_the_plain_meta_gradient(
    float64, monkeypatch: pytest.MonkeyPatch, norm: str, algo: str
) -> None:
    """Outside torch.func transforms the loop normalises with PyTorch's fused kernel: the
    second-order meta-gradient must be the plain mean/variance form's, to float64
    rounding (under vmap the fused kernel is wrong, and is never used there)."""
    import metacli.models.base as base

    calls: list[tuple[bool, bool]] = []  # (fused, inside a torch.func transform)
    real = base.fused_is_exact

    def counted(x: torch.Tensor) -> bool:
        inside = torch._C._functorch.peek_interpreter_stack() is not None
        calls.append((real(x), inside))
        return calls[-1][0]

    overrides = (f"algo={algo}", f"model.norm={norm}", "algo.batching=loop")
    monkeypatch.setattr(base, "fused_is_exact", counted)
    fused, _ = meta_gradient(*overrides, base=CONV)
    assert any(fused for fused, _ in calls), "the fused kernel was never used"
    monkeypatch.setattr(base, "fused_is_exact", lambda x: False)
    plain, _ = meta_gradient(*overrides, base=CONV)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    calls.clear()
    monkeypatch.setattr(base, "fused_is_exact", counted)
    meta_gradient(*overrides[:-1], "algo.batching=vmap", base=CONV)
    inside = [fused for fused, transformed in calls if transformed]
    assert inside and not any(inside), "the fused kernel ran under vmap"
