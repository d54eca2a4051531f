"""Confidence bounds and tests used by randomized-smoothing certification.

Cohen, Rosenfeld & Kolter (2019), "Certified Adversarial Robustness via Randomized Smoothing"
(arXiv 1902.02918): CERTIFY needs a one-sided Clopper-Pearson lower bound on p_A (Algorithm 1,
``LowerConfBound``) and PREDICT a two-sided binomial test of the top two counts (``BinomPValue``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import beta, binomtest, norm

from robust.checks import SettingError, check_real

__all__ = [
    "binomial_pvalue",
    "certifiable_neighbours",
    "clopper_pearson_lower",
    "largest_certified_radius",
    "nearest_certifiable_radius",
    "smallest_useful_n",
    "warn_if_useless_n",
]


def clopper_pearson_lower(k: ArrayLike, n: ArrayLike, alpha: float) -> float | np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion.

    The bound is the alpha quantile of Beta(k, n - k + 1) (Clopper & Pearson 1934), and 0 when
    k = 0. It equals ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=2 * alpha,
    method="beta")[0]``, the form used by Cohen et al. (2019), Algorithm 1.

    Args:
        k: Number of successes (0 <= k <= n); scalar or array.
        n: Number of trials (n >= 1); scalar or array broadcastable with ``k``.
        alpha: One-sided failure probability in (0, 1).

    Returns:
        The lower bound: a float for scalar inputs, else an array of the broadcast shape.

    Raises:
        SettingError: If alpha is outside (0, 1), n < 1, or k is outside [0, n].

    Examples:
        >>> round(clopper_pearson_lower(990, 1000, 0.001), 4)
        0.976
        >>> clopper_pearson_lower(10, 10, 0.01) == 0.01 ** (1 / 10)  # k = n: alpha ** (1 / n)
        True
    """
    alpha = check_real("alpha", alpha, low=0, high=1)
    k_arr = np.asarray(k)
    n_arr = np.asarray(n)
    if np.any(n_arr < 1):
        raise SettingError(f"n must be >= 1; got {n!r}")
    if np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise SettingError(f"k must satisfy 0 <= k <= n; got k={k!r}, n={n!r}")
    k_f = k_arr.astype(np.float64)
    n_f = n_arr.astype(np.float64)
    # Beta(0, .) is degenerate; the k = 0 bound is 0 by definition, so evaluate at a safe k there.
    lower = np.where(k_f == 0, 0.0, beta.ppf(alpha, np.maximum(k_f, 1.0), n_f - k_f + 1.0))
    return float(lower) if lower.ndim == 0 else lower


def largest_certified_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n samples: sigma * Phi^-1(alpha ** (1 / n)).

    All n samples on the top class give the largest lower bound on p_A (Cohen et al. 2019,
    Algorithm 1 and Theorem 1), so no certificate with these settings goes beyond this radius.

    Examples:
        >>> round(largest_certified_radius(0.25, 100_000, 0.001), 4)
        0.9529
    """
    bound = clopper_pearson_lower(n, n, alpha)
    return float(sigma) * float(norm.ppf(bound))


def certifiable_neighbours(
    radii: ArrayLike, sigma: float, n: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each radius, the certifiable radii next to it: the largest below, the smallest at or above.

    CERTIFY returns ``sigma * Phi^-1(p)`` with ``p`` the Clopper-Pearson lower bound of a whole
    count k of n samples (Cohen et al. 2019, Algorithm 1), so its radii are a lattice of at most
    n + 1 values, increasing in k. A bisection on k (about log2(n) steps for all radii at once)
    finds the neighbours. Beyond the largest (k = n), both are the largest.

    Examples:
        >>> below, above = certifiable_neighbours([0.5], 0.25, 1000, 0.001)
        >>> bool(below[0] < 0.5 <= above[0]), round(float(above[0] - below[0]), 4)
        (True, 0.0066)
    """
    radii = np.asarray(radii, dtype=np.float64)

    def radius_of(k: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):  # k = 0: p = 0, radius -inf
            return float(sigma) * norm.ppf(clopper_pearson_lower(k, n, alpha))

    low = np.zeros(radii.shape, dtype=np.int64)  # radius(low) < r (radius(0) = -inf)
    high = np.full(radii.shape, int(n), dtype=np.int64)  # radius(high) >= r, or high = n
    while np.any(high - low > 1):
        middle = (low + high) // 2
        above = radius_of(middle) >= radii
        high, low = np.where(above, middle, high), np.where(above, low, middle)
    at_or_above = radius_of(high)
    below = np.where(at_or_above >= radii, radius_of(low), at_or_above)
    return below, at_or_above


def nearest_certifiable_radius(radii: ArrayLike, sigma: float, n: int, alpha: float) -> np.ndarray:
    """For each radius, the nearest one CERTIFY can return with these settings.

    A row whose radius is far from it was not certified with these settings
    (:func:`certifiable_neighbours`).

    Examples:
        >>> r = 0.25 * float(norm.ppf(clopper_pearson_lower(990, 1000, 0.001)))
        >>> bool(nearest_certifiable_radius([r], 0.25, 1000, 0.001)[0] == r)
        True
        >>> float(nearest_certifiable_radius([0.3382], 0.25, 1000, 0.001)[0]) != 0.3382
        True
    """
    radii = np.asarray(radii, dtype=np.float64)
    below, at_or_above = certifiable_neighbours(radii, sigma, n, alpha)
    return np.where(np.abs(at_or_above - radii) <= np.abs(radii - below), at_or_above, below)


def binomial_pvalue(n_a: int, n_b: int) -> float:
    """Two-sided p-value of the exact binomial test of n_a successes in n_a + n_b trials at p = 0.5.

    PREDICT (Cohen et al. 2019, Algorithm 1) returns the top class only when this p-value is at
    most alpha (Hung et al. 2019, arXiv 1610.03944). ``scipy.stats.binom_test`` was removed from
    SciPy; this wraps ``scipy.stats.binomtest``. With no trials there is no evidence: p = 1.

    Args:
        n_a: Count of the most frequent class.
        n_b: Count of the runner-up class.

    Returns:
        The p-value in [0, 1].

    Raises:
        SettingError: If a count is negative.

    Examples:
        >>> round(binomial_pvalue(60, 40), 4)
        0.0569
        >>> binomial_pvalue(0, 0)
        1.0
    """
    n_a, n_b = int(n_a), int(n_b)
    if n_a < 0 or n_b < 0:
        raise SettingError(f"counts must be >= 0; got n_a={n_a}, n_b={n_b}")
    if n_a + n_b == 0:
        return 1.0
    return float(binomtest(n_a, n_a + n_b, 0.5).pvalue)


def smallest_useful_n(alpha: float) -> int:
    """Smallest n for which n successes out of n give a Clopper-Pearson lower bound above 0.5.

    The bound for k = n is alpha ** (1 / n), so this is the smallest n with alpha ** (1 / n) > 0.5,
    i.e. n > log2(1 / alpha). With fewer estimation samples CERTIFY can never certify a positive
    radius (it abstains), so callers should warn.

    Args:
        alpha: One-sided failure probability in (0, 1).

    Returns:
        The smallest useful number of estimation samples.

    Raises:
        SettingError: If alpha is outside (0, 1).

    Examples:
        >>> smallest_useful_n(0.001)  # Cohen et al.'s alpha: n = 10 can certify, n = 9 cannot
        10
    """
    alpha = check_real("alpha", alpha, low=0, high=1)
    n = max(1, math.floor(math.log2(1.0 / alpha)))
    while alpha ** (1.0 / n) <= 0.5:  # guard floating-point rounding near powers of two
        n += 1
    while n > 1 and alpha ** (1.0 / (n - 1)) > 0.5:
        n -= 1
    return n


def warn_if_useless_n(name: str, n: int | None, alpha: float, owner: str) -> None:
    """Warn (``UserWarning``) when ``n`` estimation samples can never certify at ``alpha``.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_if_useless_n("n", 9, 0.001, "Certification")
        >>> str(caught[0].message)[:45]
        'Certification n=9 can never certify a radius '
    """
    useful = smallest_useful_n(alpha)
    if n is not None and n < useful:
        warnings.warn(
            f"{owner} {name}={n} can never certify a radius at alpha={alpha}: every image will "
            f"abstain; the smallest useful {name} is {useful}",
            UserWarning,
            stacklevel=3,
        )
