"""ReLU after max-pooling computes the same function (robust.pool_first), and its users agree.

Oracles: the unrewritten module itself (equal logits, including NaN and infinities),
its input gradients, its parameters (shared, same names), the modules that must not be reordered
(average pooling, pooling with indices, a custom forward, a container with hooks), and the
certificates and PGD images of Smooth and the attacks against a wrapper the rewrite cannot see
into.
"""

from __future__ import annotations

import itertools
from copy import deepcopy

import pytest
import torch
from torch import nn

from lightning_modules.backbones import LeNet, Normalize, SmallCNN
from robust.attacks import pgd
from robust.pool_first import (
    children_replaced,
    pool_before_relu,
    sequential_replacements,
    swap_relu_pool,
)
from robust.smoothing import Smooth


class Opaque(nn.Module):
    """Calls its module in its own forward: the rewrite leaves it (and so the ReLU order) alone."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def classifier(backbone: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Normalize([0.1307], [0.3081]), backbone(1, 10)).eval()


@pytest.mark.parametrize("backbone", [LeNet, SmallCNN])
def test_same_logits_and_same_input_gradients(backbone) -> None:
    model = classifier(backbone)
    fast = pool_before_relu(model)
    kinds = [type(m).__name__ for m in fast.modules() if not list(m.children())]
    relu_then_pool = [type(m).__name__ for m in model.modules() if not list(m.children())]
    assert kinds != relu_then_pool and sorted(kinds) == sorted(relu_then_pool)
    x = torch.rand(64, 1, 28, 28) * 3 - 1
    x[0, 0, 3, 3], x[1, 0, 5, 5], x[2, 0, 7, 7] = float("nan"), float("inf"), -float("inf")
    with torch.no_grad():
        assert torch.equal(fast(x).nan_to_num(), model(x).nan_to_num())
        assert torch.equal(fast(x).isnan(), model(x).isnan())
    x = torch.rand(16, 1, 28, 28, requires_grad=True)
    (g_fast,) = torch.autograd.grad(fast(x).logsumexp(1).sum(), x)
    (g_model,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    torch.testing.assert_close(g_fast, g_model, rtol=1e-5, atol=1e-7)


def test_parameters_are_shared_under_the_same_names_and_modes_untouched() -> None:
    model = classifier(LeNet).train()
    model[1][7].eval()  # a mixed-mode module: the rewrite must not reset it
    fast = pool_before_relu(model)
    assert fast is not model and fast.training
    theirs, mine = dict(model.named_parameters()), dict(fast.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(mine[k] is theirs[k] for k in mine)
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert not model[1][7].training and model[1][0].training
    assert isinstance(model[1][1], nn.ReLU) and isinstance(model[1][2], nn.MaxPool2d)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2)
        ),  # ReLU and mean don't commute
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2, return_indices=True)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU()),  # already pool first
        # a window wholly in the padding: -inf after the pool, 0 after a ReLU that follows it
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2, 1, padding=1, dilation=5)),
        Opaque(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))),
    ],
)
def test_what_must_not_be_reordered_is_returned_as_is(model) -> None:
    assert pool_before_relu(model) is model


def test_every_small_max_pool_gives_the_models_values_reordered_or_not() -> None:
    """Padded and dilated pools have windows wholly in the padding: their -inf must stay."""
    x = torch.randn(2, 1, 6)
    for length, kernel, stride, dilation, ceil in itertools.product(
        range(1, 6), range(1, 4), (1, 2), (1, 2, 3), (False, True)
    ):
        for padding in range(kernel // 2 + 1):
            pool = nn.MaxPool1d(kernel, stride, padding, dilation, ceil_mode=ceil)
            model = nn.Sequential(nn.ReLU(), pool)
            try:
                expected = model(x[..., :length])
            except RuntimeError:  # the pool refuses this input length
                continue
            got = pool_before_relu(model)(x[..., :length])
            assert torch.equal(got, expected), (length, kernel, stride, padding, dilation, ceil)


def small() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))


def test_custom_forward_subclasses_and_hooks_are_respected() -> None:
    class Reversed(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * -1

    class Leaky(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.leaky_relu(x, 0.1)

    custom = Reversed(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
    assert pool_before_relu(custom) is custom
    leaky = nn.Sequential(nn.Conv2d(1, 2, 3), Leaky(), nn.MaxPool2d(2))
    assert pool_before_relu(leaky) is leaky
    negate = lambda module, inputs, output: -output  # noqa: E731 - does not commute with max
    for hooked_module in (0, 1, 2):  # the container, the ReLU, the pool
        model = small()
        (model if hooked_module == 0 else model[hooked_module]).register_forward_hook(negate)
        assert pool_before_relu(model) is model
    model = small()
    model.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    assert pool_before_relu(model) is model
    # the control: a plain one is rewritten, pooling first
    plain = small()
    fast = pool_before_relu(plain)
    assert fast is not plain and [type(m) for m in fast][1:] == [nn.MaxPool2d, nn.ReLU]


def test_sequential_subclasses_with_state_of_their_own_are_left_alone() -> None:
    class Scaled(nn.Sequential):
        def __init__(self) -> None:
            super().__init__(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
            self.scale = nn.Parameter(torch.ones(()))  # would be dropped by a plain copy
            self.register_buffer("count", torch.zeros(()))

    model = Scaled()
    assert pool_before_relu(model) is model
    assert type(pool_before_relu(LeNet(1, 10))) is nn.Sequential  # the control: no own state


def test_smooth_certificates_equal_those_of_the_relu_first_model() -> None:
    model = classifier(LeNet)
    images = torch.rand(3, 1, 28, 28)
    smooth = Smooth(model, 10, 0.25, batch_size=300, pool_first=True)
    assert smooth.settings["pool_first"] and not Smooth(model, 10, 0.25).pool_first
    ours = smooth.certify_batch(images, [0, 1, 2], 50, 600, 0.01)
    plain = Smooth(Opaque(model), 10, 0.25, batch_size=300).certify_batch(
        images, [0, 1, 2], 50, 600, 0.01
    )
    assert [(c.prediction, c.radius) for c in ours] == [(c.prediction, c.radius) for c in plain]


def test_smooth_follows_a_module_swapped_after_construction() -> None:
    model = classifier(LeNet)
    smooth = Smooth(model, 10, 0.25, batch_size=200, pool_first=True)
    images = torch.rand(2, 1, 28, 28)
    before = [c.prediction for c in smooth.certify_batch(images, [0, 1], 20, 200, 0.01)]
    last = nn.Linear(500, 10)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.arange(10.0))  # always class 9
    model[1][9] = last
    after = [c.prediction for c in smooth.certify_batch(images, [0, 1], 20, 200, 0.01)]
    assert after == [9, 9] and before != after


@pytest.mark.parametrize("channels_last", [False, True])
def test_smooth_follows_hooks_and_parameterless_modules_changed_later(channels_last) -> None:
    model = classifier(LeNet)
    smooth = Smooth(model, 10, 0.25, batch_size=200, channels_last=channels_last, pool_first=True)
    images = torch.rand(2, 1, 28, 28)

    def predictions() -> list[int]:
        return [c.prediction for c in smooth.certify_batch(images, [0, 1], 20, 200, 0.01)]

    def class_nine(module, inputs, output):
        return torch.arange(10.0).expand_as(output)

    before = predictions()
    handle = model[1][9].register_forward_hook(class_nine)
    assert predictions() == [9, 9] != before
    handle.remove()
    assert predictions() == before
    model[1][8] = nn.Tanh()  # no parameters: only the structure tells the copy is stale
    changed = classifier(LeNet)
    changed[1][8] = nn.Tanh()
    expected = Smooth(changed, 10, 0.25, batch_size=200)
    want = [(c.prediction, c.radius) for c in expected.certify_batch(images, [0, 1], 20, 200, 0.01)]
    got = [(c.prediction, c.radius) for c in smooth.certify_batch(images, [0, 1], 20, 200, 0.01)]
    assert got == want


def disguised(model: nn.Module, kind: type[nn.Module]) -> nn.Module:
    """A deep copy whose ``kind`` modules are a trivial subclass, which no rewrite touches."""
    copy = deepcopy(model)
    subclass = type(f"Disguised{kind.__name__}", (kind,), {})
    for module in copy.modules():
        if type(module) is kind:
            module.__class__ = subclass
    return copy


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("wrapped", [False, True])
def test_pgd_images_equal_those_on_the_relu_first_model(channels_last, wrapped) -> None:
    model = classifier(LeNet)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    attacked = Declared(model) if wrapped else model  # the attacks also reach a held network
    ours = pgd(
        attacked, x, y, 0.3, "inf", steps=5, generator=generators, channels_last=channels_last
    )
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    plain = pgd(
        disguised(model, nn.ReLU),
        x,
        y,
        0.3,
        "inf",
        steps=5,
        generator=generators,
        channels_last=channels_last,
    )
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)


class Declared(Opaque):
    """Calls its sequential whole, and says so: the attacks may swap a rewritten copy in."""

    whole_sequentials = ("inner",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_network_inside_another_module_is_swapped_in_for_the_call_only() -> None:
    model = classifier(LeNet)
    holder = Declared(model)
    assert pool_before_relu(holder) is holder  # a module with its own forward: not copied
    replacements = sequential_replacements(holder, swap_relu_pool)
    assert [(h, name) for h, name, _ in replacements] == [(holder, "inner")]
    x = torch.randn(4, 1, 28, 28)
    want = holder(x)
    with children_replaced(replacements):
        assert [type(m) for m in holder.inner[1]][:3] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU]
        torch.testing.assert_close(holder(x), want, rtol=0, atol=0)
        theirs = dict(model.named_parameters())
        mine = dict(holder.inner.named_parameters())
        assert mine.keys() == theirs.keys() and all(mine[k] is theirs[k] for k in mine)
    assert holder.inner is model  # restored
    with pytest.raises(RuntimeError), children_replaced(replacements):
        raise RuntimeError  # restored on errors too
    assert holder.inner is model


class Slicing(Declared):
    """Its own forward uses part of the sequential: conv and ReLU, then a square root."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner[:2](x).sqrt().flatten(1)[:, :10]


def test_only_modules_that_declare_calling_their_network_whole_are_swapped_into() -> None:
    network = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
    assert sequential_replacements(Opaque(network), swap_relu_pool) == []  # undeclared
    assert sequential_replacements(Slicing(network), swap_relu_pool) == []  # forward overridden
    assert sequential_replacements(Declared(torch.compile(network)), swap_relu_pool) == []
    # the reviewer's case: swapped in, the slice would be conv then max-pool, with no ReLU
    x, y = torch.randn(3, 1, 8, 8), torch.arange(3)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    adv = pgd(Slicing(network), x, y, 0.1, "inf", steps=2, generator=generators, channels_last=True)
    assert torch.isfinite(Slicing(network)(adv)).all()


def test_the_attacks_reach_the_network_of_a_lightning_module() -> None:
    from lightning_modules.standard import StandardClassifier
    from robust._attack_core import Forward

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
    assert seen == [[nn.Conv2d, nn.MaxPool2d, nn.ReLU]]  # pool first during the call
    assert module.model is network and type(network[1][1]) is nn.ReLU  # restored after
    assert Forward(module, channels_last=False).replacements == []
