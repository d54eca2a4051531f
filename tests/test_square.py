"""Tests for robust.square: schedule and window profile, norm bounds, query budget, oracles."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robust._attack_core import Forward
from robust.checks import SettingError
from robust.square import _eta_cpu, _Square, square, square_p
from tests.tiny_models import distance, generators, linear, small_cnn


def margins(model, x, y):
    with torch.no_grad():
        z = model(x)
    return z.gather(1, y[:, None])[:, 0] - z.scatter(1, y[:, None], -math.inf).amax(1)


# ---------------------------------------------------------------- schedule, profile


def test_p_schedule_halves_at_the_papers_iterations():
    halvings = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]
    for k, bound in enumerate(halvings):
        assert square_p(bound, 0.8, 10000) == 0.8 / 2**k
        assert square_p(bound + 1, 0.8, 10000) == 0.8 / 2 ** (k + 1)
    # AutoAttack does not rescale for its 5,000 queries; the Square Attack code does
    assert square_p(300, 0.8, 5000) == 0.1 and square_p(300, 0.8, 5000, rescale=True) == 0.05


def test_window_profile_matches_torchattacks():
    torchattacks = pytest.importorskip("torchattacks")
    ref_attack = torchattacks.Square(nn.Linear(2, 2), eps=0.1)
    ref_attack.device = torch.device("cpu")
    for s in (3, 5, 8, 11):
        ref = torch.zeros(s, s)
        ref[: s // 2] = ref_attack.eta_rectangles(s // 2, s)
        ref[s // 2 :] = -ref_attack.eta_rectangles(s - s // 2, s)
        ref /= ref.norm()
        torch.testing.assert_close(_eta_cpu(s).float(), ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("channels", [1, 3])
def test_bounds_pixels_and_progress(norm, channels):
    model = small_cnn(channels=channels, size=10)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, channels, 10, 10, generator=g)
    x[:, :, :3] = 0.0  # saturated pixels: clipping must act
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.05 if norm == "inf" else 0.5
    adv = square(model, x, y, eps, norm, n_queries=200, generator=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    assert (distance(adv - x, norm) <= eps * (1 + 1e-5)).all()
    assert (margins(model, adv, y) < margins(model, x, y)).all()  # the search made progress


def test_linf_reaches_the_optimal_vertex_of_a_linear_classifier():
    # A linear binary margin is minimised over the box at x - eps sign(w_y - w_o); Square's
    # proposals are vertices and its last phase flips single pixels, so it must get there.
    model = linear(64, 2)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    g = torch.Generator().manual_seed(3)
    x = 0.4 + 0.2 * torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    u = w[y] - w[1 - y]
    margin = (u * x.flatten(1)).sum(1) + b[y] - b[1 - y]
    eps = 0.8 * (margin / u.abs().sum(1)).min().item()  # nobody gets misclassified
    adv = square(
        model, x, y, eps, "inf", n_queries=3000, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        margins(model, adv, y), margin - eps * u.abs().sum(1), atol=1e-9, rtol=0
    )


def test_l2_never_beats_the_analytic_optimum_of_a_linear_classifier():
    model = linear(64, 2)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    g = torch.Generator().manual_seed(3)
    x = 0.4 + 0.2 * torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    u = w[y] - w[1 - y]
    margin = (u * x.flatten(1)).sum(1) + b[y] - b[1 - y]
    eps = 0.8 * (margin / u.norm(dim=1)).min().item()
    adv = square(model, x, y, eps, "2", n_queries=500, generator=torch.Generator().manual_seed(0))
    got = margins(model, adv, y)
    optimum = margin - eps * u.norm(dim=1)
    assert (got >= optimum - 1e-9).all()
    # random search gets a good part of the way (the comparison above is not vacuous)
    assert ((margin - got) > 0.3 * (margin - optimum)).all()


# ---------------------------------------------------------------- queries, randomness


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += len(x)
        return self.inner(x)


def test_query_budget_per_image_is_the_references():
    # eps far too small to fool anyone: every image spends exactly n_queries + 1 forward passes
    # (the start and n_queries proposals, as fra31/auto-attack's loop over i_iter), plus one
    # clean pass for the batch.
    model = Counting(small_cnn(size=10))
    x = torch.rand(7, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model.inner(x).argmax(1)
    for n_queries in (1, 2, 37):
        model.rows = 0
        square(model, x, y, 1e-4, "inf", n_queries=n_queries)
        assert model.rows == 7 * (2 + n_queries)


def test_fooled_images_stop_and_stay_adversarial():
    model = Counting(linear(100, 5, dtype=torch.float32))
    x = torch.rand(32, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model.inner(x).argmax(1)
    adv = square(model, x, y, 0.2, "inf", n_queries=300, generator=generators(range(32)))
    fooled = margins(model.inner, adv, y) <= 0
    assert 0.5 < fooled.float().mean() < 1
    assert model.rows < 32 * 300 * 0.8  # finished images left the batch
    # an image that stays robust spends the whole budget: at least (robust images) * 300 rows
    assert model.rows >= 32 + (~fooled).sum().item() * 300


class TieAtGrey(nn.Module):
    """Logits ``(0, sum(x - 0.5))``: an exact tie at grey images, which ``argmax`` calls class 0."""

    def forward(self, x):
        z1 = (x - 0.5).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(z1), z1], dim=1)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_an_exact_tie_counted_correct_is_attacked_not_taken_as_fooled(norm):
    # argmax calls the tied image correct, so the attack must go on and push z1 above 0
    x0 = torch.full((3, 1, 10, 10), 0.5)
    model = TieAtGrey()
    y = torch.zeros(3, dtype=torch.long)
    assert (model(x0).argmax(1) == y).all()
    eps = 0.05 if norm == "inf" else 0.5
    adv = square(model, x0, y, eps, norm, n_queries=20, generator=generators(range(3)))
    assert (model(adv).argmax(1) == 1).all()


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_one_generator_per_sample_makes_results_batch_independent(norm):
    model = small_cnn(channels=3, size=10).double()
    x = torch.rand(6, 3, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.05 if norm == "inf" else 0.5
    together = square(model, x, y, eps, norm, n_queries=60, generator=generators(range(6)))
    alone = torch.cat(
        [
            square(
                model,
                x[i : i + 1],
                y[i : i + 1],
                eps,
                norm,
                n_queries=60,
                generator=generators([i]),
            )
            for i in range(6)
        ]
    )
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)
    shared = square(
        model, x, y, eps, norm, n_queries=60, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(shared, together)


def test_restarts_never_weaker():
    model = small_cnn(seed=4, size=10)
    x = torch.rand(48, 1, 10, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmax(1)
    runs = {
        r: square(
            model, x, y, 0.05, "inf", n_queries=30, restarts=r, generator=generators(range(48))
        )
        for r in (1, 3)
    }
    m = {r: margins(model, v, y) for r, v in runs.items()}
    assert (m[3] <= m[1]).all() and (m[3] < m[1]).any()


def test_inside_inference_mode_matches_outside_and_modes_restored():
    model = nn.Sequential(small_cnn(size=10), nn.Dropout(0.5))
    model.train()
    model[0][0].eval()
    before = [m.training for m in model.modules()]
    x = torch.rand(8, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 5
    ref = square(model, x, y, 0.1, "2", n_queries=20, generator=generators(range(8)))
    assert [m.training for m in model.modules()] == before
    with torch.inference_mode():
        got = square(
            model, x.clone(), y.clone(), 0.1, "2", n_queries=20, generator=generators(range(8))
        )
    assert torch.equal(got, ref)


def test_validation():
    model = small_cnn(size=10)
    x, y = torch.rand(2, 1, 10, 10), torch.tensor([0, 1])
    for kwargs, setting in (
        ({"n_queries": 0}, "square n_queries must be an integer >= 1"),
        ({"p_init": 0.0}, "square p_init must be a number in"),
        ({"restarts": 0}, "square restarts"),
    ):
        with pytest.raises(SettingError, match=setting):
            square(model, x, y, 0.1, "inf", **kwargs)
    with pytest.raises(ValueError, match="B, C, H, W"):
        square(model, x.flatten(1), y, 0.1, "inf")


def test_windows_reach_every_position_the_reference_code_skips_the_last(monkeypatch):
    model = small_cnn(size=10)
    x = torch.rand(2, 1, 10, 10)
    run = _Square(
        Forward(model, False), x, torch.zeros(2, dtype=torch.long), 0.1, "inf", 10, 0.8, False
    )
    u = torch.tensor([0.0, 1.0 - 1e-7])  # the first and the last draw
    mask, _, _ = run.window(u, u, 3)
    assert mask[0, 0, :3, :3].all() and mask[1, 0, 7:, 7:].all()  # the last rows and columns
    monkeypatch.setattr(_Square, "reference_window_range", True)
    mask, _, _ = run.window(u, u, 3)
    assert mask[1, 0, 6:9, 6:9].all() and not mask[:, 0, 9].any() and not mask[:, 0, :, 9].any()


@pytest.mark.parametrize("channels", [1, 3])
def test_an_l2_step_keeps_the_perturbation_on_the_sphere_of_radius_eps(channels):
    # Andriushchenko et al. (2020), Alg. 3: the new windows take each channel's own mass there
    # plus its share of the room left, so a perturbation of norm eps keeps norm eps and the
    # final rescale leaves the rest of it untouched. Summing the whole image's window mass into
    # every channel (torchattacks, fra31 before its 2021 fix) overshot on RGB images, and the
    # rescale then shrank the rest of the perturbation at every step.
    generator = torch.Generator().manual_seed(0)
    eps, size = 0.5, 12
    x = torch.full((4, channels, size, size), 0.5)
    delta = torch.randn(x.shape, generator=generator)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    y = torch.zeros(4, dtype=torch.long)
    model = small_cnn(channels=channels, size=size)
    run = _Square(Forward(model, False), x, y, eps, "2", 100, 0.3, False)
    u = torch.rand(4, run.k, generator=generator)
    proposed = run.propose(10, x, x + delta, u)
    s = run.side(10)
    windows = run.window(u[:, 0], u[:, 1], s)[0] | run.window(u[:, 2], u[:, 3], s)[0]
    new = proposed - x
    assert new.flatten(1).norm(dim=1) == pytest.approx(eps, rel=1e-5)
    torch.testing.assert_close(torch.where(windows, 0.0, new), torch.where(windows, 0.0, delta))
    assert (new - delta).abs().amax() > 0.01  # the windows did change


@pytest.mark.parametrize("channels", [1, 3])
def test_an_l2_step_inside_the_ball_gives_each_channel_its_share_of_the_room(channels):
    """Alg. 3: a channel's new window mass is its old one plus (eps^2 - ||delta||^2) / C.

    At ||delta|| = eps the room is 0 and the share never showed; the whole room for every channel
    (torchattacks' formula) gave C times too much, which the final rescale then took back from
    the rest of the perturbation.
    """
    generator = torch.Generator().manual_seed(1)
    eps, size = 1.0, 12
    x = torch.full((4, channels, size, size), 0.5)
    delta = torch.randn(x.shape, generator=generator)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.5 * eps  # half the radius
    model = small_cnn(channels=channels, size=size)
    run = _Square(
        Forward(model, False), x, torch.zeros(4, dtype=torch.long), eps, "2", 100, 0.3, False
    )
    u = torch.rand(4, run.k, generator=generator)
    proposed = run.propose(10, x, x + delta, u)
    s = run.side(10)
    windows = run.window(u[:, 0], u[:, 1], s)[0] | run.window(u[:, 2], u[:, 3], s)[0]
    in_windows = lambda v: (v * windows).square().sum(dim=(2, 3))  # noqa: E731 - (B, C)
    room = (eps**2 - delta.flatten(1).square().sum(1)) / channels  # (B,)
    torch.testing.assert_close(in_windows(proposed - x), in_windows(delta) + room[:, None])
    assert (proposed - x).flatten(1).norm(dim=1) == pytest.approx(eps, rel=1e-5)


def test_l2_windows_have_an_odd_side_so_their_profile_has_a_centre():
    for size in (8, 12, 28, 32):
        run = _Square(
            None, torch.zeros(1, 1, size, size), torch.zeros(1), 1.0, "2", 5000, 0.8, False
        )
        sides = {run.side(t) for t in range(0, 5000, 7)}
        assert all(s % 2 for s in sides) and len(sides) > 2, (size, sides)


def test_a_proposal_that_does_not_lower_the_margin_is_not_taken():
    """The reference accepts a proposal only if its margin is strictly lower."""

    class Flat(nn.Module):  # the same margin everywhere: no proposal is better than the start
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return torch.tensor([1.0, 0.0]).expand(len(v), 2) + 0 * v.flatten(1)[:, :1]

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(3, dtype=torch.long)
    for norm in ("inf", "2"):
        start = square(Flat(), x, y, 0.1, norm, n_queries=1, generator=generators(range(3)))
        later = square(Flat(), x, y, 0.1, norm, n_queries=30, generator=generators(range(3)))
        assert not torch.equal(start, x)  # the start moved...
        assert torch.equal(later, start), norm  # ...and no equal-margin proposal replaced it
