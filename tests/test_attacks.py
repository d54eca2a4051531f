"""Tests for robust.attacks: invariants, analytic oracles, peer libraries, framework behaviour."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from robust._attack_core import into_ball
from robust.attacks import (
    METHODS,
    AttackSpec,
    apgd,
    apgd_t,
    attack,
    autoattack,
    fgm,
    pgd,
    square,
)
from robust.checks import SettingError
from tests.tiny_models import batch, distance, generators, linear, small_cnn

EPS = {"inf": 0.1, "2": 1.0}


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x).float(), y, reduction="none")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def l2(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).norm(dim=1)


def linf(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).abs().amax(dim=1)


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained to ~100% on 300 separable synthetic 1x8x8 images (3 classes)."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(3, 1, 8, 8, generator=g).sign()
    y = torch.arange(300) % 3
    x = (0.5 + 0.15 * patterns[y] + 0.1 * torch.randn(300, 1, 8, 8, generator=g)).clamp(0, 1)
    model = small_cnn(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert accuracy(model, x, y) > 0.95
    return model, x[:96], y[:96]


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize(
    "kind", ["fgm", "fgm_rand", "fgm_bigstep", "pgd", "pgd_norand", "pgd_restarts", "pgd_targeted"]
)
def test_bounds_and_output(kind, norm):
    model = small_cnn(3)
    x, y = batch(16, 3)
    eps = EPS[norm]
    g = torch.Generator().manual_seed(0)
    if kind.startswith("fgm"):
        step = 3 * eps if kind == "fgm_bigstep" else None  # the projection must act
        adv = fgm(
            model, x, y, eps, norm, step_size=step, random_start=kind == "fgm_rand", generator=g
        )
    else:
        adv = pgd(
            model,
            x,
            y,
            eps,
            norm,
            steps=5,
            random_start=kind != "pgd_norand",
            restarts=3 if kind == "pgd_restarts" else 1,
            targeted=kind == "pgd_targeted",
            generator=g,
        )
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    dist = (linf if norm == "inf" else l2)(adv - x)
    assert (dist <= eps + 1e-5).all()
    assert dist.max() > 0.5 * eps  # the attack actually moved (the bound is not vacuous)


def test_loss_increases_per_sample_on_linear_model():
    # CE of a linear model is convex in x and a clipped FGM step has a non-negative inner product
    # with the gradient, so every sample's loss must not decrease.
    model = linear(64, 3, dtype=torch.float32)
    x, y = batch(64, 3)
    before = per_sample_loss(model, x, y)
    for norm in ("inf", "2"):
        after = per_sample_loss(model, fgm(model, x, y, EPS[norm], norm), y)
        assert (after >= before - 1e-6).all()
        assert (after > before + 1e-3).float().mean() > 0.9


def test_attacks_increase_loss_and_pgd_beats_fgm(trained):
    model, x, y = trained
    before = per_sample_loss(model, x, y).mean()
    for norm, eps in (("inf", 0.07), ("2", 0.6)):
        x_fgm = fgm(model, x, y, eps, norm)
        x_pgd = pgd(model, x, y, eps, norm, steps=10, generator=torch.Generator().manual_seed(0))
        assert per_sample_loss(model, x_fgm, y).mean() > before
        assert per_sample_loss(model, x_pgd, y).mean() > before
        acc_clean, acc_fgm, acc_pgd = (accuracy(model, v, y) for v in (x, x_fgm, x_pgd))
        assert acc_pgd < acc_fgm < acc_clean


class Flat(nn.Module):
    """Three constant logits with a zero input gradient: PGD's steps are zero, only its start moves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.0 * x.flatten(1)[:, :3]


def test_random_start_uniform_in_ball():
    g = torch.Generator().manual_seed(0)
    x = torch.full((4000, 1, 1, 3), 0.5)
    y = torch.zeros(4000, dtype=torch.long)
    d = pgd(Flat(), x, y, 0.2, "inf", steps=1, generator=g) - x
    assert d.abs().max() <= 0.2 + 1e-7
    # Each coordinate ~ U[-eps, eps].
    assert stats.kstest(d.flatten().numpy(), stats.uniform(-0.2, 0.4).cdf).pvalue > 1e-3
    d = pgd(Flat(), x, y, 0.2, "2", steps=1, generator=g) - x
    r = l2(d).double()
    assert r.max() <= 0.2 * (1 + 1e-6)
    # Uniform in the ball <=> (r / eps)^d ~ U[0, 1] and the direction is isotropic.
    assert stats.kstest(((r / 0.2) ** 3).numpy(), "uniform").pvalue > 1e-3
    assert (d.flatten(1) / r[:, None].float()).mean(0).abs().max() < 0.05


def test_restarts_never_weaker_than_one_run(trained):
    model, x, y = trained
    eps = 0.06
    runs = {
        r: pgd(
            model, x, y, eps, "inf", steps=3, restarts=r, generator=torch.Generator().manual_seed(7)
        )
        for r in (1, 6)
    }
    loss = {r: per_sample_loss(model, v, y) for r, v in runs.items()}
    ok = {r: model(v).argmax(1) != y for r, v in runs.items()}
    assert (ok[6] >= ok[1]).all()
    neither = ~ok[1] & ~ok[6]
    assert (loss[6][neither] >= loss[1][neither] - 1e-6).all()
    # Restarts help somewhere (the comparison above is not vacuous).
    assert ok[6].sum() > ok[1].sum() or (loss[6][neither] > loss[1][neither] + 1e-4).any()


class _SuccessVsLoss(nn.Module):
    """Zero input gradient (the attack stays at its random start); for label 0 the start decides.

    u > 0: misclassified (class 1 wins) with CE 0.74; u < 0: correct with the higher CE 1.09.
    """

    def forward(self, x):
        pos = (x.detach().flatten(1)[:, :1] > 0.5).float()
        bad, good = torch.tensor([0.0, 0.1, -5.0]), torch.tensor([0.0, -0.01, -0.01])
        return pos * bad + (1 - pos) * good + 0 * x.flatten(1)[:, :1]


def test_restarts_prefer_success_over_loss():
    model = _SuccessVsLoss()
    x = torch.full((32, 1, 1, 1), 0.5)
    y = torch.zeros(32, dtype=torch.long)
    adv = pgd(
        model, x, y, 0.1, "inf", steps=1, restarts=10, generator=torch.Generator().manual_seed(0)
    )
    single = pgd(model, x, y, 0.1, "inf", steps=1, generator=torch.Generator().manual_seed(0))
    assert (single <= 0.5).any()  # some single runs end correct with the higher loss
    assert (adv > 0.5).all()  # P(no success in 10 restarts) = 2^-10 per sample; fixed seed


def test_half_precision_model_gradients_independent_of_batch_size():
    # Per-sample normalized, summed loss: a sample's gradient neither shrinks with the batch size nor
    # underflows in fp16 when the model is confident (with a mean-reduced loss ~30% of these would
    # not move; with a plain summed loss some confident samples still would not).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x = 0.25 + 0.5 * torch.rand(4096, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
        model[1].weight.mul_(40)
        model[1].bias.zero_()
    model, x = model.half(), x.half()
    full = fgm(model, x, y, 0.01, "inf")
    assert full.dtype == torch.float16
    assert torch.equal(full[:64], fgm(model, x[:64], y[:64], 0.01, "inf"))
    assert ((full - x).flatten(1).abs().amax(1) > 0).all()


def test_targeted_reaches_target_more_often(trained):
    model, x, y = trained
    target = (y + 1) % 3
    hit = {
        t: (model(pgd(model, x, target, 0.2, "inf", steps=10, targeted=t)).argmax(1) == target)
        .float()
        .mean()
        for t in (False, True)
    }
    assert hit[True] > 0.5 and hit[True] > hit[False]


def test_independent_of_batch_and_train_mode_batchnorm():
    # Eval mode during the attack: BatchNorm uses running stats, so samples do not interact.
    model = nn.Sequential(small_cnn(3), nn.BatchNorm1d(3))
    model.train()
    x, y = batch(16, 3)
    full = pgd(model, x, y, 0.1, "inf", steps=3, random_start=False)
    part = pgd(model, x[:5], y[:5], 0.1, "inf", steps=3, random_start=False)
    torch.testing.assert_close(full[:5], part, atol=1e-6, rtol=0)


# ------------------------------------------------------------ analytic oracle


@pytest.fixture
def two_class():
    model = linear(64, 2)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    g = torch.Generator().manual_seed(3)
    x = 0.5 + 0.05 * torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)  # interior
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    u = w[1 - y] - w[y]  # d/dx CE(x, y) is p_other * (w_other - w_y) for two classes
    margin = ((w[y] - w[1 - y]) * x.flatten(1)).sum(1) + b[y] - b[1 - y]
    return model, x, y, u, margin


def _margin(model, x, y):
    z = model(x)
    return z.gather(1, y[:, None])[:, 0] - z.gather(1, (1 - y)[:, None])[:, 0]


def test_fgm_matches_analytic_linear(two_class):
    model, x, y, u, _ = two_class
    eps = 0.1
    d2 = (fgm(model, x, y, eps, "2") - x).flatten(1)
    torch.testing.assert_close(d2, eps * u / u.norm(dim=1, keepdim=True), atol=1e-12, rtol=0)
    dinf = (fgm(model, x, y, eps, "inf") - x).flatten(1)
    torch.testing.assert_close(dinf, eps * u.sign(), atol=1e-12, rtol=0)
    # Targeted at the other class moves the same way; targeted at y moves the opposite way.
    dt = (fgm(model, x, 1 - y, eps, "2", targeted=True) - x).flatten(1)
    torch.testing.assert_close(dt, d2, atol=1e-12, rtol=0)
    dt = (fgm(model, x, y, eps, "2", targeted=True) - x).flatten(1)
    torch.testing.assert_close(dt, -d2, atol=1e-12, rtol=0)


def test_fgm_l2_matches_analytic_gradient_three_classes():
    model = linear(64, 3)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    x = 0.5 + 0.05 * torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    p = torch.softmax(x.flatten(1) @ w.T + b, dim=1)
    grad = (p - F.one_hot(y, 3)) @ w  # d/dx CE = W^T (softmax - onehot)
    d = (fgm(model, x, y, 0.1, "l2") - x).flatten(1)
    torch.testing.assert_close(d, 0.1 * grad / grad.norm(dim=1, keepdim=True), atol=1e-12, rtol=0)


def test_pgd_reaches_analytic_minimal_margin(two_class):
    model, x, y, u, margin = two_class
    eps = 0.1
    for norm, dual in (("2", u.norm(dim=1)), ("inf", u.abs().sum(1))):
        adv = pgd(model, x, y, eps, norm, steps=20, random_start=False)
        torch.testing.assert_close(_margin(model, adv, y), margin - eps * dual, atol=1e-9, rtol=0)
        # From a random start the margin can only approach the optimum from above.
        adv = pgd(model, x, y, eps, norm, steps=50, generator=torch.Generator().manual_seed(0))
        got = _margin(model, adv, y)
        assert (got >= margin - eps * dual - 1e-9).all()
        assert (got <= margin - 0.95 * eps * dual).all()


def test_zero_gradient_gives_zero_step_without_nan():
    model = linear(64, 3)
    nn.init.zeros_(model[1].weight)
    x, y = batch(4, 3, dtype=torch.float64)
    for norm in ("2", "inf"):
        assert torch.equal(fgm(model, x, y, 0.5, norm), x)
        start = pgd(model, x, y, 0.5, norm, steps=3, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(start).all() and not torch.equal(start, x)


def test_tiny_gradient_keeps_exact_l2_step_length():
    # Gradients ~1e-26: their squares underflow in float32, the step length must still be exact.
    model = linear(64, 2, dtype=torch.float32)
    with torch.no_grad():
        model[1].weight.mul_(1e-25)
    x = torch.full((3, 1, 8, 8), 0.5)
    y = torch.tensor([0, 1, 0])
    adv = pgd(model, x, y, 0.5, "2", steps=1, step_size=0.1, random_start=False)
    torch.testing.assert_close(l2(adv - x), torch.full((3,), 0.1), atol=1e-6, rtol=0)


# --------------------------------------------------------------- peer libraries


@pytest.fixture
def peer_setup():
    model = small_cnn(3).double().eval()
    x, y = batch(8, 3, dtype=torch.float64)  # power-of-two batch: mean == sum / 8 exactly
    return model, x, y


def test_matches_torchattacks(peer_setup):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = peer_setup
    eps, alpha = 8 / 255, 2 / 255
    cases = [
        (fgm(model, x, y, eps, "inf"), torchattacks.FGSM(model, eps=eps)),
        (
            pgd(model, x, y, eps, "inf", steps=10, step_size=alpha, random_start=False),
            torchattacks.PGD(model, eps=eps, alpha=alpha, steps=10, random_start=False),
        ),
        (
            pgd(model, x, y, 1.0, "2", steps=10, step_size=0.2, random_start=False),
            torchattacks.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=False),
        ),
    ]
    for ours, theirs in cases:
        ref = theirs(x, y)
        assert (ref - x).abs().max() > 1e-3
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_matches_art(peer_setup):
    pytest.importorskip("art")
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    model, x, y = peer_setup
    model = model.float()
    x = x.float()
    # ART's PGD clips to [0, 1] before projecting (we project, then clip); the two agree when
    # clipping is inactive, so PGD is compared on interior inputs with small radii.
    x_in = 0.25 + 0.5 * x
    clf = PyTorchClassifier(
        model, nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=3, clip_values=(0.0, 1.0)
    )
    xn, yn = x.numpy(), y.numpy()
    for norm, eps in (("2", 0.2), ("inf", 0.05)):
        art_norm = 2 if norm == "2" else np.inf
        ref = FastGradientMethod(clf, norm=art_norm, eps=eps).generate(xn, yn)
        torch.testing.assert_close(
            fgm(model, x, y, eps, norm), torch.from_numpy(ref), atol=1e-6, rtol=0
        )
        art_pgd = ProjectedGradientDescent(
            clf,
            norm=art_norm,
            eps=eps,
            eps_step=eps / 4,
            max_iter=10,
            num_random_init=0,
            verbose=False,
        )
        ours = pgd(model, x_in, y, eps, norm, steps=10, step_size=eps / 4, random_start=False)
        ref = torch.from_numpy(art_pgd.generate(x_in.numpy(), yn))
        assert (ref - x_in).abs().max() < 0.25  # clipping inactive
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


# ------------------------------------------------------ framework behaviour


def test_inside_inference_mode_matches_outside():
    model = small_cnn(3)
    x, y = batch(8, 3)
    ref = pgd(model, x, y, 0.1, "inf", steps=3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        got = pgd(model, xi, yi, 0.1, "inf", steps=3, generator=torch.Generator().manual_seed(0))
        spec = AttackSpec(method="fgm", norm="2", eps=1.0)
        got_fgm = attack(model, xi, yi, spec)
        got_l2 = pgd(model, xi, yi, 1.0, "2", steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    ref_l2 = pgd(model, x, y, 1.0, "2", steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got_l2, ref_l2, atol=0, rtol=0)
    torch.testing.assert_close(got_fgm, fgm(model, x, y, 1.0, "2"), atol=0, rtol=0)


def test_bf16_autocast_gradients_nonzero_and_bounds():
    model = small_cnn(3)
    x, y = batch(16, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = {norm: pgd(model, x, y, EPS[norm], norm, steps=3, random_start=False) for norm in EPS}
    for norm, a in adv.items():
        dist = (linf if norm == "inf" else l2)(a - x)
        assert a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
        assert (dist <= EPS[norm] + 1e-5).all()
        assert (dist > 0).all()  # every sample got a non-zero gradient
        assert per_sample_loss(model, a, y).mean() > per_sample_loss(model, x, y).mean()


@pytest.mark.parametrize("channels_last", [None, False])
def test_parameter_grads_untouched(channels_last):
    # None: on CPUs the attack runs a detached channels-last copy, whose parameters cannot get
    # grads anyway; False runs the model itself, as on GPUs
    model = small_cnn(3)
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    x, y = batch(8, 3)
    pgd(model, x, y, 0.1, "2", steps=2, channels_last=channels_last)
    fgm(model, x, y, 0.1, "inf", channels_last=channels_last)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
    assert all(p.grad is None for p in params[1:])


class _RecordMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def test_eval_during_attack_and_modes_restored():
    recorder = _RecordMode()
    model = nn.Sequential(recorder, small_cnn(3), nn.Dropout(0.5))
    model.train()
    model[1][0].eval()  # mixed modes must survive exactly
    before = [m.training for m in model.modules()]
    x, y = batch(8, 3)
    pgd(model, x, y, 0.1, "inf", steps=2, restarts=2)
    assert recorder.seen and not any(recorder.seen)
    assert [m.training for m in model.modules()] == before
    model.eval()
    fgm(model, x, y, 0.1, "inf")
    assert not any(m.training for m in model.modules())


# ------------------------------------------------------------------ AttackSpec


def test_different_steps_or_eps_never_share_a_key():
    # an explicit step size added nothing, and eps was printed to 6 digits: the weaker attack
    # was logged, reported and seeded under the standard attack's name
    standard = AttackSpec(method="pgd", norm="inf", eps=0.3)
    assert AttackSpec(method="pgd", norm="inf", eps=0.3, step_size=0.001).key == (
        "pgd40_linf_eps0.3_a0.001"
    )
    assert AttackSpec(method="pgd", norm="inf", eps=0.3, step_size=2.5 * 0.3 / 40).key == (
        standard.key
    )  # the default step, given: the same attack, the same key
    assert AttackSpec(method="fgm", norm="inf", eps=0.3, step_size=0.05).key == (
        "fgm_linf_eps0.3_a0.05"
    )
    eight = AttackSpec(method="pgd", norm="inf", eps=8 / 255)
    rounded = AttackSpec(method="pgd", norm="inf", eps=0.0313725)
    assert eight.key == "pgd40_linf_eps0.03137254901960784" and rounded.key != eight.key
    # the other settings were written to 6 digits too (Square's p_init and n_queries, APGD's rho)
    for setting, a, b in [("p_init", 0.1234567, 0.1234568), ("n_queries", 1234567, 1234568)]:
        keys = {
            AttackSpec(method="square", norm="inf", eps=0.3, **{setting: v}).key for v in (a, b)
        }
        assert len(keys) == 2, keys
    rho = AttackSpec(method="apgd-ce", norm="inf", eps=0.3, rho=0.7500001)
    assert rho.key == "apgd-ce_linf_eps0.3_rho0.7500001"


def test_spec_defaults_and_keys():
    spec = AttackSpec()
    assert (spec.method, spec.norm, spec.eps) == ("fgm", "2", 5.0)
    assert (spec.resolved_steps, spec.resolved_step_size, spec.resolved_random_start) == (
        1,
        5.0,
        False,
    )
    assert spec.key == "fgm_l2_eps5"
    spec = AttackSpec(method="pgd", norm="Linf", eps=0.3)
    assert spec.norm == "inf" and spec.resolved_steps == 40 and spec.resolved_random_start
    assert math.isclose(spec.resolved_step_size, 2.5 * 0.3 / 40)
    assert spec.key == "pgd40_linf_eps0.3"
    assert (
        AttackSpec(method="fgm", random_start=True, eps=0.1, norm="inf").resolved_step_size == 0.125
    )
    assert AttackSpec(method="fgm", random_start=True, eps=1, norm=2).key == "fgm_l2_eps1_rand"
    assert (
        AttackSpec(method="pgd", steps=10, restarts=5, targeted=True, eps=1).key
        == "pgd10_l2_eps1_r5_tgt"
    )
    assert AttackSpec(name="custom").key == "custom"
    # the new methods: AutoAttack's standard settings by default, non-defaults in the key
    spec_aa = AttackSpec(method="autoattack", norm="inf", eps=0.3)
    assert (spec_aa.resolved_steps, spec_aa.resolved_n_target_classes) == (100, 9)
    assert (spec_aa.resolved_n_queries, spec_aa.resolved_p_init, spec_aa.resolved_rho) == (
        5000,
        0.8,
        0.75,
    )
    assert spec_aa.resolved_random_start and spec_aa.key == "autoattack_linf_eps0.3"
    assert AttackSpec(method="APGD_CE", norm=2, eps=0.5).key == "apgd-ce_l2_eps0.5"
    assert (
        AttackSpec(method="apgd-ce", eps=0.5, steps=50, restarts=5).key == "apgd-ce50_l2_eps0.5_r5"
    )
    assert (
        AttackSpec(method="apgd-ce", eps=0.5, random_start=False).key == "apgd-ce_l2_eps0.5_norand"
    )
    assert AttackSpec(method="apgd-t", eps=0.5, rho=0.5).key == "apgd-t_l2_eps0.5_rho0.5"
    assert AttackSpec(method="square", eps=0.5, p_init=0.3).key == "square_l2_eps0.5_p0.3"
    square_spec = AttackSpec(method="square", eps=0.5)
    assert square_spec.resolved_rho is None and square_spec.resolved_step_size is None
    assert AttackSpec(method="pgd", eps=0.5).resolved_n_queries is None
    assert AttackSpec(norm=math.inf, eps=0.3).norm == "inf" and AttackSpec(norm="L2").norm == "2"
    # Resolved values are derived, so replace() re-derives them.
    assert dataclasses.replace(spec, eps=0.1).resolved_step_size == pytest.approx(2.5 * 0.1 / 40)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.eps = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"method": "cw"}, "method"),
        ({"norm": "1"}, "norm"),
        ({"norm": 3}, "norm"),
        ({"eps": -0.1}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"method": "pgd", "steps": 0}, "steps"),
        ({"method": "apgd-ce", "steps": 0}, "steps"),
        ({"method": "autoattack", "steps": -1}, "steps"),
        ({"method": "fgm", "steps": 5}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"method": "pgd", "random_start": False, "restarts": 3}, "restarts"),
        ({"method": "apgd-t", "random_start": False, "restarts": 2}, "restarts"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -1.0}, "step_size"),
        ({"name": ""}, "name"),
        ({"method": "square", "n_queries": 0}, "n_queries"),
        ({"method": "autoattack", "n_queries": 0}, "n_queries"),
        ({"method": "square", "p_init": 0.0}, "p_init"),
        ({"method": "square", "p_init": 1.5}, "p_init"),
        ({"method": "apgd-ce", "rho": 0.0}, "rho"),
        ({"method": "apgd-t", "n_target_classes": 0}, "n_target_classes"),
        # settings a method does not take are refused, not ignored
        ({"method": "pgd", "n_queries": 100}, "n_queries"),
        ({"method": "apgd-ce", "n_target_classes": 3}, "n_target_classes"),
        ({"method": "apgd-ce", "step_size": 0.1}, "step_size"),
        ({"method": "square", "steps": 10}, "steps"),
        ({"method": "fgm", "rho": 0.5}, "rho"),
        ({"method": "apgd-t", "targeted": True}, "targeted"),
        ({"method": "square", "random_start": False}, "random_start"),
        ({"method": "autoattack", "random_start": False}, "random_start"),
    ],
)
def test_spec_validation(kwargs, setting):
    with pytest.raises(SettingError, match=setting) as error:
        AttackSpec(**kwargs)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"AttackSpec {setting}")
    assert "must" in message or "applies to" in message  # names the allowed values


def test_spec_validation_names_allowed_values():
    with pytest.raises(SettingError) as error:
        AttackSpec(method="apgd")
    for method in ("'fgm'", "'pgd'", "'apgd-ce'", "'apgd-t'", "'square'", "'autoattack'"):
        assert method in str(error.value)
    with pytest.raises(SettingError, match="'2', 'inf'"):
        AttackSpec(norm="l1")
    with pytest.raises(SettingError, match=">= 1; got 0"):
        AttackSpec(method="square", n_queries=0)


def test_function_validation():
    model = small_cnn(3)
    x, y = batch(2, 3)
    with pytest.raises(SettingError, match="fgm norm must be one of"):
        fgm(model, x, y, 0.1, "1")
    with pytest.raises(SettingError, match="pgd steps must be an integer >= 1"):
        pgd(model, x, y, 0.1, "inf", steps=0)
    with pytest.raises(SettingError, match="pgd eps must be a number >= 0"):
        pgd(model, x, y, -1.0, "inf")
    with pytest.raises(SettingError, match="apgd steps"):
        apgd(model, x, y, 0.1, "inf", steps=0)
    with pytest.raises(SettingError, match="square n_queries"):
        square(model, x, y, 0.1, "inf", n_queries=0)
    with pytest.raises(SettingError, match="autoattack eps"):
        autoattack(model, x, y, -0.1, "inf")


ALL_SPECS = [
    AttackSpec("fgm", "inf", 0.0),
    AttackSpec("fgm", "2", 0.0, random_start=True, restarts=2),
    AttackSpec("pgd", "inf", 0.0, steps=3),
    AttackSpec("pgd", "2", 0.0, steps=3, targeted=True),
    AttackSpec("apgd-ce", "inf", 0.0, steps=3),
    AttackSpec("apgd-t", "2", 0.0, steps=3, n_target_classes=2),
    AttackSpec("square", "inf", 0.0, n_queries=5),
    AttackSpec("autoattack", "2", 0.0, steps=3, n_queries=5),
]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.key)
def test_eps_zero_means_no_attack(spec):
    model = small_cnn(classes=5)
    x, y = batch(8, classes=5)
    stages = {}
    with torch.inference_mode():
        got = attack(model, x, y, spec, generator=torch.Generator().manual_seed(0), stages=stages)
    assert torch.equal(got, x) and got.dtype == x.dtype
    clean = model(x).argmax(1) == y
    assert accuracy(model, got, y) == clean.float().mean().item()
    assert all(torch.equal(mask, clean) for mask in stages.values()) and "clean" in stages


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("method", METHODS)
def test_an_empty_batch_gives_an_empty_batch(method, norm):
    model = small_cnn(classes=5)
    x, y = batch(2, classes=5)
    targets = 2 if method in ("apgd-t", "autoattack") else None
    spec = AttackSpec(method, norm, 0.1, n_target_classes=targets)
    got = attack(model, x[:0], y[:0], spec, generator=[])  # L2 was an IndexError
    assert got.shape == (0, *x.shape[1:]) and got.dtype == x.dtype


def test_eps_zero_functions_return_x():
    model = small_cnn(classes=5)
    x, y = batch(4, classes=5)
    for fn in (fgm, pgd, apgd, apgd_t, square, autoattack):
        assert torch.equal(fn(model, x, y, 0.0, "inf"), x)


def test_attack_dispatch_matches_functions():
    model = small_cnn(3)
    x, y = batch(8, 3)
    spec = AttackSpec(method="pgd", norm="inf", eps=0.1, steps=5)
    got = attack(model, x, y, spec, generator=torch.Generator().manual_seed(1))
    ref = pgd(model, x, y, 0.1, "inf", steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, ref)
    spec = AttackSpec(method="fgm", norm="2", eps=1.0, random_start=True, restarts=2)
    got = attack(model, x, y, spec, generator=torch.Generator().manual_seed(1))
    ref = pgd(
        model,
        x,
        y,
        1.0,
        "2",
        steps=1,
        step_size=1.25,
        restarts=2,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(got, ref)


def test_spec_from_yaml_via_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--attacks", type=list[AttackSpec])
    cfg = parser.parse_string(
        "attacks: [{method: pgd, norm: Linf, eps: 0.3}, {norm: 2, eps: 1.5}, "
        "{method: autoattack, norm: inf, eps: 0.3}, {method: square, norm: 2, eps: 2, n_queries: 1000}, "
        "{method: apgd_t, norm: inf, eps: 0.3, n_target_classes: 3}]"
    )
    specs = parser.instantiate(cfg).attacks
    assert specs == [
        AttackSpec(method="pgd", norm="inf", eps=0.3),
        AttackSpec(norm="2", eps=1.5),
        AttackSpec(method="autoattack", norm="inf", eps=0.3),
        AttackSpec(method="square", norm="2", eps=2.0, n_queries=1000),
        AttackSpec(method="apgd-t", norm="inf", eps=0.3, n_target_classes=3),
    ]
    assert [s.key for s in specs[2:]] == [
        "autoattack_linf_eps0.3",
        "square_l2_eps2_q1000",
        "apgd-t_linf_eps0.3_t3",
    ]


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_one_generator_per_sample_makes_starts_batch_independent(norm):
    model = small_cnn(3)
    x, y = batch(6, 3)
    spec = AttackSpec(method="pgd", norm=norm, eps=0.3 if norm == "inf" else 1.0, steps=3)

    together = attack(model, x, y, spec, generator=generators(range(6)))
    alone = torch.cat(
        [
            attack(model, x[i : i + 1], y[i : i + 1], spec, generator=generators([i]))
            for i in range(6)
        ]
    )
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    # a single generator for the batch gives other starts (the per-sample path is really taken)
    shared = attack(model, x, y, spec, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(shared, together)
    with pytest.raises(ValueError, match="generator"):
        attack(model, x, y, spec, generator=generators(range(5)))


def logit_model(scale: float) -> nn.Module:
    """Logits ``scale * (x - 1/2)`` of a 3-pixel image: any logits by the choice of x."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight.copy_(scale * torch.eye(3))
        model[1].bias.fill_(-scale / 2)
    return model


def test_fgm_steps_along_the_cross_entropy_gradient_even_when_p_y_rounds_to_1():
    model = logit_model(40.0)
    # logits [9, 0, -3], [0.1, 0.2, 0.3] and [20, -10, -10]: p_y of the last rounds to 1 in float32
    x = torch.tensor([[29, 20, 17], [20.1, 20.2, 20.3], [40, 10, 10]]).div(40).view(3, 1, 1, 3)
    y = torch.tensor([0, 2, 0])
    step = (fgm(model, x, y, 0.01, "2") - x).flatten(1).double()
    # every image moves the full eps, in the direction of the cross-entropy's gradient (float64)
    torch.testing.assert_close(step.norm(dim=1), torch.full((3,), 0.01, dtype=torch.float64))
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(x.double())
    expected = logits.softmax(1) - F.one_hot(y, 3)  # W = 40 I: the input gradient's direction
    unit = expected / expected.norm(dim=1, keepdim=True)
    cosine = (step / 0.01 * unit).sum(1)  # float32 steps: 1 up to ~1e-6 (plain CE: 0.71)
    torch.testing.assert_close(cosine, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)
    # float32 autograd of the plain cross-entropy loses the last image's y entry to cancellation
    x32 = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(F.cross_entropy(model(x32), y, reduction="sum"), x32)[0]
    assert plain.flatten(1)[2, 0] == 0 and expected[2, 0] < 0


def test_fgsm_signs_match_float64_gradient_for_confident_samples(trained):
    # Logits x3: p_y rounds to 1 in float32 for most images (margins ~23) but not in float64, so
    # float64 autograd of the cross-entropy is an exact reference for its gradient's signs.
    model, x, y = trained
    model = copy.deepcopy(model)
    with torch.no_grad():
        model[-1].weight.mul_(3.0)
        model[-1].bias.mul_(3.0)
        p_y = model(x).softmax(1).gather(1, y[:, None])[:, 0]
    assert (p_y == 1.0).float().mean() > 0.8
    model64, x64 = copy.deepcopy(model).double(), x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(F.cross_entropy(model64(x64), y, reduction="sum"), x64)
    # coordinates whose float64 gradient is not negligible within its sample
    clear = g64.abs() > 1e-4 * g64.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    step = (fgm(model, x, y, 0.01, "inf") - x).sign()
    seen = clear & (step != 0)  # a step clipped at 0 or 1 shows no sign
    assert seen.sum() > 0.99 * clear.sum()
    assert ((step != g64.sign()) & seen).sum() == 0
    # plain float32 autograd of the cross-entropy gets many of these signs wrong
    x32 = x.clone().requires_grad_(True)
    (g32,) = torch.autograd.grad(F.cross_entropy(model(x32), y, reduction="sum"), x32)
    assert ((g32.sign() != g64.sign()) & clear).sum() > 0.05 * clear.sum()


def test_attacks_stay_finite_when_the_other_classes_underflow():
    model = logit_model(400.0)  # logits [200, 0, 0] and [1, 0, 0] (exp(-200) is 0 in float32)
    x = torch.tensor([[1.0, 0.5, 0.5], [0.5025, 0.5, 0.5]]).view(2, 1, 1, 3)
    y = torch.tensor([0, 0])
    for norm in ("inf", "2"):
        for adversarial in (fgm(model, x, y, 0.01, norm), pgd(model, x, y, 0.01, norm, steps=5)):
            assert adversarial.isfinite().all()
            assert distance(adversarial - x, norm).max() <= 0.01 * (1 + 1e-5)


@pytest.mark.parametrize("method", ["apgd-t", "autoattack"])
def test_attack_refuses_more_target_classes_than_the_model_has(method):
    model = small_cnn(classes=10)
    x, y = batch(2, classes=10)
    spec = AttackSpec(method, "inf", 0.1, steps=2, n_target_classes=50)
    assert spec.key.endswith("_t50")  # the key claims 50 targets: running 9 would be a lie
    with pytest.raises(SettingError, match=r"AttackSpec n_target_classes must be .*\[1, 9\]"):
        attack(model, x, y, spec, generator=generators(range(2)))
    with pytest.raises(SettingError, match=r"owner n_target_classes .*\[1, 9\].* got 50"):
        spec.check_num_classes(10, owner="owner")
    spec.check_num_classes(51)
    AttackSpec(method, "inf", 0.1).check_num_classes(5)  # the default uses at most C - 1
    with pytest.raises(SettingError, match="at least 4 classes"):
        AttackSpec(method, "inf", 0.1).check_num_classes(3)
    AttackSpec("pgd", "inf", 0.1).check_num_classes(2)  # other methods take any classes


@pytest.mark.parametrize(("backbone", "images"), [("LeNet", 512), ("SmallCNN", 128)])
def test_cpu_slices_keep_the_largest_activation_under_the_mmap_threshold(backbone, images):
    # LeNet's first convolution outputs 20 x 24 x 24 floats per MNIST image (45 KiB: 728 fit in
    # 32 MiB), SmallCNN's second 64 x 24 x 24 (144 KiB: 227 fit); slices are powers of two.
    import robust._attack_core as core
    from lightning_modules import backbones

    model = nn.Sequential(backbones.Normalize([0.5], [0.25]), getattr(backbones, backbone)(1, 10))
    x = torch.rand(600, 1, 28, 28)
    with core.prepared(model, x, None) as forward:
        assert forward.chunk == core.UNMEASURED_CPU_SLICE  # until the first call measures it
        forward(x)
        assert forward.chunk == images
    with core.prepared(model, x, False) as forward:  # the caller's layout: whole batches
        assert forward.chunk is None
    assert core.cpu_slice_images(core.MMAP_THRESHOLD) == 1
    assert core.cpu_slice_images(core.MMAP_THRESHOLD + 1) == 1
    assert core.cpu_slice_images(core.MMAP_THRESHOLD // 64) == 64
    assert core.cpu_slice_images(core.MMAP_THRESHOLD // 64 + 1) == 32


def test_cpu_slices_give_the_whole_batch_gradient(monkeypatch):
    # per-sample values and input gradients do not depend on the slicing (up to float rounding),
    # and a fixed CPU_CHUNK (0: whole batches) replaces the rule
    import robust._attack_core as core
    from lightning_modules.backbones import LeNet

    torch.manual_seed(0)
    model = LeNet(1, 10).eval()
    x, y = torch.rand(300, 1, 28, 28), torch.randint(0, 10, (300,))

    def objective(logits, labels):
        step = core.others_minus_true(logits, labels)
        return step.detach(), step.sum()

    results = {}
    for chunk in (None, 0, 64):
        monkeypatch.setattr(core, "CPU_CHUNK", chunk)
        with core.prepared(model, x, None) as forward:
            results[chunk] = forward.gradient(x, y, objective)
            assert forward.chunk == {None: 512, 0: None, 64: 64}[chunk]
            # the measured slices (512 covers all 300 here) against a fixed 64
            again = forward.gradient(x, y, objective)[1]
            torch.testing.assert_close(again, results[chunk][1], rtol=1e-4, atol=1e-6)
    for chunk in (0, 64):
        for ours, whole in zip(results[chunk], results[None], strict=True):
            torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-6)


def test_targeted_stage_masks_say_whether_the_target_is_hit():
    # the mask of a targeted attack used to be "target hit and clean prediction == target": all
    # False whenever the target differs from the clean prediction, which is the point of it
    model = small_cnn(seed=2)
    x, _ = batch(40, 5, seed=3)
    with torch.no_grad():
        target = (model(x).argmax(1) + 1) % 5
    stages = {}
    spec = AttackSpec("pgd", "inf", 0.5, steps=20, targeted=True)
    x_adv = attack(model, x, target, spec, generator=generators(range(40)), stages=stages)
    with torch.no_grad():
        hit = model(x_adv).argmax(1) == target
    assert 0 < int(hit.sum()) and not stages["clean"].any()
    assert torch.equal(stages["pgd"], hit)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y, m: AttackSpec("pgd", "inf"),  # L2's default eps 5.0 given to an L-inf attack
        lambda x, y, m: AttackSpec("fgm", "inf", 76.5),  # the 0-255 scale
        lambda x, y, m: attack(m, x, y, AttackSpec("pgd", "2", 8.5, steps=1)),  # > sqrt(64)
        lambda x, y, m: pgd(m, x, y, 2.0, "inf", steps=1),
        lambda x, y, m: fgm(m, x, y, 1.5, "linf"),
        lambda x, y, m: apgd(m, x, y, 2.0, "inf", steps=1),
        lambda x, y, m: square(m, x, y, 2.0, "inf", n_queries=1),
        lambda x, y, m: square(m, x, y, 9.0, "2", n_queries=1),
        lambda x, y, m: autoattack(m, x, y, 255.0, "inf", steps=1, n_queries=1),
    ],
)
def test_an_eps_whose_ball_holds_every_image_is_refused(make):
    model = small_cnn()
    x, y = batch(3, 5)
    with pytest.raises(SettingError, match=r"eps for norm (inf must be <= 1|2 must be <= 8\b)"):
        make(x, y, model)


def test_an_eps_of_the_cube_s_diameter_is_still_an_attack():
    model = small_cnn()
    x, y = batch(3, 5)
    assert attack(model, x, y, AttackSpec("fgm", "inf", 1.0)).shape == x.shape
    assert attack(model, x, y, AttackSpec("fgm", "2", 8.0)).shape == x.shape


LOW_PRECISION_METHODS = ["fgm", "pgd", "pgd-restarts", "apgd-ce", "apgd-t", "square", "autoattack"]


def _low_precision_spec(method: str, norm: str, eps: float) -> AttackSpec:
    settings = {"n_queries": 20} if method in ("square", "autoattack") else {}
    settings |= {"steps": 5} if method not in ("fgm", "square") else {}
    settings |= {"restarts": 2} if method == "pgd-restarts" else {}
    return AttackSpec(method=method.removesuffix("-restarts"), norm=norm, eps=eps, **settings)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", LOW_PRECISION_METHODS)
@pytest.mark.parametrize(("norm", "eps"), [("inf", 0.3), ("2", 1.1)])
def test_low_precision_images_stay_inside_the_ball(dtype, method, norm, eps):
    # bf16 images (bf16-true precision): x + eps rounds, here up to 0.0027 beyond eps 0.3, in
    # 17 of 24 such cases before the rounding was corrected (robust._attack_core.into_ball)
    model = small_cnn(5).to(dtype)
    x, y = batch(32, 5)
    x = x.to(dtype)
    seen = []

    def recorded(inputs: torch.Tensor) -> torch.Tensor:
        seen.append(inputs.detach().double())
        return model(inputs)

    spec = _low_precision_spec(method, norm, eps)
    adv = attack(recorded, x, y, spec, generator=generators(range(len(x))), channels_last=False)
    delta = adv.double() - x.double()
    dist = linf(delta) if norm == "inf" else l2(delta)
    assert adv.dtype == dtype and (dist <= eps).all()  # exactly, in float64
    assert adv.min() >= 0 and adv.max() <= 1
    # some images end on the boundary, not pulled further in than the dtype needs (Square's
    # and AutoAttack's points are scaled to the sphere in the dtype's own arithmetic: looser)
    projected = method not in ("square", "autoattack")
    reach = eps * (1 - (1e-2 if projected else 2e-2))
    reach = reach if norm == "2" else eps - torch.finfo(dtype).eps
    assert dist.max() >= reach, (dist.max(), eps)
    # and every point the attack evaluated the model at was inside too (its decisions were
    # made on the points it returns): each lies within eps of its own clean image (the nearest)
    clean = x.double().flatten(1)
    for inputs in seen:
        gaps = (inputs.flatten(1)[:, None, :] - clean[None, :, :]).abs()
        nearest = gaps.amax(dim=2) if norm == "inf" else gaps.square().sum(dim=2).sqrt()
        assert (nearest.amin(dim=1) <= eps).all(), method


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_into_ball_moves_rounded_points_back_no_further_than_needed(dtype):
    g = torch.Generator().manual_seed(0)
    x = (0.25 + 0.5 * torch.rand(64, 3, 32, 32, generator=g, dtype=torch.float64)).to(dtype)
    wide = x.double()
    # L2, CIFAR-sized: exact points of the sphere of radius 0.5 (inside [0, 1]), rounded
    eps = 0.5
    d = torch.randn(x.shape, generator=g, dtype=torch.float64)
    rounded = (wide + d / l2(d).view(-1, 1, 1, 1) * eps).to(dtype)
    before = l2(rounded.double() - wide)
    assert (before > eps).any()  # rounding took some images outside
    fixed = into_ball(x, rounded, eps, "2")
    after = l2(fixed.double() - wide)
    assert (after <= eps).all()
    assert torch.equal(fixed[before <= eps], rounded[before <= eps])  # those inside: unchanged
    # pulled back by a hair: the moves that give up the least norm first (in another order they
    # lost 3.5e-4 of the radius and more; moving every coordinate lost 20% on such images)
    tolerance = 1e-4 if dtype == torch.bfloat16 else 1e-5
    assert (after[before > eps] >= eps * (1 - tolerance)).all()
    # L-inf: a coordinate outside moves to the last representable value inside, no further
    eps = 0.3
    sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
    rounded = (wide + eps * sign).clamp(0, 1).to(dtype)
    fixed = into_ball(x, rounded, eps, "inf")
    out = (rounded.double() - wide).abs() > eps
    assert out.any() and ((fixed.double() - wide).abs() <= eps).all()
    assert torch.equal(fixed[~out], rounded[~out])
    away = torch.nextafter(fixed, torch.where(fixed > x, 2.0, -1.0).to(dtype))
    assert ((away.double() - wide).abs()[out] > eps).all()  # one value further is outside
    # float32 and float64: returned as they are; mixed dtypes: refused
    same = torch.rand(2, 3)
    far = same + 1
    assert into_ball(same, far, 0.1, "inf") is far
    with pytest.raises(ValueError, match="one dtype"):
        into_ball(same, same.to(dtype), 0.1, "inf")
