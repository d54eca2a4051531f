"""TRADES (robust/trades.py): the KL inner maximization and the surrogate loss.

Oracles: the authors' formulation of the loss (``nn.KLDivLoss(reduction="sum")`` of the perturbed
log-softmax against the clean softmax, divided by the batch size), the eps-ball and [0, 1]
invariants, KL growth over a random point of the ball, per-sample generators (results independent
of the batch), inference mode, and refused settings.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust.checks import SettingError
from robust.trades import START_STD, kl_divergence, trades_loss, trades_perturb


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 5)
    )


def images(n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g)


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "2" else flat.abs().amax(dim=1)


def random_in_ball(x, eps, norm, seed=3):
    g = torch.Generator().manual_seed(seed)
    if norm == "inf":
        return (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    d = torch.randn(x.shape, generator=g)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    return (x + d).clamp(0, 1)


@pytest.mark.parametrize(("norm", "eps"), [("inf", 0.1), ("2", 1.0)])
def test_inner_maximization_raises_the_kl_and_stays_in_the_ball(norm, eps):
    model = mlp().eval()
    x = images()
    x_adv = trades_perturb(model, x, eps=eps, norm=norm, steps=10)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (norms(x_adv - x, norm) <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        clean = model(x)
        kl_adv = kl_divergence(clean, model(x_adv))
        kl_rand = kl_divergence(clean, model(random_in_ball(x, eps, norm)))
        kl_one = kl_divergence(clean, model(trades_perturb(model, x, eps=eps, norm=norm, steps=1)))
    # ascending the KL beats a random point of the same ball, image by image, and more steps help
    assert (kl_adv > kl_rand).all()
    assert kl_adv.mean() > 1.2 * kl_one.mean()
    # the steps reach the boundary (the KL grows outwards on this smooth model)
    assert norms(x_adv - x, norm).mean() > 0.9 * eps


def authors_l2_steps(model, x, start, eps, steps):
    """Zhang et al.'s L2 loop (yaodongyu/TRADES) in float64: step, clamp to [0, 1], renorm."""
    x, delta = x.double(), (start - x).double()
    with torch.no_grad():
        clean = model(x).softmax(1)
    for _ in range(steps):
        delta.requires_grad_(True)
        kl = nn.KLDivLoss(reduction="sum")(model(x + delta).log_softmax(1), clean)
        (grad,) = torch.autograd.grad(kl, delta)
        with torch.no_grad():
            delta = delta + 2.5 * eps / steps * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = (delta + x).clamp(0, 1) - x
            delta = delta.renorm(p=2, dim=0, maxnorm=eps)
    return x + delta


def test_l2_steps_are_clipped_then_scaled_into_the_ball_as_in_the_authors_code():
    """Projecting first, then clipping, spent part of the radius on pixels at 0 or 1."""
    model = mlp().eval().double()  # float64: the KL's gradient near x' = x cancels in float32
    x = images().double()
    x = torch.where(x < 0.3, 0.0, torch.where(x > 0.7, 1.0, x))  # MNIST-like: many 0s and 1s
    generator = torch.Generator().manual_seed(7)
    ours = trades_perturb(model, x, eps=1.0, norm="2", steps=3, generator=generator)
    xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    authors = authors_l2_steps(model, x, (x + START_STD * xi).clamp(0, 1), eps=1.0, steps=3)
    torch.testing.assert_close(ours, authors.double(), atol=1e-6, rtol=0)
    assert norms(ours - x, "2").min() > 0.999  # the whole radius used, clipped pixels or not


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("norm", "eps"), [("inf", 0.3), ("2", 1.1)])
def test_low_precision_steps_stay_inside_the_ball(dtype, norm, eps):
    # x + eps and the L2 projection round to the dtype (bf16-true training): moved back inside
    model = mlp().eval().to(dtype)
    x = images().to(dtype)
    x_adv = trades_perturb(model, x, eps=eps, norm=norm, steps=10)
    assert x_adv.dtype == dtype and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (norms(x_adv.double() - x.double(), norm) <= eps).all()  # exactly, in float64


def test_loss_with_beta_zero_is_the_cross_entropy_and_otherwise_the_authors_formula():
    g = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    y = torch.randint(0, 5, (8,), generator=g)
    loss, ce, kl = trades_loss(clean, adv, y, beta=0.0)
    assert ce.item() == pytest.approx(F.cross_entropy(clean, y).item(), rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(clean, y).item(), rel=1e-6)
    assert kl.item() > 0.1  # the KL term is really there, just weighted by 0
    # the authors' code: CE + beta * KLDivLoss(sum)(log_softmax(adv), softmax(clean)) / batch
    authors = nn.KLDivLoss(reduction="sum")(adv.log_softmax(1), clean.softmax(1)) / 8
    loss6, _, kl6 = trades_loss(clean, adv, y, beta=6.0)
    assert kl6.item() == pytest.approx(authors.item(), rel=1e-5)
    assert loss6.item() == pytest.approx(
        (F.cross_entropy(clean, y) + 6.0 * authors).item(), rel=1e-5
    )
    # gradients reach both the clean and the perturbed logits (the clean one is not detached)
    clean.requires_grad_(True)
    adv.requires_grad_(True)
    trades_loss(clean, adv, y, beta=6.0)[0].backward()
    assert clean.grad.abs().sum() > 0 and adv.grad.abs().sum() > 0


def test_per_sample_generators_make_results_independent_of_the_batch():
    model = mlp().eval()
    x = images(6)

    def run(idx):
        gens = [torch.Generator().manual_seed(100 + i) for i in idx]
        return trades_perturb(model, x[idx], eps=0.1, norm="inf", steps=3, generator=gens)

    full = run(list(range(6)))
    for i in range(6):
        torch.testing.assert_close(run([i])[0], full[i], atol=1e-6, rtol=0)
    order = [4, 1, 5, 0, 3, 2]
    torch.testing.assert_close(run(order), full[order], atol=1e-6, rtol=0)


def test_inference_mode_modes_restored_and_no_parameter_gradients():
    model = mlp().train()
    x = images(4)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    expected = trades_perturb(model, x, eps=0.2, norm="2", steps=2, generator=gens)
    with torch.inference_mode():
        inside = trades_perturb(
            model,
            x.clone(),
            eps=0.2,
            norm="2",
            steps=2,
            generator=[torch.Generator().manual_seed(i) for i in range(4)],
        )
    torch.testing.assert_close(inside, expected)  # eval mode: no dropout, so deterministic
    assert model.training and model[3].training
    assert all(p.grad is None for p in model.parameters())
    assert not expected.requires_grad


def test_a_flat_model_steps_along_a_random_direction_inside_the_ball():
    class Flat(nn.Module):  # its output does not depend on the input: zero KL gradient
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.bias.expand(len(x), 3) + 0 * x.flatten(1)[:, :1]

    x = 0.5 * torch.ones(3, 1, 4, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x_adv = trades_perturb(Flat(), x, eps=0.1, norm="inf", steps=2, start_std=0.0, generator=gens)
    # it moved (a step of 2.5 * 0.1 / 2 along a random sign vector reaches the box's faces)
    assert (x_adv - x).abs().amax() == pytest.approx(0.1)
    assert ((x_adv - x).abs() <= 0.1 + 1e-7).all()


def test_eps_zero_returns_the_images():
    x = images(3)
    assert torch.equal(trades_perturb(mlp(), x, eps=0.0), x)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eps": -0.1}, "eps must be a number >= 0"),
        ({"eps": 0.1, "steps": 0}, "steps must be an integer >= 1"),
        ({"eps": 0.1, "step_size": 0.0}, "step_size must be a number > 0"),
        ({"eps": 0.1, "norm": "l1"}, "norm must be one of"),
        ({"eps": 0.1, "start_std": -1.0}, "start_std must be a number >= 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, name):
    with pytest.raises(SettingError, match=name):
        trades_perturb(mlp(), images(2), **kwargs)


def test_negative_beta_is_refused():
    logits = torch.zeros(2, 3)
    with pytest.raises(SettingError, match="TRADES beta must be a number >= 0; got -1"):
        trades_loss(logits, logits, torch.tensor([0, 1]), beta=-1)
