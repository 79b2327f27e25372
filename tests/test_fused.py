"""The single-backward Conv-4 block (metacli/models/fused.py): the numbers of autograd's
convolution, batch norm, ReLU and max-pooling, taken only where a pass is declared to be
backpropagated once, and loud where it would be differentiated twice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.build import build
from metacli.loop import sample
from metacli.models import fused
from metacli.models.conv4 import Conv4, Conv4Config
from metacli.models.fused import ConvNormPool, backward_once
from tests.conftest import compose_config
from tests.test_contract import CONV4


def layers(
    x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor | None, shift: Tensor, ceil: bool
) -> Tensor:
    """The block as autograd computes it: the reference."""
    z = F.batch_norm(torch.conv2d(x, weight, bias, 1, 1), None, None, scale, shift, True, 0.0)
    return F.max_pool2d(F.relu(z), 2, ceil_mode=ceil)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How often the block's forward and backward ran."""
    calls = {"forward": 0, "backward": 0}
    forward, backward = ConvNormPool.forward, ConvNormPool.backward

    def counted_forward(ctx: object, *args: object) -> Tensor:
        calls["forward"] += 1
        return forward(ctx, *args)  # type: ignore[arg-type]

    def counted_backward(ctx: object, grad: Tensor) -> object:
        calls["backward"] += 1
        return backward(ctx, grad)

    monkeypatch.setattr(ConvNormPool, "forward", staticmethod(counted_forward))
    monkeypatch.setattr(ConvNormPool, "backward", staticmethod(counted_backward))
    yield calls


@pytest.mark.parametrize("ceil", [False, True])
@pytest.mark.parametrize("size", [16, 11, 7])
@pytest.mark.parametrize("channels_in", [1, 5])  # 1: the convolution is computed again
@pytest.mark.parametrize("affine", ["scale", "shift_only", "no_bias"])
def test_block_equals_autograd_of_its_layers(
    float64: None, ceil: bool, size: int, channels_in: int, affine: str
) -> None:
    gen = torch.Generator().manual_seed(size + channels_in)
    # integer-valued images, weights and biases: exact convolutions with many equal
    # values in a window, so the winner of ties (the first, as PyTorch's pooling takes
    # it) is checked too. (Where the layouts' convolutions round differently, a near-tie
    # may fall either way: either winner's gradient is a valid subgradient.)
    x = torch.randint(0, 3, (6, channels_in, size, size), generator=gen).double()
    x.requires_grad_(channels_in > 1)
    inputs = {
        "x": x,
        "weight": torch.randint(-1, 2, (4, channels_in, 3, 3), generator=gen).double(),
        "bias": None if affine == "no_bias" else torch.randint(-2, 3, (4,), generator=gen).double(),
        "scale": None if affine == "shift_only" else torch.randn(4, generator=gen),
        "shift": torch.randn(4, generator=gen),
    }
    for value in inputs.values():
        if value is not None and value is not x:
            value.requires_grad_()
    wanted = [v for v in inputs.values() if v is not None and v.requires_grad]
    ours = ConvNormPool.apply(*inputs.values(), 1e-5, ceil)
    theirs = layers(*inputs.values(), ceil)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert (ours == 0).any() and (ours > 0).any()  # the ReLU's gate is exercised
    incoming = torch.randn(ours.shape, generator=gen)
    for mine, reference in zip(
        torch.autograd.grad(ours, wanted, incoming),
        torch.autograd.grad(theirs, wanted, incoming),
        strict=True,
    ):
        # (the convolution's bias has a gradient of zero before rounding: absolute)
        scale = max(reference.abs().max().item(), 1.0)
        assert (mine - reference).abs().max().item() / scale < 1e-10


def test_in_float32_the_block_is_as_accurate_as_autograds_layers() -> None:
    """On Omniglot-like images (sparse ink: the first block's convolution has a mean
    larger than its spread) the block's float32 values and gradients are as close to the
    float64 ones as autograd's own float32 layers. (PyTorch's channels-last batch norm
    sums its statistics in one float32 pass, 4e-4 off here; the block computes them.)"""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(80, 1, 28, 28, generator=gen) < 0.1).float()
    inputs = [
        x,
        torch.randn(64, 1, 3, 3, generator=gen) / 3,  # nn.Conv2d's scale (fan-in 9)
        torch.randn(64, generator=gen) / 3,
        torch.rand(64, generator=gen),
        torch.zeros(64),
    ]
    incoming = torch.randn(80, 64, 14, 14, generator=gen)

    def values_and_gradients(block: object, dtype: torch.dtype) -> list[Tensor]:
        args = [t.to(dtype).requires_grad_(i > 0) for i, t in enumerate(inputs)]
        out = block(*args)  # type: ignore[operator]
        weight, _, scale, shift = torch.autograd.grad(out, args[1:], incoming.to(dtype))
        return [out.double(), weight.double(), scale.double(), shift.double()]

    def block(*args: Tensor) -> Tensor:
        return ConvNormPool.apply(*args, 1e-5, False)  # type: ignore[no-any-return]

    def reference(*args: Tensor) -> Tensor:
        return layers(*args, False)

    exact = values_and_gradients(reference, torch.float64)
    ours = values_and_gradients(block, torch.float32)
    theirs = values_and_gradients(reference, torch.float32)
    for name, mine, autograds, truth in zip(
        ["values", "weight", "scale", "shift"], ours, theirs, exact, strict=True
    ):
        error = (mine - truth).abs().max().item() / truth.abs().max().item()
        reference_error = (autograds - truth).abs().max().item() / truth.abs().max().item()
        assert error <= 4 * reference_error + 1e-6, (name, error, reference_error)


def test_a_second_differentiation_raises() -> None:
    x = torch.randn(4, 2, 8, 8, requires_grad=True)
    weight, shift = torch.randn(3, 2, 3, 3, requires_grad=True), torch.zeros(3)
    out = ConvNormPool.apply(x, weight, None, None, shift, 1e-5, False)
    with pytest.raises(RuntimeError, match="backpropagated with create_graph=True"):
        torch.autograd.grad(out.pow(2).sum(), weight, create_graph=True)
    out = ConvNormPool.apply(x, weight, None, None, shift, 1e-5, False)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated a second time"):
        out.sum().backward()


def conv4(size: int = 16, **kwargs: object) -> Conv4:
    return Conv4(Conv4Config(filters=4, **kwargs), (1, size, size), 3)  # type: ignore[arg-type]


def test_conv4_takes_the_block_only_where_a_pass_is_declared(counted: dict[str, int]) -> None:
    x = torch.randn(6, 1, 16, 16)
    model = conv4()
    model(x).sum().backward()  # not declared: autograd's layers
    assert counted["forward"] == 0
    with backward_once():
        out = model(x)
        with torch.no_grad():
            model(x)
        torch.func.vmap(model)(x[None])  # inside a transform: plain statistics
    assert counted["forward"] == 4  # the four blocks of the first pass
    out.sum().backward()
    assert counted["backward"] == 4
    for declined in (conv4(strided=True), conv4(norm="none"), conv4(norm="running").eval()):
        with backward_once():
            declined(x)
    assert counted["forward"] == 4
    with backward_once():
        conv4(norm="running").train()(x)  # training: batch statistics
        conv4(21, norm_scale=False, pool_padding="same")(torch.randn(6, 1, 21, 21))
    assert counted["forward"] == 12


MODEL = (*CONV4, "train.meta_batch_size=3", "algo.batching=loop")


@pytest.mark.parametrize(
    "algo",
    [
        ("algo=maml", "algo.inner_steps=2"),
        ("algo=fomaml", "algo.inner_steps=2"),
        ("algo=mamlpp", "algo.inner_steps=2", "model.norm=per_step"),
        ("algo=hybrid",),
        ("algo=pretrain",),
        ("algo=protonet",),
    ],
    ids=lambda a: a[0],
)
def test_meta_gradients_with_and_without_the_block_agree(
    float64: None,
    counted: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    algo: tuple[str, ...],
) -> None:
    """In a per-task loop the declared passes take the block; the meta-loss and
    meta-gradient equal those of autograd's layers (the block switched off)."""
    results = []
    taken = 0
    for enabled in (True, False):
        if not enabled:
            monkeypatch.setattr("metacli.models.conv4.backpropagated_once", lambda: False)
        c = build(compose_config(*algo, *MODEL))
        out = c.algorithm.meta_loss(sample(c))
        out.loss.backward()
        grads = [p.grad.flatten() for p in c.algorithm.parameters() if p.grad is not None]
        results.append((out.loss.detach(), torch.cat(grads)))
        if enabled:
            assert counted["backward"] > 0
            taken = counted["forward"]
    assert counted["forward"] == taken  # none with the block switched off
    (loss, grads), (reference_loss, reference) = results
    torch.testing.assert_close(loss, reference_loss, rtol=1e-10, atol=0)
    assert (grads - reference).norm() / reference.norm() < 1e-10


@pytest.mark.parametrize(
    "settings", [{}, {"norm_scale": False, "pool_padding": "same"}, {"norm": "per_step"}]
)
def test_without_gradients_conv4_computes_the_layers_values(
    float64: None, monkeypatch: pytest.MonkeyPatch, settings: dict[str, object]
) -> None:
    """Evaluation's declared passes (no_grad) take the block's forward, with the layers'
    values."""
    calls = []
    monkeypatch.setattr(
        "metacli.models.conv4.conv_norm_pool",
        lambda *args: calls.append(1) or fused.conv_norm_pool(*args),
    )
    model = conv4(21, **settings)
    with torch.no_grad():
        for parameter in model.parameters():  # away from the initialisation
            parameter.normal_()
        x = torch.randn(7, 1, 21, 21)
        assert not calls  # (not declared: building's probe, a user's own loop)
        with backward_once():
            ours = model(x)
        assert len(calls) == 4
        theirs = model(x)  # not declared: the layers
    assert len(calls) == 4
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
