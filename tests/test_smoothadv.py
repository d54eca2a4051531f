"""SmoothAdv (robust/smoothadv.py): PGD against the soft smoothed classifier.

Oracles: a linear binary classifier, whose smoothed probability of class 1 is known exactly,
Phi((w.x + b) / (sigma ||w||)), and whose soft smoothed loss has its gradient along w for every
noise draw, so the optimal L2 perturbation is -eps w / ||w|| (true class 1) or +eps w / ||w||
(class 0); with one noise sample the attack is the project's L2 PGD on the shifted model
(an independent implementation); and the invariants: the eps-ball, [0, 1], a lower smoothed
probability of the true class under fresh noise, per-image generators (results independent of the
batch), inference mode, refused settings.
"""

import math

import pytest
import torch
from scipy.stats import norm as normal
from torch import nn

from robust.attacks import pgd
from robust.checks import SettingError
from robust.smoothadv import gaussian_noise, smoothadv_attack, soft_smoothed_log_prob

SIGMA = 0.25


class Linear2(nn.Module):
    """Two logits (0, T (w.x + b)): class 1 iff w.x + b > 0."""

    def __init__(self, d: int = 16, temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, generator=g))
        self.b = nn.Parameter(torch.tensor(0.3))
        self.temperature = temperature

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.temperature * self.margin(x)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def interior(n: int, shape=(1, 4, 4), seed: int = 1) -> torch.Tensor:
    """Images in [0.4, 0.6]: a perturbation of L2 norm 0.1 is never clipped."""
    g = torch.Generator().manual_seed(seed)
    return 0.4 + 0.2 * torch.rand(n, *shape, generator=g)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4)
    )


@pytest.mark.parametrize("steps", [1, 5])
def test_linear_oracle_direction_and_minimal_margin(steps):
    model = Linear2()
    x = interior(8)
    y = torch.tensor([1, 0] * 4)
    eps = 0.1
    step_size = eps if steps == 1 else None
    x_adv = smoothadv_attack(
        model, x, y, sigma=SIGMA, eps=eps, steps=steps, num_noise_samples=4, step_size=step_size
    )
    w = model.w.detach()
    unit = w / w.norm()
    delta = (x_adv - x).flatten(1)
    sign = torch.where(y == 1, -1.0, 1.0)  # class 1: lower the margin; class 0: raise it
    cos = (delta @ unit) / delta.norm(dim=1)
    torch.testing.assert_close(cos, sign, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta.norm(dim=1), torch.full((8,), eps), atol=1e-6, rtol=0)
    with torch.no_grad():
        m_clean, m_adv = model.margin(x), model.margin(x_adv)
    # the margin moved by the analytic optimum eps ||w|| against the true class ...
    torch.testing.assert_close(m_adv, m_clean + sign * eps * w.norm(), atol=1e-5, rtol=0)
    # ... so the exact smoothed probability of the true class reached its minimum over the ball
    p1 = normal.cdf((m_adv / (SIGMA * w.norm())).numpy())
    p1_min = normal.cdf(((m_clean - eps * w.norm()) / (SIGMA * w.norm())).numpy())
    p1_max = normal.cdf(((m_clean + eps * w.norm()) / (SIGMA * w.norm())).numpy())
    p_true = torch.where(y == 1, torch.tensor(p1), 1 - torch.tensor(p1))
    p_true_min = torch.where(y == 1, torch.tensor(p1_min), 1 - torch.tensor(p1_max))
    torch.testing.assert_close(p_true, p_true_min, atol=1e-6, rtol=0)


def test_soft_smoothed_probability_of_a_sharp_linear_classifier_is_phi():
    model = Linear2(temperature=1e3)  # softmax ~ hard decision: soft smoothed p ~ Phi(...)
    x = interior(6)
    y = torch.ones(6, dtype=torch.long)
    noise = gaussian_noise(x, SIGMA, 20_000, torch.Generator().manual_seed(5))
    with torch.no_grad():
        estimate = soft_smoothed_log_prob(model, x, y, noise).exp()
        exact = normal.cdf((model.margin(x) / (SIGMA * model.w.norm())).numpy())
    # 20,000 samples: standard error <= 0.0036
    torch.testing.assert_close(
        estimate, torch.tensor(exact, dtype=torch.float32), atol=0.015, rtol=0
    )
    assert 0.05 < exact.min() and exact.max() < 0.95  # a non-trivial check


def test_one_noise_sample_is_l2_pgd_on_the_shifted_model():
    model = small_net().eval()
    x = interior(5, (1, 8, 8), seed=2)  # never clipped: the order of clip and projection is moot
    y = torch.tensor([0, 1, 2, 3, 0])
    noise = gaussian_noise(x, SIGMA, 1, torch.Generator().manual_seed(3))
    ours = smoothadv_attack(
        model, x, y, sigma=SIGMA, eps=0.5, steps=4, num_noise_samples=1, noise=noise
    )
    reference = pgd(
        lambda v: model(v + noise[0]), x, y, 0.5, "2", steps=4, step_size=0.25, random_start=False
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def authors_smoothadv(model, x, y, noise, eps, steps):
    """Salman et al.'s ``PGD_L2._attack_mutlinoise`` in float64: step, clamp to [0, 1], renorm."""
    x, noise, delta = x.double(), noise.double(), torch.zeros_like(x, dtype=torch.float64)
    for _ in range(steps):
        delta.requires_grad_(True)
        copies = (x + delta).unsqueeze(0) + noise
        probs = model(copies.flatten(0, 1)).softmax(1).view(len(noise), len(x), -1).mean(0)
        (grad,) = torch.autograd.grad(nn.functional.nll_loss(probs.log(), y), delta)
        with torch.no_grad():
            delta = delta + 2 * eps / steps * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = (delta + x).clamp(0, 1) - x
            delta = delta.renorm(p=2, dim=0, maxnorm=eps)
    return (x + delta).float()


def test_steps_are_clipped_then_scaled_into_the_ball_as_in_the_authors_code():
    """The reverse order (project, then clip) spent part of the radius on pixels at 0 or 1."""
    model = small_net().eval()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    x = torch.where(x < 0.3, 0.0, torch.where(x > 0.7, 1.0, x))  # MNIST-like: many 0s and 1s
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    noise = gaussian_noise(x, SIGMA, 4, torch.Generator().manual_seed(6))
    ours = smoothadv_attack(
        model, x, y, sigma=SIGMA, eps=1.0, steps=2, num_noise_samples=4, noise=noise
    )
    authors = authors_smoothadv(model.double(), x, y, noise, eps=1.0, steps=2)
    torch.testing.assert_close(ours, authors, atol=1e-5, rtol=0)
    one_copy = pgd(  # the evaluation attacks' order, on the first noise draw: not the authors'
        lambda v: model.float()(v + noise[0]), x, y, 1.0, "2", steps=2, step_size=1.0
    )
    alone = authors_smoothadv(model.double(), x, y, noise[:1], eps=1.0, steps=2)
    assert (one_copy - alone).abs().max() > 1e-2


def test_attack_lowers_the_smoothed_probability_under_fresh_noise_and_stays_in_bounds():
    model = small_net()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model.eval()(x).argmax(dim=1)  # the model's own labels: p_y is not already tiny
    model.train()
    eps = 1.0
    x_adv = smoothadv_attack(model, x, y, sigma=SIGMA, eps=eps, steps=5, num_noise_samples=4)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
    fresh = gaussian_noise(x, SIGMA, 512, torch.Generator().manual_seed(9))
    with torch.no_grad():
        model.eval()
        before = soft_smoothed_log_prob(model, x, y, fresh).exp()
        after = soft_smoothed_log_prob(model, x_adv, y, fresh).exp()
    assert (after < before).float().mean() >= 0.9
    assert after.mean() < 0.9 * before.mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_images_stay_inside_the_ball(dtype):
    # x + delta rounds to the dtype; the attack moves rounded-out coordinates back, so the L2
    # bound holds exactly (in float64), as the smoothed-attack evaluation claims
    model = small_net().to(dtype)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        y = model.eval()(x).argmax(dim=1)
    eps = 0.3  # uncorrected, 13 of these 64 images ended up to 0.003 (bf16) outside
    x_adv = smoothadv_attack(model, x, y, sigma=SIGMA, eps=eps, steps=5, num_noise_samples=4)
    dist = (x_adv.double() - x.double()).flatten(1).norm(dim=1)
    assert x_adv.dtype == dtype and (dist <= eps).all()
    assert dist.max() >= eps * (1 - 1e-3)  # on the boundary, not pulled in further


def test_per_image_generators_make_results_independent_of_the_batch():
    model = small_net().eval()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 1, 2, 3, 0, 1])

    def run(idx):
        gens = [torch.Generator().manual_seed(1000 + i) for i in idx]
        return smoothadv_attack(
            model,
            x[idx],
            y[idx],
            sigma=SIGMA,
            eps=0.5,
            steps=3,
            num_noise_samples=3,
            generator=gens,
        )

    full = run(list(range(6)))
    for i in range(6):
        torch.testing.assert_close(run([i])[0], full[i], atol=1e-5, rtol=0)
    order = [5, 3, 1, 0, 2, 4]
    torch.testing.assert_close(run(order), full[order], atol=1e-5, rtol=0)


def test_inference_mode_modes_restored_no_parameter_gradients():
    model = small_net().train()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 1, 2, 3])
    kwargs = {"sigma": SIGMA, "eps": 0.5, "steps": 2, "num_noise_samples": 2}
    expected = smoothadv_attack(
        model, x, y, generator=[torch.Generator().manual_seed(i) for i in range(4)], **kwargs
    )
    with torch.inference_mode():
        inside = smoothadv_attack(
            model,
            x.clone(),
            y.clone(),
            generator=[torch.Generator().manual_seed(i) for i in range(4)],
            **kwargs,
        )
    torch.testing.assert_close(inside, expected)
    assert not torch.equal(expected, x)
    assert model.training and model[3].training
    assert all(p.grad is None for p in model.parameters())
    assert not expected.requires_grad


def test_eps_zero_returns_the_images():
    x = torch.rand(2, 1, 8, 8)
    out = smoothadv_attack(
        small_net(), x, torch.tensor([0, 1]), sigma=SIGMA, eps=0.0, steps=1, num_noise_samples=1
    )
    assert torch.equal(out, x)


def test_soft_smoothed_log_prob_is_the_log_mean_of_softmaxes():
    model = small_net().eval()
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([1, 2, 3])
    noise = gaussian_noise(x, SIGMA, 5)
    with torch.no_grad():
        got = soft_smoothed_log_prob(model, x, y, noise)
        probs = torch.stack([model(x + noise[i]).softmax(1) for i in range(5)]).mean(0)
    torch.testing.assert_close(got, probs[torch.arange(3), y].log(), atol=1e-6, rtol=1e-5)
    assert math.isfinite(got.sum().item())


def test_the_gradient_on_a_confidently_classified_image_keeps_its_true_class_term():
    # log_softmax's gradient lost its y entry 1 - p_y once p_y rounded to 1 in float32: the
    # direction was wrong (cosine 0.68 to the float64 gradient) or zero, so the attack did not move
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)
    with torch.no_grad():  # class 0 ahead by about 23 logits: 1 - p_y near 1e-10, rounded away
        model[1].weight.normal_(0, 0.2)
        model[1].bias.copy_(torch.tensor([23.0, 0.0, 0.0, 0.0]))
    noise = gaussian_noise(x, 0.05, 4, generator=torch.Generator().manual_seed(1))
    grads = []
    for dtype in (torch.float32, torch.float64):
        net = model.to(dtype)
        images = x.to(dtype).detach().requires_grad_(True)
        soft_smoothed_log_prob(net, images, y, noise.to(dtype)).sum().backward()
        grads.append(images.grad.flatten(1).double())
    with torch.no_grad():
        p_y = soft_smoothed_log_prob(model.double(), x.double(), y, noise.double()).exp()
    confident = 1 - p_y
    assert (confident < 2e-9).all() and (confident > 0).all()
    unit = [g / g.norm(dim=1, keepdim=True) for g in grads]  # norms near 1e-9: no eps clamp
    cosine = (unit[0] * unit[1]).sum(dim=1)
    assert (cosine > 0.9999).all(), cosine


BASE = {"sigma": SIGMA, "eps": 0.5, "steps": 2, "num_noise_samples": 2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sigma": 0.0}, "sigma must be a number > 0"),
        ({"eps": -0.5}, "eps must be a number >= 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"num_noise_samples": 0}, "num_noise_samples must be an integer >= 1"),
        ({"step_size": -1.0}, "step_size must be a number > 0"),
        ({"noise": torch.zeros(3, 2, 1, 8, 8)}, r"noise must have shape \(num_noise_samples"),
        (
            {"noise": torch.zeros(2, 2, 1, 8, 8), "generator": torch.Generator()},
            "noise or a generator",
        ),
    ],
)
def test_bad_settings_are_refused(change, message):
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(SettingError, match=message):
        smoothadv_attack(small_net(), x, y, **{**BASE, **change})
