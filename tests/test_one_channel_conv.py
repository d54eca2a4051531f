"""One-channel convolutions with the transposed-convolution input gradient (robust.one_channel_conv).

Oracles: ``nn.Conv2d`` itself (outputs bit-equal; input, weight and bias gradients in float64 to
1e-12, over strides, paddings, dilations and sizes the stride does not divide), the modules that
must be left alone, and the attacks' images on the unrewritten network.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.backbones import LeNet, Normalize, SmallCNN
from lightning_modules.standard import StandardClassifier
from robust._attack_core import Forward
from robust.attacks import pgd
from robust.one_channel_conv import OneChannelConv2d, is_rewritable, one_channel_convs_transposed


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"kernel_size": 5}, (28, 28)),
        ({"kernel_size": 3, "stride": 2}, (10, 9)),  # the stride skips the last row: output padding
        ({"kernel_size": (3, 2), "stride": (2, 3), "padding": (1, 2)}, (11, 13)),
        ({"kernel_size": 3, "dilation": 2, "padding": 2, "bias": False}, (9, 9)),
    ],
)
def test_output_and_every_gradient_equal_those_of_conv2d(kwargs, size) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, **kwargs).double()
    fast = OneChannelConv2d(conv)
    x = torch.rand(3, 1, *size, dtype=torch.float64, requires_grad=True)
    out_conv, out_fast = conv(x), fast(x)
    assert torch.equal(out_conv, out_fast)
    weights = torch.randn_like(out_conv)  # a loss whose gradient differs per output
    params = [x, *conv.parameters()]
    want = torch.autograd.grad((out_conv * weights).sum(), params)
    got = torch.autograd.grad((out_fast * weights).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_input_gradient_alone_needs_no_parameter_gradients() -> None:
    conv = nn.Conv2d(1, 3, 3)
    fast = OneChannelConv2d(conv).requires_grad_(False)
    x = torch.rand(2, 1, 7, 7, requires_grad=True)
    (grad,) = torch.autograd.grad(fast(x).square().sum(), x)
    (want,) = torch.autograd.grad(conv(x).square().sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    assert conv.weight.grad is None


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3),  # several channels: autograd's own path is as fast
        nn.Conv2d(2, 2, 3, groups=2),
        nn.Conv2d(1, 4, 3, padding="same"),
        nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"),
        type("Sub", (nn.Conv2d,), {})(1, 4, 3),  # a subclass may compute something else
    ],
)
def test_what_must_not_be_rewritten_is_left_alone(conv) -> None:
    assert not is_rewritable(conv)
    model = nn.Sequential(conv, nn.ReLU())
    assert one_channel_convs_transposed(model) is model
    with pytest.raises(ValueError, match="one-channel"):
        OneChannelConv2d(conv)


def test_hooked_convolutions_are_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3))
    model[0].register_forward_hook(lambda module, inputs, output: -output)
    assert one_channel_convs_transposed(model) is model


def test_lenet_rewritten_shares_parameters_and_computes_the_same() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.1307], [0.3081]), LeNet(1, 10)).eval()
    fast = one_channel_convs_transposed(model)
    assert isinstance(fast[1][0], OneChannelConv2d) and type(fast[1][3]) is nn.Conv2d
    theirs, mine = dict(model.named_parameters()), dict(fast.named_parameters())
    assert mine.keys() == theirs.keys() and all(mine[k] is theirs[k] for k in mine)
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(fast(x), model(x))
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert torch.equal(torch.func.functional_call(fast, weights, (x,)), model(x))


def test_the_attacks_reach_the_network_of_a_lightning_module() -> None:
    module = StandardClassifier(LeNet)
    network = module.model
    forward = Forward(module, channels_last=True)
    assert forward.model is module  # the module itself runs, with its network swapped in
    seen = []
    hook = module.register_forward_hook(
        lambda m, inputs, output: seen.append([type(layer) for layer in m.model[1]][:3])
    )
    forward(torch.rand(2, 1, 28, 28))
    hook.remove()
    assert seen == [[OneChannelConv2d, nn.MaxPool2d, nn.ReLU]]  # both rewrites
    assert module.model is network and type(network[1][0]) is nn.Conv2d  # restored
    assert Forward(module, channels_last=False).replacements == []


@pytest.mark.parametrize("backbone", [LeNet, SmallCNN])
@pytest.mark.parametrize("norm, eps", [("inf", 0.3), ("2", 2.0)])
def test_pgd_images_agree_with_the_unrewritten_network(backbone, norm, eps) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.1307], [0.3081]), backbone(1, 10)).eval()
    opaque = nn.Sequential(Normalize([0.1307], [0.3081]), backbone(1, 10)).eval()
    opaque.load_state_dict(model.state_dict())
    for module in opaque.modules():  # a subclass: the rewrite leaves its convolutions alone
        if type(module) is nn.Conv2d:
            module.__class__ = type("Disguised", (nn.Conv2d,), {})
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10

    def run(net: nn.Module) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(i) for i in range(16)]
        return pgd(net, x, y, eps, norm, steps=10, generator=generators, channels_last=True)

    ours, plain = run(model), run(opaque)
    # the same attack up to float rounding of the input gradient
    close = (ours - plain).flatten(1).norm(dim=1) < 1e-3
    assert close.float().mean() >= 0.9
