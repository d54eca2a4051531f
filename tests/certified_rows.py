"""Certification rows for tests: radii moved onto the lattice that CERTIFY's settings give."""

import dataclasses
from collections.abc import Iterable

from robust.certificates import CertifiedImage
from robust.statistics import certifiable_neighbours


def on_lattice(
    rows: Iterable[CertifiedImage], sigma: float, n: int, alpha: float
) -> list[CertifiedImage]:
    """``rows`` with each certified radius replaced by the smallest (sigma, n, alpha) give above it.

    Files read back are refused when a radius is one CERTIFY cannot return with their sidecar's
    settings, so a test's made-up radius (0.5) becomes the certifiable one just above it (still
    certified at 0.5, so certified accuracies at round radii do not change).
    """
    rows = list(rows)
    radii = certifiable_neighbours([row.radius for row in rows], sigma, n, alpha)[1]
    return [
        row if row.abstained else dataclasses.replace(row, radius=float(radius))
        for row, radius in zip(rows, radii, strict=True)
    ]
