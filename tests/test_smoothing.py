"""Tests for robust.smoothing / robust.statistics (Cohen, Rosenfeld & Kolter 2019).

Oracles: statsmodels/scipy for the bounds, closed forms for a constant and a linear base
classifier (coverage of the certificate over repeated runs), ART's PyTorchRandomizedSmoothing as
a peer implementation; for the notebook API, the caller's module (untouched by channels_last) and
runs at other batch sizes. Noise seeds, precision and static shapes: ``test_smoothing_noise.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from statsmodels.stats.proportion import binom_test, proportion_confint
from torch import nn

from robust import smoothing
from robust.smoothing import ABSTAIN, PREDICTION_STREAM, Certificate, Smooth
from robust.statistics import binomial_pvalue, clopper_pearson_lower, smallest_useful_n
from tests.tiny_models import small_cnn

# ----------------------------------------------------------------------------- helpers


class Constant(nn.Module):
    """Base classifier that always predicts ``label``."""

    def __init__(self, num_classes: int, label: int) -> None:
        super().__init__()
        self.num_classes, self.label = num_classes, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        logits[:, self.label] = 1.0
        return logits


class LinearBinary(nn.Module):
    """f(x) = 1[w . x + b > 0] in pixel space, as two logits (0, w . x + b)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w.flatten().float())
        self.b = float(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


class NearestCenter(nn.Module):
    """Predicts the nearest of a few constant images (centers[k] = k / (K - 1))."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.flatten(1).mean(1, keepdim=True)
        centers = torch.linspace(0, 1, self.num_classes, device=x.device)
        return -((level - centers) ** 2)


def linear_setup(margin_sigmas: float, sigma: float = 0.5, dim: int = 16):
    """A linear classifier and a point x whose true smoothed p_1 is Phi(margin_sigmas).

    Returns (model, x, true radius of class 1 = (w . x + b) / ||w||).
    """
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    x = torch.rand(dim, generator=gen, dtype=torch.float64)
    margin = margin_sigmas * sigma * w.norm().item()  # w . x + b
    b = margin - float(w @ x)
    return LinearBinary(w, b), x.float().view(1, 4, 4), margin / w.norm().item()


def failure_threshold(trials: int, alpha: float) -> int:
    """Upper 1e-4 quantile of Binomial(trials, alpha): failures an honest alpha-bound may show."""
    return int(binom.ppf(1 - 1e-4, trials, alpha))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def count_failures(
    margin_sigmas: float, trials: int, n0: int, n: int, alpha: float, device: str = "cpu"
) -> int:
    """Certify one point `trials` times (independent noise via distinct indices); count failures.

    A failure is a non-abstaining certificate whose radius exceeds the true radius of its class:
    R_1 = (w . x + b) / ||w|| for class 1 and -R_1 for class 0 (x is on the other side).
    """
    sigma = 0.5
    model, x, true_radius = linear_setup(margin_sigmas, sigma)
    smooth = Smooth(model.to(device), 2, sigma, batch_size=4096)
    certs = smooth.certify_batch(x.expand(trials, 1, 4, 4), range(trials), n0, n, alpha)
    failures = 0
    for cert in certs:
        if cert.abstained:
            continue
        radius_of_class = true_radius if cert.prediction == 1 else -true_radius
        failures += cert.radius > radius_of_class
    return failures


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_clopper_pearson_matches_statsmodels(alpha: float) -> None:
    for n in [1, 2, 5, 10, 37, 100, 1000]:
        ks = np.unique(np.linspace(0, n, 25).round().astype(int))
        vector = clopper_pearson_lower(ks, n, alpha)
        for k, got in zip(ks, vector, strict=True):
            # statsmodels' interval is two-sided: its lower end at 2 * alpha is our one-sided bound.
            expected = proportion_confint(int(k), n, alpha=2 * alpha, method="beta")[0]
            expected = 0.0 if np.isnan(expected) else expected
            assert clopper_pearson_lower(int(k), n, alpha) == pytest.approx(expected, abs=1e-12)
            assert got == pytest.approx(expected, abs=1e-12)


def test_clopper_pearson_edge_values() -> None:
    assert clopper_pearson_lower(0, 10, 0.01) == 0.0
    # k = n: the bound is alpha ** (1 / n).
    assert clopper_pearson_lower(10, 10, 0.01) == pytest.approx(0.01**0.1, rel=1e-12)
    assert isinstance(clopper_pearson_lower(3, 10, 0.01), float)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower(3, 10, 1.0)
    with pytest.raises(ValueError, match="k must satisfy"):
        clopper_pearson_lower(11, 10, 0.01)
    with pytest.raises(ValueError, match="n must be"):
        clopper_pearson_lower(0, 0, 0.01)


def test_binomial_pvalue_matches_statsmodels() -> None:
    for n_a in [0, 1, 3, 10, 50, 51, 120]:
        for n_b in [0, 1, 2, 10, 49, 100]:
            if n_a + n_b == 0:
                assert binomial_pvalue(n_a, n_b) == 1.0
                continue
            expected = binom_test(n_a, n_a + n_b, prop=0.5, alternative="two-sided")
            assert binomial_pvalue(n_a, n_b) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("alpha", [0.5, 0.25, 0.1, 0.05, 0.001, 1e-5, 2.0**-10, 1e-12])
def test_smallest_useful_n_is_smallest(alpha: float) -> None:
    n = smallest_useful_n(alpha)
    assert clopper_pearson_lower(n, n, alpha) > 0.5
    assert n == 1 or clopper_pearson_lower(n - 1, n - 1, alpha) <= 0.5


# ----------------------------------------------------------------------------- CERTIFY


@pytest.mark.parametrize(
    ("n", "alpha", "sigma"), [(10, 0.001, 0.25), (1000, 0.001, 0.5), (77, 0.1, 1.0)]
)
def test_constant_classifier_radius_is_exact(n: int, alpha: float, sigma: float) -> None:
    smooth = Smooth(Constant(4, 2), 4, sigma, batch_size=37, noise_block=16)
    certs = smooth.certify_batch(torch.rand(3, 1, 5, 5), [0, 1, 2], 13, n, alpha)
    for cert in certs:
        assert cert.prediction == 2 and cert.count_a == n
        assert cert.radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-12)


def test_constant_classifier_abstains_below_smallest_useful_n() -> None:
    alpha = 0.001
    n = smallest_useful_n(alpha) - 1
    prediction, radius = Smooth(Constant(3, 0), 3, 0.5).certify(
        torch.rand(1, 4, 4), 5, n, alpha, index=0
    )
    assert (prediction, radius) == (ABSTAIN, 0.0)


@pytest.mark.parametrize(("n", "alpha"), [(1, 0.5), (2, 0.25), (10, 2.0**-10)])
def test_a_lower_bound_of_exactly_one_half_abstains(n: int, alpha: float) -> None:
    """p_A = 1/2 allows a tie: CERTIFY returns a class only when p_A > 1/2 (Algorithm 1)."""
    assert clopper_pearson_lower(n, n, alpha) == 0.5 and smallest_useful_n(alpha) == n + 1
    smooth = Smooth(Constant(3, 0), 3, 0.5)
    prediction, radius = smooth.certify(torch.rand(1, 4, 4), 5, n, alpha, index=0)
    assert (prediction, radius) == (ABSTAIN, 0.0)  # it was class 0 at radius 0
    prediction, radius = smooth.certify(torch.rand(1, 4, 4), 5, n + 1, alpha, index=0)
    assert prediction == 0 and radius > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin_sigmas", [0.0, 0.5, 1.5])
def test_coverage_linear_classifier(margin_sigmas: float, device: str) -> None:
    """Soundness: the certified radius exceeds the true radius in at most an alpha fraction."""
    trials, alpha = 3000, 0.1
    failures = count_failures(margin_sigmas, trials, n0=100, n=100, alpha=alpha, device=device)
    assert failures <= failure_threshold(trials, alpha)


def test_coverage_detects_point_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coverage check fails for an optimistic bound (the point estimate n_A / n)."""
    monkeypatch.setattr(smoothing, "clopper_pearson_lower", lambda k, n, alpha: np.asarray(k) / n)
    trials, alpha = 3000, 0.1
    assert count_failures(0.5, trials, 100, 100, alpha) > failure_threshold(trials, alpha)


def test_coverage_detects_reused_selection_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coverage check fails when the selection samples are reused for estimation.

    At the decision boundary (true p = 1/2) reuse makes n_A = max(count_0, count_1), which
    roughly doubles the failure rate.
    """
    monkeypatch.setattr(smoothing, "ESTIMATION_STREAM", smoothing.SELECTION_STREAM)
    trials, alpha = 3000, 0.1
    assert count_failures(0.0, trials, 100, 100, alpha) > failure_threshold(trials, alpha)


def test_radius_approaches_true_radius() -> None:
    sigma, alpha = 0.5, 0.001
    model, x, true_radius = linear_setup(1.5, sigma)
    smooth = Smooth(model, 2, sigma, batch_size=10_000)
    gaps = []
    for n in [1_000, 100_000]:
        prediction, radius = smooth.certify(x, 100, n, alpha, index=7)
        assert prediction == 1
        gaps.append(true_radius - radius)
    # Clopper-Pearson shrinks like 1/sqrt(n): at n = 1e5 the gap is ~0.02 sigma.
    assert 0 < gaps[1] < gaps[0]
    assert gaps[1] < 0.04 * sigma


def test_counts_go_to_their_own_image() -> None:
    """Packing many images per forward batch must not mix their counts."""
    num_classes = 5
    labels = [0, 3, 1, 4, 2, 2, 0, 1]
    images = torch.stack([torch.full((1, 6, 6), k / (num_classes - 1)) for k in labels])
    smooth = Smooth(NearestCenter(num_classes), num_classes, 0.05, batch_size=37, noise_block=8)
    certs = smooth.certify_batch(images, range(len(labels)), 10, 50, 0.001)
    assert [c.prediction for c in certs] == labels
    assert all(c.count_a == 50 for c in certs)


def test_certificate_fields() -> None:
    model, x, _ = linear_setup(1.0)
    cert = Smooth(model, 2, 0.5).certify_batch(x.unsqueeze(0), [11], 20, 500, 0.01)[0]
    assert isinstance(cert, Certificate)
    assert (cert.index, cert.n0, cert.n, cert.alpha) == (11, 20, 500, 0.01)
    assert cert.p_a_lower == pytest.approx(clopper_pearson_lower(cert.count_a, 500, 0.01))
    assert cert.radius == pytest.approx(0.5 * norm.ppf(cert.p_a_lower))
    assert cert.prediction == cert.top_class == 1 and not cert.abstained
    # Indices may come as a tensor (e.g. from a DataLoader).
    again = Smooth(model, 2, 0.5).certify_batch(x.unsqueeze(0), torch.tensor([11]), 20, 500, 0.01)
    assert again == [cert]


# ----------------------------------------------------------------------------- reproducibility


def _random_images(count: int, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("device", DEVICES)
def test_reproducible_across_batch_size_order_and_packing(device: str) -> None:
    model = small_cnn(seed=3).to(device)
    images = _random_images(6)
    indices = [3, 17, 5, 0, 42, 8]
    n0, n, alpha = 30, 170, 0.01

    def run(
        batch_size: int, order: list[int], threads: int | None = None
    ) -> dict[int, Certificate]:
        smooth = Smooth(model, 5, 0.5, batch_size=batch_size, noise_block=50, noise_threads=threads)
        certs = smooth.certify_batch(images[order], [indices[i] for i in order], n0, n, alpha)
        return {c.index: c for c in certs}

    reference = run(1000, list(range(6)))
    assert run(37, list(range(6))) == reference  # blocks straddle forward batches
    assert run(50, list(range(6))) == reference  # blocks align with forward batches
    assert run(37, [5, 2, 0, 4, 1, 3]) == reference  # another order
    assert run(7, [4, 1]) | run(1000, [0, 2, 3, 5]) == reference  # other packing
    for threads in (1, 2, 3):  # blocks drawn one at a time or in waves of 2 or 3 threads
        assert run(37, list(range(6)), threads) == reference
        assert run(120, list(range(6)), threads) == reference  # several batches per wave
    single = Smooth(model, 5, 0.5, batch_size=64, noise_block=50)
    for i, index in enumerate(indices):
        cert = reference[index]
        assert single.certify(images[i], n0, n, alpha, index=index) == (
            cert.prediction,
            cert.radius,
        )
    # The noise really depends on the seed (else the equalities above would be vacuous).
    other = Smooth(model, 5, 0.5, batch_size=1000, noise_block=50, seed=1)
    counts = [c.count_a for c in other.certify_batch(images, indices, n0, n, alpha)]
    assert counts != [reference[i].count_a for i in indices]


def test_predict_reproducible_across_batch_size() -> None:
    model = small_cnn(seed=3)
    images = _random_images(5)
    small, large = (Smooth(model, 5, 0.5, batch_size=b, noise_block=20) for b in (13, 999))
    assert small.predict_batch(images, range(5), 90, 0.1) == large.predict_batch(
        images, range(5), 90, 0.1
    )
    # the class counts behind the predictions, not only the predictions, are the same
    streams = [(PREDICTION_STREAM, 90)]
    counts = small._sample_counts(images, list(range(5)), streams, None)
    assert np.array_equal(counts, large._sample_counts(images, list(range(5)), streams, None))
    other = Smooth(model, 5, 0.5, batch_size=13, noise_block=20, seed=1)  # the control
    assert not np.array_equal(counts, other._sample_counts(images, list(range(5)), streams, None))


def test_channels_last_draws_the_same_noise() -> None:
    """The noise is drawn in NCHW order whatever the layout: channels_last changes only rounding."""
    for channels in (1, 3):
        images = _random_images(3, channels=channels)
        plain = Smooth(small_cnn(seed=3, channels=channels), 5, 0.5, noise_block=40).certify_batch(
            images, [0, 1, 2], 20, 100, 0.01
        )
        for batch_size in (33, 500):
            cl = Smooth(
                small_cnn(seed=3, channels=channels),
                5,
                0.5,
                batch_size=batch_size,
                noise_block=40,
                channels_last=True,
            ).certify_batch(images, [0, 1, 2], 20, 100, 0.01)
            assert cl == plain


def test_bf16_autocast_runs() -> None:
    model, x, true_radius = linear_setup(1.5)
    smooth = Smooth(model, 2, 0.5, autocast_dtype=torch.bfloat16)
    prediction, radius = smooth.certify(x, 50, 2000, 0.001, index=0)
    assert prediction == 1 and 0 < radius < true_radius + 0.05


# ----------------------------------------------------------------------------- modes


class ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Dropout(0.5)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training or self.inner.training)
        return torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], dim=1)


def test_eval_mode_during_certification_and_modes_restored() -> None:
    model = ModeRecorder()
    model.train()
    model.inner.eval()  # mixed modes must come back exactly
    smooth = Smooth(model, 2, 0.5, batch_size=16)
    smooth.certify(torch.rand(1, 3, 3), 10, 40, 0.01, index=0)
    assert model.seen and not any(model.seen)
    assert model.training and not model.inner.training


def test_works_inside_inference_mode_and_with_grad_enabled() -> None:
    model, x, _ = linear_setup(1.0)
    smooth = Smooth(model, 2, 0.5)
    with torch.inference_mode():
        inside = smooth.certify(x, 20, 200, 0.01, index=0)
    assert smooth.certify(x.requires_grad_(), 20, 200, 0.01, index=0) == inside


# ----------------------------------------------------------------------------- PREDICT


def test_predict_abstains_on_fifty_fifty_classifier() -> None:
    model, x, _ = linear_setup(0.0)  # x on the decision boundary: p = 1/2 for both classes
    predictions = Smooth(model, 2, 0.5).predict_batch(x.expand(20, 1, 4, 4), range(20), 1000, 0.001)
    assert predictions == [ABSTAIN] * 20


def test_predict_returns_class_of_constant_classifier() -> None:
    smooth = Smooth(Constant(10, 7), 10, 0.25)
    assert smooth.predict(torch.rand(1, 4, 4), 100, 0.001, index=0) == 7
    # Too few samples for the test to reject p = 1/2: abstain.
    assert smooth.predict(torch.rand(1, 4, 4), 5, 0.001, index=0) == ABSTAIN


class ThreeLevels(nn.Module):
    """Class 0, 1 or 2 as a single pixel is below, between or above two thresholds."""

    def __init__(self, probabilities: tuple[float, float]) -> None:
        super().__init__()
        self.register_buffer("cuts", torch.tensor([norm.ppf(p) for p in probabilities]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = torch.bucketize(x.flatten(1)[:, 0].contiguous(), self.cuts.to(x.dtype))
        return nn.functional.one_hot(level, 3).to(x.dtype)


def test_predict_tests_the_top_class_against_the_runner_up_not_all_others() -> None:
    """Cohen et al.'s Algorithm 1: n_A against n_B; p_A = 0.52 is no majority of all samples."""
    smooth = Smooth(ThreeLevels((0.52, 0.82)), 3, 1.0)  # p = 0.52, 0.30, 0.18 at x = 0
    images = torch.zeros(12, 1, 1, 1)
    predictions = smooth.predict_batch(images, range(12), 1000, 0.001)
    counts = smooth._sample_counts(images, list(range(12)), [(PREDICTION_STREAM, 1000)], None)
    for prediction, (n_a, n_b, n_c) in zip(predictions, counts[:, 0], strict=True):
        assert n_a > n_b > n_c
        assert binom_test(int(n_a), int(n_a + n_b), 0.5) <= 0.001  # against the runner-up: 0
        assert binom_test(int(n_a), 1000, 0.5) > 0.001  # against all others: it would abstain
        assert prediction == 0


def test_noise_threads_and_batch_size_changed_between_calls() -> None:
    """A buffer of the same size for another (batch size, threads) pair is not reused wrongly."""
    model, images = small_cnn(seed=3), _random_images(3)
    smooth = Smooth(model, 5, 0.5, noise_block=5, batch_size=10, noise_threads=2)
    streams = [(PREDICTION_STREAM, 100)]
    first = smooth._sample_counts(images, [0, 1, 2], streams, None)  # 10 + 2 * 5 rows
    smooth.noise_threads = 1
    second = smooth._sample_counts(images, [0, 1, 2], streams, 15)  # 15 + 1 * 5 rows
    assert np.array_equal(first, second)
    assert smooth.predict_batch(images, [0, 1, 2], 100, 0.01, batch_size=15) == (
        Smooth(model, 5, 0.5, noise_block=5, batch_size=10).predict_batch(
            images, [0, 1, 2], 100, 0.01
        )
    )


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": math.nan}, "sigma"),
        ({"num_classes": 1}, "num_classes"),
        ({"batch_size": 0}, "batch_size"),
        ({"noise_block": 0}, "noise_block"),
        ({"seed": -1}, "seed"),
        ({"autocast_dtype": torch.float64}, "autocast_dtype"),
        ({"noise_threads": 0}, "noise_threads"),
        ({"pairwise_pool": "yes"}, "pairwise_pool"),
    ],
)
def test_construction_validation(kwargs: dict, name: str) -> None:
    settings = {"num_classes": 3, "sigma": 0.5} | kwargs
    num_classes, sigma = settings.pop("num_classes"), settings.pop("sigma")
    with pytest.raises(ValueError, match=name):
        Smooth(Constant(3, 0), num_classes, sigma, **settings)


@pytest.mark.parametrize(
    ("n0", "n", "alpha", "name"),
    [(0, 10, 0.01, "n0"), (5, 0, 0.01, "n"), (5, 10, 0.0, "alpha"), (5, 10, 1.0, "alpha")],
)
def test_call_validation(n0: int, n: int, alpha: float, name: str) -> None:
    smooth = Smooth(Constant(3, 0), 3, 0.5)
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        smooth.certify(torch.rand(1, 4, 4), n0, n, alpha, index=0)
    if name != "n0":
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            smooth.predict(torch.rand(1, 4, 4), n, alpha, index=0)


def test_a_float_or_bool_count_is_refused_even_after_its_integer_was_accepted() -> None:
    # the check was cached by value, and 100 == 100.0, 1 == True: a bad value then passed
    smooth = Smooth(Constant(3, 0), 3, 0.5)
    for good, bad in ((100, 100.0), (1, True)):
        assert smoothing.check_num_samples("n", good, 1000) == good
        smooth.predict(torch.rand(1, 4, 4), good, 0.01, index=0)
        with pytest.raises(ValueError, match=r"^n must be an integer"):
            smoothing.check_num_samples("n", bad, 1000)
        with pytest.raises(ValueError, match=r"^n must be an integer"):
            smooth.predict(torch.rand(1, 4, 4), bad, 0.01, index=0)


def test_batch_validation() -> None:
    smooth = Smooth(Constant(3, 0), 3, 0.5)
    with pytest.raises(ValueError, match="indices"):
        smooth.certify_batch(torch.rand(2, 1, 4, 4), [0], 5, 10, 0.01)
    with pytest.raises(ValueError, match="indices"):
        smooth.certify_batch(torch.rand(1, 1, 4, 4), [-1], 5, 10, 0.01)
    with pytest.raises(ValueError, match="num_classes"):
        Smooth(Constant(3, 0), 4, 0.5).certify(torch.rand(1, 4, 4), 5, 10, 0.01, index=0)


# ----------------------------------------------------------------------------- peer: ART


def _train_tiny_mlp(centers: torch.Tensor, sigma: float) -> nn.Module:
    """A 16-32-3 MLP trained on Gaussian-noise-augmented samples around three centers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread wake-ups would dominate
    try:
        for _ in range(200):
            labels = torch.randint(0, 3, (256,))
            x = centers[labels] + sigma * torch.randn(256, 1, 4, 4)
            loss = nn.functional.cross_entropy(model(x), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_agrees_with_art_randomized_smoothing() -> None:
    art_rs = pytest.importorskip("art.estimators.certification.randomized_smoothing")
    sigma, alpha, n0, n = 0.5, 0.001, 100, 20_000
    centers = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    model = _train_tiny_mlp(centers, sigma)
    # Centers and points towards another center: top-class probabilities ~0.93, ~0.85, ~0.71
    # (far enough from a tie that both implementations select the same class w.h.p.).
    t = torch.tensor([0.0, 0.15, 0.3]).view(-1, 1, 1, 1)
    points = torch.cat(
        [(1 - t) * centers[0] + t * centers[1], (1 - t) * centers[2] + t * centers[1]]
    )

    ours = Smooth(model, 3, sigma, batch_size=5000).certify_batch(
        points, range(len(points)), n0, n, alpha
    )
    np.random.seed(0)  # ART draws its noise from NumPy's global generator
    art = art_rs.PyTorchRandomizedSmoothing(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 4, 4),
        nb_classes=3,
        device_type="cpu",
        sample_size=n0,  # ART's selection samples; certify's n is the estimation samples
        scale=sigma,
        alpha=alpha,
    )
    art_pred, art_radius = art.certify(points.numpy(), n=n, batch_size=5000)

    z_scores = []
    for cert, pred_b, radius_b in zip(ours, art_pred, art_radius, strict=True):
        assert not cert.abstained and cert.prediction == pred_b
        # Both radii are sigma * Phi^-1(Clopper-Pearson bound of an independent Binomial(n, p_A)
        # count); compare the bounds in units of the standard deviation of their difference.
        p = cert.count_a / n
        assert 0.6 < p < 0.99  # not saturated: the bound depends on the count
        p_lower_art = norm.cdf(radius_b / sigma)
        z_scores.append((cert.p_a_lower - p_lower_art) / math.sqrt(2 * p * (1 - p) / n))
    assert max(abs(z) for z in z_scores) < 5
    assert abs(sum(z_scores)) / math.sqrt(len(z_scores)) < 4


# ----------------------------------------------------------------------------- notebook API


def test_index_and_batch_size_are_keyword_only() -> None:
    """locuslab's certify(x, n0, n, alpha, batch_size) must not run with index=batch_size."""
    model, x, _ = linear_setup(1.0)
    smooth = Smooth(model, 2, 0.5, batch_size=64)
    with pytest.raises(TypeError):
        smooth.certify(x, 20, 200, 0.01, 1000)
    with pytest.raises(TypeError):
        smooth.predict(x, 200, 0.01, 1000)
    # and required: images certified without their indices would share their noise
    with pytest.raises(TypeError, match="index"):
        smooth.certify(x, 20, 200, 0.01)
    with pytest.raises(TypeError, match="index"):
        smooth.predict(x, 200, 0.01)
    # batch_size=None is the instance's; another batch size changes nothing; index seeds the noise.
    reference = smooth.certify(x, 20, 200, 0.01, index=4)
    assert smooth.certify(x, 20, 200, 0.01, index=4, batch_size=None) == reference
    assert smooth.certify(x, 20, 200, 0.01, index=4, batch_size=7) == reference
    cert = smooth.certify_batch(x.unsqueeze(0), [4], 20, 200, 0.01, batch_size=1000)[0]
    assert (cert.prediction, cert.radius) == reference
    others = {smooth.certify_batch(x.unsqueeze(0), [i], 20, 200, 0.01)[0].count_a for i in range(8)}
    assert len(others) > 1
    predicted = smooth.predict(x, 300, 0.01, index=2)
    assert predicted == smooth.predict_batch(x.unsqueeze(0), [2], 300, 0.01, batch_size=9)[0]


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize("inference", [False, True])
def test_channels_last_leaves_the_callers_model_untouched(inference: bool) -> None:
    """channels_last evaluates a private copy: the caller's parameters keep layout, storage, grad."""
    model = _conv_model()
    before = {
        name: (p.data_ptr(), p.stride(), p.detach().clone()) for name, p in model.named_parameters()
    }
    images = _random_images(2, channels=3)
    with torch.inference_mode(inference):
        smooth = Smooth(model, 3, 0.5, channels_last=True, noise_block=50)
        smooth.certify_batch(images, [0, 1], 10, 100, 0.01)
    for name, p in model.named_parameters():
        ptr, stride, value = before[name]
        assert (p.data_ptr(), p.stride()) == (ptr, stride) and torch.equal(p, value)
        assert p.requires_grad and not p.is_inference()
    assert model.training  # the caller's mode is not touched either
    # The model can still be trained (its weights are no inference tensors).
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None


def test_channels_last_copy_follows_the_callers_weights() -> None:
    """Weights changed after construction (training in a notebook) are the ones certified."""
    model = _conv_model()
    smooth = Smooth(model, 3, 0.25, channels_last=True)
    images = _random_images(2, channels=3)
    with torch.no_grad():  # make f constant: class 2 everywhere
        for p in model.parameters():
            p.zero_()
        model[3].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    certs = smooth.certify_batch(images, [0, 1], 10, 100, 0.01)
    assert [(c.prediction, c.count_a) for c in certs] == [(2, 100), (2, 100)]


def test_channels_last_cuda_graph_is_refused_on_cuda():
    """The combination crashed the GPU (illegal memory access, H200, torch 2.11): refused up front."""
    from robust.checks import SettingError

    with pytest.raises(SettingError, match="channels_last=True with cuda_graph=True"):
        Smooth(nn.Linear(4, 2), 2, 0.5, channels_last=True, cuda_graph=True, device="cuda")
    Smooth(nn.Linear(4, 2), 2, 0.5, channels_last=True, cuda_graph=True, device="cpu")  # ignored
