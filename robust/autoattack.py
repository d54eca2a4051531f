"""AutoAttack, standard version: APGD-CE, then APGD-T, then Square, each on the images still robust.

Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML), Sec. 5: the ensemble's robust accuracy is the fraction of images
that every attack fails on. The standard version runs APGD-CE (100 iterations, 1 run), APGD-T
(100 iterations, 9 target classes, 1 run each), FAB-T and Square (5,000 queries), each only on
the images that the earlier ones did not break. FAB-T is left out here (the other three find
almost every adversarial example it finds; Croce & Hein 2020, Table 2). Conventions are those of
:mod:`robust.attacks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from robust._attack_core import (
    Forward,
    Generators,
    as_inputs,
    canonical_norm,
    check_ball,
    check_eps,
    check_fraction,
    check_generators,
    float_logits,
    margin,
    prepared,
    subset,
    view,
)
from robust.apgd import check_target_classes, run_apgd_ce, run_apgd_t
from robust.checks import check_int
from robust.square import run_square

__all__ = ["STAGES", "autoattack"]

STAGES = ("clean", "apgd-ce", "apgd-t", "square")
"""Keys of the ``stages`` masks: correct on the clean images, then robust after each attack."""


def autoattack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str | float,
    *,
    steps: int = 100,
    restarts: int = 1,
    n_target_classes: int | None = None,
    n_queries: int = 5000,
    p_init: float = 0.8,
    rho: float = 0.75,
    generator: Generators = None,
    stages: dict[str, Tensor] | None = None,
    channels_last: bool | None = None,
) -> Tensor:
    r"""AutoAttack (standard, without FAB-T): APGD-CE, APGD-T, Square in turn, worst case per image.

    'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks' [https://arxiv.org/abs/2003.01690]. Each attack runs only on the images that the
    model still classifies correctly after the earlier ones (images misclassified from the start
    are never attacked and come back unchanged); an image keeps the first adversarial example
    found, else the point of smallest margin ``z_y - max_{j != y} z_j`` over the three attacks.
    With one generator per image every random choice of image ``i`` comes from ``generator[i]``
    (in the order APGD-CE, APGD-T, Square), so results do not depend on the batch.

    Distance Measure: L2 or Linf.

    Shape:
        - x: :math:`(B, C, H, W)` in [0, 1].
        - y: :math:`(B,)` int64 labels.
        - output: :math:`(B, C, H, W)`, same dtype/device as ``x``, detached.
        - stages: each value :math:`(B,)` bool.

    Args:
        model: Classifier returning ``(B, K)`` logits, ``K >= 4``.
        x: Clean images.
        y: True labels.
        eps: Radius of the ball (>= 0; 0 returns ``x``).
        norm: ``"2"`` or ``"inf"`` (aliases accepted).
        steps: APGD iterations per run (100).
        restarts: Runs of APGD-CE, of APGD-T per target class and of Square (1).
        n_target_classes: APGD-T's target classes, in ``[1, C - 1]`` for a model of ``C``
            classes (refused otherwise); None: 9 as in AutoAttack, at most ``C - 1``.
        n_queries: Square's query budget per image (5000).
        p_init: Square's initial window fraction (0.8).
        rho: APGD's step-size halving threshold (0.75).
        generator: RNG for the random starts and Square's choices, or one per sample.
        stages: If given, filled with ``{"clean", "apgd-ce", "apgd-t", "square"}`` boolean masks:
            correct on the clean images, then still robust after each attack (the accuracy after
            each stage is the mask's mean).
        channels_last: Run the model with channels-last weights (a private copy); default on for
            float32 images on CPUs.

    Returns:
        Adversarial images in [0, 1] with ``||x_adv - x||_norm <= eps``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(4, 1, 8, 8), model(torch.rand(4, 1, 8, 8)).argmax(1)
        >>> masks = {}
        >>> x_adv = autoattack(model, x, y, 0.05, "inf", steps=5, n_queries=10, stages=masks)
        >>> list(masks), masks["square"].shape
        (['clean', 'apgd-ce', 'apgd-t', 'square'], torch.Size([4]))
        >>> bool((masks["square"] <= masks["apgd-t"]).all() and (masks["apgd-t"] <= masks["apgd-ce"]).all())
        True
    """
    owner = "autoattack"
    eps = check_eps(eps, owner)
    norm = canonical_norm(norm, owner)
    check_ball(eps, norm, owner, x)
    steps = check_int("steps", steps, minimum=1, owner=owner)
    restarts = check_int("restarts", restarts, minimum=1, owner=owner)
    if n_target_classes is not None:
        n_target_classes = check_int("n_target_classes", n_target_classes, minimum=1, owner=owner)
    n_queries = check_int("n_queries", n_queries, minimum=1, owner=owner)
    p_init = check_fraction("p_init", p_init, owner)
    rho = check_fraction("rho", rho, owner)
    if x.dim() != 4:
        raise ValueError(f"autoattack needs images of shape (B, C, H, W); got {tuple(x.shape)}")
    check_generators(generator, len(x))
    with prepared(model, x, channels_last) as forward:
        x, y = as_inputs(x, y)
        with torch.no_grad():
            logits = float_logits(forward(x))
        robust = logits.argmax(dim=1) == y
        n_target_classes = check_target_classes(n_target_classes, logits.shape[1], owner)
        if stages is not None:
            stages["clean"] = robust.clone()
        if eps == 0:
            if stages is not None:
                stages.update({name: robust.clone() for name in STAGES[1:]})
            return x.clone()
        runs: dict[str, Callable[[Forward, Tensor, Tensor, Generators], Tensor]] = {
            "apgd-ce": lambda f, xs, ys, g: run_apgd_ce(
                f, xs, ys, eps, norm, steps, restarts, rho, True, g
            ),
            "apgd-t": lambda f, xs, ys, g: run_apgd_t(
                f, xs, ys, eps, norm, steps, restarts, n_target_classes, rho, True, g, strict=True
            ),
            "square": lambda f, xs, ys, g: run_square(
                f, xs, ys, eps, norm, n_queries, p_init, restarts, False, g
            ),
        }
        x_adv = x.clone()
        best = torch.full((len(x),), math.inf, dtype=logits.dtype, device=x.device)
        for name, run in runs.items():
            index = robust.nonzero().squeeze(1)
            if index.numel() > 0:
                x_i, y_i = x[index], y[index]
                point = run(forward, x_i, y_i, subset(generator, index.tolist()))
                with torch.no_grad():
                    logits = forward(point)
                correct = logits.argmax(dim=1) == y_i
                # misclassified points rank first, the others by their margin
                gap = margin(logits, y_i).masked_fill_(~correct, -math.inf)
                take = gap < best[index]
                x_adv[index] = torch.where(view(take, point), point, x_adv[index])
                best[index] = torch.minimum(gap, best[index])
                robust[index] = correct
            if stages is not None:
                stages[name] = robust.clone()
        return x_adv
