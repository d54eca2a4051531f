"""Tests for robust.apgd: the checkpoint schedule, analytic oracles, framework behaviour."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust._attack_core as attack_core
from robust._attack_core import _default_channels_last
from robust.apgd import apgd, apgd_checkpoints, apgd_t
from robust.autoattack import autoattack
from robust.checks import SettingError
from tests.tiny_models import batch, distance, generators, linear, small_cnn

# ----------------------------------------------------------------------- schedule


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 20, 25, 50, 100, 137, 1000])
def test_checkpoints_are_the_authors_codes(steps):
    # fra31/auto-attack's loop: a counter of iterations since the last check, checked against a
    # window k = int(0.22 N) that shrinks by int(0.03 N) down to int(0.06 N), each at least 1
    k, shrink = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1)
    shortest = max(int(0.06 * steps), 1)
    expected, counter = [], 0
    for i in range(steps):
        counter += 1
        if counter == k:
            expected.append(i + 1)
            k, counter = max(k - shrink, shortest), 0
    assert apgd_checkpoints(steps) == expected
    # the paper's w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    paper = sorted({math.ceil(q * steps) for q in p[1:]})
    if steps == 100:
        assert expected == paper == [22, 41, 57, 70, 80, 87, 93, 99]
    if steps in (10, 20):  # the paper's formula checks less often in short runs
        assert len(expected) > len(paper)


# --------------------------------------------------------------- analytic oracles


@pytest.fixture
def two_class():
    """A float64 linear binary classifier and interior images it classifies correctly."""
    model = linear(64, 2)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    g = torch.Generator().manual_seed(3)
    x = 0.45 + 0.1 * torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    u = w[1 - y] - w[y]
    margin = ((w[y] - w[1 - y]) * x.flatten(1)).sum(1) + b[y] - b[1 - y]
    return model, x, y, u, margin


def _margin(model, x, y):
    with torch.no_grad():
        z = model(x)
    return z.gather(1, y[:, None])[:, 0] - z.gather(1, (1 - y)[:, None])[:, 0]


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_apgd_ce_reaches_analytic_minimal_margin(two_class, norm):
    # CE of a linear binary classifier decreases in its margin, whose minimum over the ball is
    # margin - eps * ||w_y - w_other||_dual (the ball stays inside [0, 1]); eps keeps it > 0, so
    # APGD returns its highest-loss point. L2 needs the step-size halvings to converge.
    model, x, y, u, margin = two_class
    dual = u.abs().sum(1) if norm == "inf" else u.norm(dim=1)
    eps = 0.8 * (margin / dual).min().item()
    assert eps < 0.4  # the ball stays inside [0, 1], so clipping never acts
    adv = apgd(model, x, y, eps, norm, generator=torch.Generator().manual_seed(0))
    optimum = margin - eps * dual
    torch.testing.assert_close(_margin(model, adv, y), optimum, atol=1e-6 * eps, rtol=0)
    assert (distance(adv - x, norm) <= eps * (1 + 1e-9)).all()


def _linear_gaps(model, x, y, norm):
    """Per image and class: margin z_y - z_j and the dual norm of w_y - w_j (inf at y)."""
    w, b = model[1].weight.detach(), model[1].bias.detach()
    z = x.flatten(1) @ w.T + b
    gap = z.gather(1, y[:, None]) - z  # (B, C)
    dw = w[y][:, None, :] - w[None, :, :]  # (B, C, d)
    dual = dw.abs().sum(2) if norm == "inf" else dw.norm(dim=2)
    return gap, dual.scatter(1, y[:, None], math.inf)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_apgd_t_finds_exactly_the_non_robust_images_of_a_linear_classifier(norm):
    # For a linear classifier class j is reachable iff z_y - z_j - eps ||w_y - w_j||_dual < 0 (the
    # ball stays inside [0, 1]); APGD-T towards every other class must break exactly those images.
    model = linear(64, 5, seed=1)
    g = torch.Generator().manual_seed(4)
    x = 0.4 + 0.2 * torch.rand(200, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    gap, dual = _linear_gaps(model, x, y, norm)
    critical = (gap / dual).scatter(1, y[:, None], math.inf).amin(1)  # least eps that breaks it
    eps = critical.median().item()
    assert eps < 0.2 if norm == "2" else eps < 0.02  # far from the [0, 1] walls
    clear = (critical - eps).abs() > 0.02 * eps
    assert clear.float().mean() > 0.8
    adv = apgd_t(
        model,
        x,
        y,
        eps,
        norm,
        steps=30,
        n_target_classes=4,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        robust = model(adv).argmax(1) == y
    assert torch.equal(robust[clear], (critical > eps)[clear])
    assert (distance(adv - x, norm) <= eps * (1 + 1e-9)).all()


def test_apgd_t_needs_four_classes():
    model = linear(64, 3)
    x, y = batch(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 4 classes"):
        apgd_t(model, x, y, 0.1, "inf", steps=2)


def test_apgd_t_uses_the_top_classes_as_targets():
    # Classes 0..4 with logits z_j = (4 - j) * s(x) + small: clean ranking 0 > 1 > 2 > 3 > 4. Only
    # a step towards class 4 can change the prediction (class 4's logit has the largest gradient),
    # so with one target class (class 1) the attack fails and with four it succeeds.
    class Model(nn.Module):
        def forward(self, x):
            s = x.flatten(1).mean(1, keepdim=True)
            base = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=x.dtype)
            slope = torch.tensor([0.0, 0.0, 0.0, 0.0, 40.0], dtype=x.dtype)
            return base + slope * s

    model = Model()
    x = torch.full((3, 1, 4, 4), 0.05, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    assert (model(x).argmax(1) == 0).all()
    one = apgd_t(model, x, y, 0.1, "inf", steps=10, n_target_classes=1)
    four = apgd_t(model, x, y, 0.1, "inf", steps=10, n_target_classes=4)
    assert (model(one).argmax(1) == 0).all()
    assert (model(four).argmax(1) == 4).all()


# ------------------------------------------------------------ framework behaviour


@pytest.mark.parametrize("fn", [apgd, apgd_t], ids=["apgd-ce", "apgd-t"])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_bounds_and_output(fn, norm):
    model = small_cnn()
    x, y = batch(16, 5)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct: every image is attacked
    eps = 0.1 if norm == "inf" else 1.0
    kwargs = {"n_target_classes": 2} if fn is apgd_t else {}
    adv = fn(model, x, y, eps, norm, steps=10, generator=torch.Generator().manual_seed(0), **kwargs)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    d = distance(adv - x, norm)
    assert (d <= eps * (1 + 1e-5)).all() and (d > 0.5 * eps).all()
    assert (
        F.cross_entropy(model(adv), y, reduction="none")
        > F.cross_entropy(model(x), y, reduction="none")
    ).all()


def test_misclassified_images_are_left_alone():
    model = small_cnn()
    x, y = batch(16, 5)
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any() and (~wrong).any()
    adv = apgd(model, x, y, 0.1, "inf", steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv[wrong], x[wrong])


@pytest.mark.parametrize("fn", [apgd, apgd_t], ids=["apgd-ce", "apgd-t"])
def test_one_generator_per_sample_makes_results_batch_independent(fn):
    model = small_cnn()
    x, y = batch(6, 5)
    with torch.no_grad():
        y = model(x).argmax(1)
    kwargs = {"n_target_classes": 2} if fn is apgd_t else {}
    together = fn(model, x, y, 0.2, "inf", steps=5, generator=generators(range(6)), **kwargs)
    alone = torch.cat(
        [
            fn(
                model,
                x[i : i + 1],
                y[i : i + 1],
                0.2,
                "inf",
                steps=5,
                generator=generators([i]),
                **kwargs,
            )
            for i in range(6)
        ]
    )
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="generator"):
        fn(model, x, y, 0.2, "inf", steps=5, generator=generators(range(5)), **kwargs)


def test_restarts_never_weaker():
    model = small_cnn(seed=3)
    x, y = batch(64, 5, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)
    runs = {
        r: apgd(model, x, y, 0.04, "inf", steps=5, restarts=r, generator=generators(range(64)))
        for r in (1, 4)
    }
    fooled = {r: model(v).argmax(1) != y for r, v in runs.items()}
    assert (fooled[4] >= fooled[1]).all() and fooled[4].sum() > fooled[1].sum()
    # the first restart is the single run: images it fooled keep exactly its point
    assert torch.equal(runs[4][fooled[1]], runs[1][fooled[1]])


def test_inside_inference_mode_matches_outside_and_parameters_untouched():
    model = small_cnn()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    x, y = batch(8, 5)
    ref = apgd_t(model, x, y, 0.1, "2", steps=4, n_target_classes=2, generator=generators(range(8)))
    with torch.inference_mode():
        got = apgd_t(
            model,
            x.clone(),
            y.clone(),
            0.1,
            "2",
            steps=4,
            n_target_classes=2,
            generator=generators(range(8)),
        )
    assert torch.equal(got, ref)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
    assert all(p.grad is None for p in params[1:])


def test_eval_during_attack_and_modes_restored():
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(Record(), small_cnn(), nn.Dropout(0.5))
    model.train()
    model[1][0].eval()
    before = [m.training for m in model.modules()]
    x, y = batch(8, 5)
    apgd(model, x, y, 0.1, "inf", steps=3)
    assert seen and not any(seen)
    assert [m.training for m in model.modules()] == before


def test_random_start_is_at_distance_eps():
    # AutoAttack's start: x + eps * t / ||t|| (t uniform in the cube for L-inf, Gaussian for L2);
    # with steps=1 on a model of zero gradient the run stays at its start.
    model = linear(64, 5)
    nn.init.zeros_(model[1].weight)
    x = torch.full((50, 1, 8, 8), 0.5, dtype=torch.float64)
    y = torch.zeros(50, dtype=torch.long)
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 0]))
    for norm, eps in (("inf", 0.1), ("2", 0.3)):
        start = apgd(model, x, y, eps, norm, steps=1, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(
            distance(start - x, norm), torch.full((50,), eps, dtype=torch.float64)
        )
        assert not torch.equal(start[0], start[1])
    assert torch.equal(apgd(model, x, y, 0.1, "inf", steps=1, random_start=False), x)


def test_validation():
    model = small_cnn()
    x, y = batch(2, 5)
    for kwargs, setting in (
        ({"steps": 0}, "apgd steps"),
        ({"restarts": 0}, "apgd restarts"),
        ({"rho": 1.5}, "apgd rho"),
        ({"random_start": "yes"}, "apgd random_start"),
    ):
        with pytest.raises(SettingError, match=setting):
            apgd(model, x, y, 0.1, "inf", **kwargs)
    with pytest.raises(SettingError, match="apgd_t n_target_classes"):
        apgd_t(model, x, y, 0.1, "inf", n_target_classes=0)


@pytest.mark.parametrize("fn", [apgd, apgd_t], ids=["apgd-ce", "apgd-t"])
def test_fast_cpu_layout_is_the_same_attack(fn, monkeypatch):
    # On CPUs float32 images run through channels-last weights, in slices (64 images here, as the
    # tiny model would take all 150 at once): the same attack up to float rounding (which may
    # flip a near-zero gradient sign, so not bit for bit).
    monkeypatch.setattr(attack_core, "CPU_CHUNK", 64)
    model = small_cnn(seed=1)
    x, _ = batch(150, 5, seed=7)
    with torch.no_grad():
        y = model(x).argmax(1)
    kwargs = {"steps": 5, "n_target_classes": 2} if fn is apgd_t else {"steps": 5}
    assert _default_channels_last(model, x)  # the default on CPUs is the fast layout
    fast = fn(
        model, x, y, 0.1, "inf", generator=generators(range(150)), channels_last=True, **kwargs
    )
    plain = fn(
        model, x, y, 0.1, "inf", generator=generators(range(150)), channels_last=False, **kwargs
    )
    same = (fast - plain).flatten(1).abs().amax(1) < 1e-5
    assert same.float().mean() > 0.9
    assert [p.is_contiguous() for p in model.parameters()] == [True] * len(list(model.parameters()))


def test_more_target_classes_than_the_model_has_are_refused():
    # five classes: four others to target; asking for more used to run four silently
    model = small_cnn(classes=5)
    x, y = batch(2, 5)
    with pytest.raises(SettingError, match=r"apgd_t n_target_classes must be .* \[1, 4\]"):
        apgd_t(model, x, y, 0.1, "inf", steps=1, n_target_classes=5)
    kwargs = {"steps": 1, "channels_last": False}
    default = apgd_t(model, x, y, 0.1, "inf", generator=generators(range(2)), **kwargs)
    four = apgd_t(
        model, x, y, 0.1, "inf", n_target_classes=4, generator=generators(range(2)), **kwargs
    )
    assert torch.equal(default, four)  # the default (AutoAttack's 9) takes at most C - 1


def test_autoattack_refuses_more_target_classes_than_the_model_has():
    # the composition checks APGD-T's setting as APGD-T alone does; its default still fits
    model = small_cnn(classes=5)
    x, y = batch(2, 5)
    with pytest.raises(SettingError, match=r"n_target_classes must be .* \[1, 4\]"):
        autoattack(model, x, y, 0.1, "inf", steps=1, n_queries=2, n_target_classes=5)
    kwargs = {"steps": 1, "n_queries": 2}
    default = autoattack(model, x, y, 0.1, "inf", generator=generators(range(2)), **kwargs)
    four = autoattack(
        model, x, y, 0.1, "inf", n_target_classes=4, generator=generators(range(2)), **kwargs
    )
    assert torch.equal(default, four)


# ------------------------------------------------------------- the algorithm's steps, scripted


class Scripted:
    """A forward pass whose objective values and gradient signs follow a script, not the point.

    Call ``k`` (0: at the start point) returns ``values[k]`` for every image, a gradient of
    ``signs[k]`` (default +1) and logits that predict ``classes[k]`` (default: the true class).
    """

    def __init__(self, values, signs=None, classes=None, num_classes: int = 4) -> None:
        self.values, self.signs, self.classes = list(values), signs, classes
        self.num_classes, self.calls = num_classes, 0

    def gradient(self, x, labels, objective):
        k, self.calls = self.calls, self.calls + 1
        y = labels if labels.dim() == 1 else labels[:, 0]
        predicted = y if self.classes is None else torch.full_like(y, self.classes[k])
        logits = F.one_hot(predicted, self.num_classes).to(x.dtype)
        sign = 1.0 if self.signs is None else self.signs[k]
        return torch.full((len(x),), float(self.values[k])), torch.full_like(x, sign), logits


def scripted_run(values, monkeypatch, steps=100, eps=0.125, **script):
    """The step sizes of an APGD run (one image, L-inf) on a scripted objective, and its result."""
    from robust.apgd import _Apgd, _ce_objective

    taken = []
    ascent = _Apgd.ascent

    def recorded(self, x_adv, grad, step):
        taken.append(float(step[0]) / eps)  # exact: eps and the halvings are powers of 2
        return ascent(self, x_adv, grad, step)

    monkeypatch.setattr(_Apgd, "ascent", recorded)
    x, y = torch.full((1, 1, 2, 2), 0.5), torch.tensor([0])
    run = _Apgd(Scripted(values, **script), x, y, eps, "inf", steps, 0.75, _ce_objective)
    return taken, run(x.clone())


def test_the_step_starts_at_2_eps_and_stays_while_the_objective_keeps_rising(monkeypatch):
    taken, _ = scripted_run(range(101), monkeypatch)
    assert taken == [2.0] * 100


def test_a_flat_objective_halves_the_step_at_every_checkpoint(monkeypatch):
    taken, _ = scripted_run([0.0] * 101, monkeypatch)
    checks = apgd_checkpoints(100)
    assert taken == [2.0 * 0.5 ** sum(c <= i for c in checks) for i in range(100)]


def test_no_improvement_halves_only_where_the_last_checkpoint_did_not(monkeypatch):
    """Condition 2 of the paper, over the window since the last checkpoint (not since step 0)."""
    c1, c2, c3 = apgd_checkpoints(100)[:3]
    # flat up to c1 (condition 1 halves), then rising every step but below the best of step 0
    values = [0.0] * (c1 + 1) + [-100.0 + 0.01 * i for i in range(100 - c1)]
    taken, _ = scripted_run(values, monkeypatch)
    assert taken[c1 - 1] == 2.0 and taken[c1] == 1.0  # halved at c1: flat
    assert taken[c2] == 1.0  # rising in 19 of 19 steps; no better, but halved at c1: kept
    assert taken[c3] == 0.5  # no better since c2, which did not halve


def test_the_second_step_has_the_papers_momentum(monkeypatch):
    # x1 = P(x0 + 2 eps) = 0.5 + eps; z = P(x1 - 2 eps) = 0.5 - eps;
    # x2 = x1 + 0.75 (z - x1) + 0.25 (x1 - x0) = 0.75 - 0.375 + 0.0625
    _, result = scripted_run([0.0, 1.0, 2.0], monkeypatch, steps=2, eps=0.25, signs=[1, -1, 1])
    assert torch.equal(result.x_best, torch.full((1, 1, 2, 2), 0.4375))


def test_a_run_returns_the_misclassified_iterate_not_the_best_loss_point(monkeypatch):
    # step 2 misclassifies (class 1), step 3 has the highest loss but is classified correctly
    values, classes = [0.0, 1.0, 2.0, 5.0], [0, 0, 1, 0]
    signs = [1, 1, -1, 1]
    _, result = scripted_run(values, monkeypatch, steps=3, eps=0.25, signs=signs, classes=classes)
    assert bool(result.fooled) and not torch.equal(result.x_found, result.x_best)


def test_the_drivers_keep_the_adversarial_point_and_otherwise_the_highest_loss_restart(
    monkeypatch,
):
    import robust.apgd as apgd_module
    from robust.apgd import _Result, run_apgd_ce

    x, y = torch.full((2, 1, 2, 2), 0.5), torch.tensor([0, 0])
    runs = iter(
        [  # restart 1: image 0 fooled at x + 0.02 (its best loss at x + 0.01); image 1 not
            _Result(x + 0.01, torch.tensor([1.0, 5.0]), torch.tensor([True, False]), x + 0.02),
            # restart 2, image 1 only: a lower loss than restart 1's
            _Result(x[1:] + 0.03, torch.tensor([3.0]), torch.tensor([False]), x[1:] + 0.03),
        ]
    )

    class Replayed:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __call__(self, start):
            return next(runs)

    monkeypatch.setattr(apgd_module, "_Apgd", Replayed)
    forward = lambda v: F.one_hot(torch.zeros(len(v), dtype=torch.long), 4).float()  # noqa: E731
    out = run_apgd_ce(forward, x, y, 0.1, "inf", 10, 2, 0.75, False, None)
    torch.testing.assert_close(out[0], x[0] + 0.02)  # the misclassified iterate
    torch.testing.assert_close(out[1], x[1] + 0.01)  # the higher loss of the two restarts


def test_the_targeted_dlr_is_the_papers_formula():
    from robust.apgd import _dlr_targeted_objective

    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, -2.0]])  # sorted: 4, 3, 1, 0, -2
    value, _ = _dlr_targeted_objective(logits, torch.tensor([[0, 2]]))  # y = 0, target 2
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(4 - 3) / (4 - (1 + 0) / 2)
    assert value.item() == pytest.approx(-1 / 3.5)
