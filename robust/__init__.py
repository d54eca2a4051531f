"""Framework-free robustness algorithms: attacks, randomized smoothing and its statistics.

The public API in one import::

    from robust import AttackSpec, Smooth, attack, fgm, pgd

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 2])
    >>> x_adv = attack(model, x, y, AttackSpec("pgd", "inf", 0.1, steps=5))
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
    True
    >>> Smooth(model, num_classes=3, sigma=0.25).certify(x[0], 10, 100, 0.01, index=0)[1] >= 0
    True
"""

from robust.attacks import AttackSpec, attack, fgm, pgd
from robust.checks import SettingError
from robust.smoothing import Smooth

__all__ = ["AttackSpec", "SettingError", "Smooth", "attack", "fgm", "pgd"]
