"""2x2 max-pooling as two elementwise maxima gives max-pooling's values (robust.pairwise_pool).

Oracles: ``F.max_pool2d`` itself (equal values in both layouts, odd sizes, NaN and infinities,
unbatched input), the modules that must stay (other windows, strides, padding, dilation,
``ceil_mode``, indices, subclasses, hooks), shared parameters, and Smooth's certificates with and
without the rewrite.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.backbones import LeNet, Normalize, SmallCNN
from robust.pairwise_pool import PairwiseMaxPool2d, pairwise_max_pool
from robust.smoothing import Smooth


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and torch.equal(a.nan_to_num(), b.nan_to_num())
        and (torch.equal(a.isnan(), b.isnan()))
    )


@pytest.mark.parametrize("shape", [(5, 20, 24, 24), (3, 4, 7, 9), (2, 3, 2, 2), (6, 5, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_values_equal_max_pool2d(shape, channels_last) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x.view(-1)[::7] = 0.0  # ties, as in MNIST's background
    x.view(-1)[3], x.view(-1)[11], x.view(-1)[21] = float("nan"), float("inf"), -float("inf")
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    ours = PairwiseMaxPool2d()(x)
    assert same_values(ours, F.max_pool2d(x, 2))
    assert ours.isnan().any()  # the NaN reached an output: the check above saw it
    if channels_last and x.dim() == 4 and x.shape[1] > 1:
        assert ours.is_contiguous(memory_format=torch.channels_last)  # the layout is kept


@pytest.mark.parametrize("backbone", [LeNet, SmallCNN])
def test_backbones_give_the_same_logits_with_shared_parameters(backbone) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.1307], [0.3081]), backbone(1, 10)).eval()
    fast = pairwise_max_pool(model)
    pools = [type(m).__name__ for m in fast.modules() if "Pool" in type(m).__name__]
    assert pools and set(pools) == {"PairwiseMaxPool2d"}  # every pool was replaced
    assert all(a is b for a, b in zip(fast.parameters(), model.parameters(), strict=True))
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(32, 1, 28, 28)
    x[:, :, :4] = 0  # background rows: ties in every pooling window there
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3),
        nn.MaxPool2d(2, stride=1),
        nn.MaxPool2d(2, padding=1),
        nn.MaxPool2d(2, dilation=2),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.MaxPool2d(2, return_indices=True),
        nn.AvgPool2d(2),
        nn.AdaptiveMaxPool2d(3, return_indices=True),
        type("MyPool", (nn.MaxPool2d,), {})(2),  # a subclass may compute something else
    ],
)
def test_other_pools_stay(pool) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), pool)
    assert pairwise_max_pool(model) is model


@pytest.mark.parametrize(
    ("output_size", "shape"),
    [(12, (2, 3, 24, 24)), ((4, None), (2, 3, 8, 8)), ((None, 3), (2, 3, 6, 6)), (3, (2, 3, 7, 6))],
)
def test_adaptive_pools_keep_their_values_on_every_input_size(output_size, shape) -> None:
    model = nn.Sequential(nn.AdaptiveMaxPool2d(output_size))
    fast = pairwise_max_pool(model)
    assert isinstance(fast[0], PairwiseMaxPool2d)
    x = torch.randn(shape)
    assert torch.equal(fast(x), model(x))


def test_hooks_and_custom_containers_are_respected() -> None:
    hooked = nn.MaxPool2d(2)
    hooked.register_forward_hook(lambda module, inputs, output: output * 2)
    assert pairwise_max_pool(nn.Sequential(nn.Conv2d(1, 2, 3), hooked))[1] is hooked
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
    assert isinstance(pairwise_max_pool(plain)[1], PairwiseMaxPool2d)  # the control
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d((2, 2), stride=(2, 2))))
    assert isinstance(pairwise_max_pool(nested)[0][1], PairwiseMaxPool2d)


def test_smooth_certificates_are_the_same_with_and_without_the_rewrite() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.1307], [0.3081]), LeNet(1, 10)).eval()
    images = torch.rand(3, 1, 28, 28)
    images[:, :, :10] = 0
    certificates = {}
    for pairwise in (False, True):
        smooth = Smooth(model, 10, 0.5, batch_size=300, pairwise_pool=pairwise)
        assert smooth.settings["pairwise_pool"] is pairwise
        pools = {type(m).__name__ for m in smooth._model.modules() if "Pool" in type(m).__name__}
        assert pools == {"PairwiseMaxPool2d" if pairwise else "MaxPool2d"}
        certificates[pairwise] = smooth.certify_batch(images, [0, 1, 2], 50, 900, 0.01)
    assert certificates[True] == certificates[False]
    assert Smooth(model, 10, 0.5).pairwise_pool  # the CPU default


def test_a_pool_changed_in_place_after_the_rewrite_is_followed() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(4), nn.Flatten()
    )
    fast = pairwise_max_pool(net)
    assert [type(m).__name__ for m in fast][1:3] == ["PairwiseMaxPool2d"] * 2
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(fast(x), net(x))
    net[1].kernel_size, net[1].stride, net[1].padding = 3, 1, 1  # no longer 2x2
    net[2].output_size = 3  # no longer half the input
    assert fast(x).shape == net(x).shape == (2, 36)
    assert torch.equal(fast(x), net(x))
    smooth = Smooth(net, 36, 0.5, batch_size=100, noise_block=50)
    images = torch.rand(2, 1, 16, 16)
    first = smooth.certify_batch(images, [0, 1], 20, 200, 0.01)
    net[1].kernel_size, net[1].stride, net[1].padding = 2, 2, 0
    fresh = Smooth(net, 36, 0.5, batch_size=100, noise_block=50)
    assert smooth.certify_batch(images, [0, 1], 20, 200, 0.01) == fresh.certify_batch(
        images, [0, 1], 20, 200, 0.01
    )
    assert first != fresh.certify_batch(images, [0, 1], 20, 200, 0.01)  # the change mattered
