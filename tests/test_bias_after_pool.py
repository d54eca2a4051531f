"""A convolution's bias added after its max-pool gives the same values (robust.bias_after_pool).

Oracles: the convolution computed without bias with the bias added separately (as cuDNN
computes it), then pooled: the rewrite must equal it bit for bit, also where a large bias makes
many window values round to ties; the written model itself up to the rounding of a fused CPU
bias; the modules that must not be rewritten; and Smooth's certificates.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.backbones import LeNet, Normalize
from robust.bias_after_pool import ConvWithoutBias, PoolBias, bias_after_pool
from robust.checks import SettingError
from robust.pairwise_pool import PairwiseMaxPool2d, pairwise_max_pool
from robust.pool_first import pool_before_relu
from robust.smoothing import Smooth


def conv_pool(bias: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.ReLU()).to(dtype)
    with torch.no_grad():
        net[0].bias.add_(bias)
    return net.eval()


def separate_bias_then_pool(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The written order with the bias added in its own elementwise pass, as cuDNN's path does."""
    conv = net[0]
    summed = F.conv2d(x, conv.weight) + conv.bias.view(-1, 1, 1)
    return F.relu(F.max_pool2d(summed, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [0.0, 3000.0])
def test_bit_identical_to_a_separately_added_bias(dtype, bias) -> None:
    # a bias of 3000 rounds neighbouring values of a window to ties (float32 spacing there is
    # 2.4e-4, bf16's 16): the window's maximum must still be the rounded sum of its maximum
    net = conv_pool(bias, dtype)
    fast = bias_after_pool(net)
    assert [type(m).__name__ for m in fast] == ["ConvWithoutBias", "Sequential", "ReLU"]
    x = torch.randn(16, 2, 12, 12).to(dtype)
    x[0, 0, 3, 3], x[1, 1, 5, 5], x[2, 0, 7, 7] = float("nan"), float("inf"), -float("inf")
    with torch.no_grad():
        expected, got = separate_bias_then_pool(net, x), fast(x)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert torch.equal(got.isnan(), expected.isnan())
    # the test sees rounding: adding the bias before pooling to the *unrounded* window maxima in
    # float64 differs from the float32 result when the bias is large
    if bias and dtype == torch.float32:
        with torch.no_grad():
            exact = F.conv2d(x.double(), net[0].weight.double())
            exact = F.relu(F.max_pool2d(exact, 2) + net[0].bias.double().view(-1, 1, 1))
        assert not torch.equal(exact.nan_to_num().float(), got.nan_to_num())


def test_lenet_equals_the_written_model_up_to_fused_rounding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.1307], [0.3081]), LeNet(1, 10)).eval()
    fast = bias_after_pool(pool_before_relu(model))
    rewritten = [type(m).__name__ for m in fast[1]]
    assert rewritten[:4] == ["ConvWithoutBias", "Sequential", "ReLU", "ConvWithoutBias"]
    assert bias_after_pool(model) is model  # ReLU between conv and pool: nothing to move
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    # the convolutions' tensors are read from them at each call, not registered again
    assert list(dict(fast.named_parameters())) == [
        "1.7.weight",
        "1.7.bias",
        "1.9.weight",
        "1.9.bias",
    ]


@pytest.mark.parametrize(
    "case",
    [
        "no bias",
        "relu between",
        "avg pool",
        "indices",
        "conv subclass",
        "hooked conv",
        "hooked pool",
    ],
)
def test_only_an_exact_conv_with_bias_before_a_max_pool_is_rewritten(case) -> None:
    conv, pool = nn.Conv2d(1, 2, 3, bias=case != "no bias"), nn.MaxPool2d(2)
    modules: list[nn.Module] = [conv, pool]
    if case == "relu between":
        modules.insert(1, nn.ReLU())
    elif case == "avg pool":  # avg(a + b) == avg(a) + b only up to rounding
        modules[1] = nn.AvgPool2d(2)
    elif case == "indices":
        modules[1] = nn.MaxPool2d(2, return_indices=True)
    elif case == "conv subclass":
        modules[0] = type("MyConv", (nn.Conv2d,), {})(1, 2, 3)
    elif case == "hooked conv":
        conv.register_forward_hook(lambda *args: None)
    elif case == "hooked pool":
        pool.register_forward_pre_hook(lambda *args: None)
    net = nn.Sequential(*modules)
    assert bias_after_pool(net) is net
    control = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
    assert bias_after_pool(control) is not control


def test_follows_the_convolution_as_it_is_at_each_call() -> None:
    net = conv_pool(0.5)
    fast = bias_after_pool(net)
    x = torch.randn(4, 2, 12, 12)
    with torch.no_grad():
        net[0].bias.mul_(-3)  # changed in place
        assert torch.equal(fast(x), separate_bias_then_pool(net, x))
        net[0].weight = nn.Parameter(torch.randn_like(net[0].weight))  # replaced
        assert torch.equal(fast(x), separate_bias_then_pool(net, x))
        net[0].bias = None  # removed: nothing is added after the pool
        assert torch.equal(fast(x), F.relu(F.max_pool2d(F.conv2d(x, net[0].weight), 2)))


def test_composes_with_pairwise_pools_and_channels_last() -> None:
    net = conv_pool(0.25)
    fast = pairwise_max_pool(bias_after_pool(net))
    assert isinstance(fast[1][0], PairwiseMaxPool2d) and isinstance(fast[1][1], PoolBias)
    x = torch.randn(8, 2, 12, 12).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(fast(x), separate_bias_then_pool(net, x))
        assert fast(x).is_contiguous(memory_format=torch.channels_last)
    assert isinstance(fast[0], ConvWithoutBias)


def test_smooth_certificates_and_settings() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.1307], [0.3081]), LeNet(1, 10)).eval()
    images = torch.rand(3, 1, 28, 28)
    smooth = Smooth(model, 10, 0.25, batch_size=300, pool_first=True, bias_after_pool=True)
    plain = Smooth(model, 10, 0.25, batch_size=300)
    assert smooth.settings["bias_after_pool"] and not plain.settings["bias_after_pool"]
    assert isinstance(smooth._model[1][0], ConvWithoutBias)  # the module Smooth evaluates
    ours = smooth.certify_batch(images, [0, 1, 2], 50, 600, 0.01)
    theirs = plain.certify_batch(images, [0, 1, 2], 50, 600, 0.01)
    assert [(c.prediction, c.radius) for c in ours] == [(c.prediction, c.radius) for c in theirs]
    with pytest.raises(SettingError, match="bias_after_pool"):
        Smooth(model, 10, 0.25, bias_after_pool="yes")


def test_the_certification_callback_passes_both_rewrites_to_smooth() -> None:
    from lightning.pytorch import LightningModule

    from callbacks import Certification

    module = LightningModule()
    module.model, module.num_classes, module.sigma = nn.Sequential(LeNet(1, 10)), 10, 0.25
    smooth = Certification(pool_first=True, bias_after_pool=True)._make_smooth(module)
    assert (smooth.pool_first, smooth.bias_after_pool) == (True, True)
    default = Certification()._make_smooth(module)  # CPU: channels-last, so ReLU after pooling
    assert (default.pool_first, default.bias_after_pool) == (True, False)
    with pytest.raises(SettingError, match="Certification bias_after_pool must be one of"):
        Certification(bias_after_pool="yes")
