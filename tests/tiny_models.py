"""Small seeded models and inputs shared by the attack and smoothing tests."""

from __future__ import annotations

import math

import torch
from torch import nn


def small_cnn(classes: int = 5, seed: int = 0, channels: int = 1, size: int = 8) -> nn.Module:
    """Conv, pool and a two-layer head for ``channels`` x ``size`` x ``size`` images (seeded)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * (size // 2) ** 2, 16),
        nn.ReLU(),
        nn.Linear(16, classes),
    )


def linear(d: int, classes: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A seeded linear classifier of flattened inputs with ``d`` values (float64 by default)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).to(dtype)


def batch(
    n: int, classes: int, seed: int = 1, dtype: torch.dtype = torch.float32, size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uniform 1 x ``size`` x ``size`` images in [0, 1] and random labels (seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g, dtype=dtype)
    return x, torch.randint(0, classes, (n,), generator=g)


def generators(seeds: list[int] | range) -> list[torch.Generator]:
    """One CPU generator per seed: per-sample randomness for the attacks."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def distance(d: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf (``norm="inf"``) or L2 norm of a batch of perturbations."""
    return d.flatten(1).norm(p=math.inf if norm == "inf" else 2, dim=1)
